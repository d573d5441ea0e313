"""Hook specifications of the ``weavelet`` pluggy project.

A plugin is a module (or object) with functions decorated by :data:`weavelet_core.hookimpl`, registered
through the ``weavelet`` entry-point group in its own ``pyproject.toml``::

    [project.entry-points.weavelet]
    kafka = "weavelet_kafka.plugin"

weavelet's own transports register exactly the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

import pluggy

from weavelet_core.specs import OptimizerSpec, SubcommandSpec, TransportSpec

PROJECT_NAME = "weavelet"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def weavelet_transports() -> Iterable[TransportSpec]:  # type: ignore[empty-body]
    """Return the transports this plugin provides.

    Each :class:`~weavelet_core.TransportSpec` names its URL schemes and a factory building a
    :class:`~weavelet_core.Transport` from a URL. The factory must not do I/O; import the client library inside
    it and list that module in ``requires`` so that ``weavelet plugins`` can say whether it is installed.

    Example (a complete plugin module; the class body is elided)::

        from weavelet_core import TransportSpec, hookimpl

        def make_transport(url: str, **options):
            from weavelet_kafka.transport import KafkaTransport  # imports the driver lazily
            return KafkaTransport(url, **options)

        @hookimpl
        def weavelet_transports():
            return [
                TransportSpec(
                    name="kafka",
                    schemes=("kafka",),
                    factory=make_transport,
                    requires=("aiokafka",),
                    install_hint="pip install weavelet-kafka",
                    description="Apache Kafka, one compacted topic per run",
                )
            ]
    """


@hookspec
def weavelet_optimizers() -> Iterable[OptimizerSpec]:  # type: ignore[empty-body]
    """Return optimizers that revisions may switch to by name, beyond ``torch.optim``'s own.

    Example::

        from weavelet_core import OptimizerSpec, hookimpl

        def make_lion(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
            from lion_pytorch import Lion
            return Lion(params, lr=lr, betas=betas, weight_decay=weight_decay)

        @hookimpl
        def weavelet_optimizers():
            return [OptimizerSpec(name="lion", factory=make_lion, description="Lion (sign momentum)")]

    Afterwards ``weavelet set RUN optimizer=lion lr=3e-5`` switches a running fit to it.
    """


@hookspec
def weavelet_subcommands() -> Iterable[SubcommandSpec]:  # type: ignore[empty-body]
    """Return ``weavelet NAME ...`` subcommands this plugin adds to the command line.

    Modelled on conda's ``conda_subcommands``: each :class:`~weavelet_core.SubcommandSpec` has a ``name``, a
    one-line ``summary``, an ``action(args) -> int | None`` and an optional ``configure_parser(parser)``.
    ``requires`` lists modules it needs; without them it is still listed and says what to install. A name that
    a built-in command (or an earlier plugin) already has is ignored, with a warning. weavelet's own
    ``server`` (from ``weavelet_nats``) and ``demo`` (from ``weavelet_lightning``) come through this hook.

    Example (a complete plugin module)::

        import argparse

        from weavelet_core import SubcommandSpec, hookimpl

        def configure(parser: argparse.ArgumentParser) -> None:
            parser.add_argument("run", metavar="RUN", help="run id")

        def greet(args: argparse.Namespace) -> int:
            print(f"hello, {args.run}")
            return 0

        @hookimpl
        def weavelet_subcommands():
            return [SubcommandSpec(name="greet", summary="say hello to a run", action=greet,
                                   configure_parser=configure)]

    Afterwards ``weavelet greet demo`` prints ``hello, demo``.
    """
