"""The small, validated objects that plugin hooks return."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weavelet_core.transport import Transport

_NAME = re.compile(r"[a-z][a-z0-9_\-]*")
_SCHEME = re.compile(r"[a-z][a-z0-9+.\-]*")

TransportFactory = Callable[..., "Transport"]
"""``factory(url: str, **options) -> Transport``: builds a transport without doing I/O."""


def missing_modules(modules: Iterable[str]) -> list[str]:
    """Those of ``modules`` that cannot be imported here (found without importing them)."""
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(module)
    return missing


@dataclasses.dataclass(frozen=True)
class TransportSpec:
    """A transport offered by a plugin.

    :param name: short lowercase name shown by ``weavelet plugins`` (``"nats"``).
    :param schemes: URL schemes it handles (``("nats", "tls")``); a URL picks its transport by scheme.
    :param factory: ``factory(url, **options) -> Transport``; must not do I/O and should import its client
        library lazily, so that listing plugins works without the driver installed.
    :param requires: importable module names the factory needs (``("nats",)``); used to report whether the
        driver is installed and, if not, to say how to install it.
    :param extra: the ``pip install "weavelet[extra]"`` extra that provides the driver, for built-ins; a
        third-party plugin leaves it ``None`` and names its own install command in ``install_hint``.
    :param install_hint: the command that installs the driver, when ``extra`` does not apply.
    :param description: one line for ``weavelet plugins``.
    """

    name: str
    schemes: tuple[str, ...]
    factory: TransportFactory
    requires: tuple[str, ...] = ()
    extra: str | None = None
    install_hint: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(f"TransportSpec.name {self.name!r}: use lowercase letters, digits, '-' and '_'")
        schemes = (self.schemes,) if isinstance(self.schemes, str) else tuple(self.schemes)
        if not schemes:
            raise ValueError(f"TransportSpec {self.name!r}: give at least one URL scheme")
        for scheme in schemes:
            if not isinstance(scheme, str) or not _SCHEME.fullmatch(scheme):
                raise ValueError(f"TransportSpec {self.name!r}: invalid URL scheme {scheme!r}")
        object.__setattr__(self, "schemes", schemes)
        object.__setattr__(self, "requires", tuple(self.requires))
        if not callable(self.factory):
            raise TypeError(f"TransportSpec {self.name!r}: factory must be callable")

    def missing_modules(self) -> list[str]:
        """The modules in ``requires`` that cannot be imported here."""
        return missing_modules(self.requires)

    @property
    def driver_installed(self) -> bool:
        return not self.missing_modules()

    def install_command(self) -> str:
        """How to install what this transport needs."""
        if self.install_hint:
            return self.install_hint
        if self.extra:
            return f'pip install "weavelet[{self.extra}]"'
        return "pip install " + " ".join(self.requires)


OptimizerFactory = Callable[..., Any]
"""``factory(params, **hyperparameters) -> torch.optim.Optimizer``."""


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer that a revision can switch to by name, beyond those in ``torch.optim``.

    :param name: the name used in revisions (``optimizer=lion``); lowercase, matched case-insensitively.
    :param factory: ``factory(params, **hyperparameters)`` returning a ``torch.optim.Optimizer``. ``params``
        is a list of param-group dicts, as ``torch.optim`` optimizers accept.
    :param description: one line for listings and error messages.
    """

    name: str
    factory: OptimizerFactory
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name.lower()):
            raise ValueError(f"OptimizerSpec.name {self.name!r}: use letters, digits, '-' and '_'")
        object.__setattr__(self, "name", self.name.lower())
        if not callable(self.factory):
            raise TypeError(f"OptimizerSpec {self.name!r}: factory must be callable")


SubcommandAction = Callable[[Any], "int | None"]
"""``action(args: argparse.Namespace) -> int | None``: runs the subcommand; the result is the exit status
(``None`` means 0)."""
ParserSetup = Callable[[Any], None]
"""``configure_parser(parser: argparse.ArgumentParser) -> None``: adds the subcommand's arguments."""


@dataclasses.dataclass(frozen=True)
class SubcommandSpec:
    """A ``weavelet NAME ...`` subcommand offered by a plugin (modelled on conda's ``CondaSubcommand``).

    :param name: the word after ``weavelet``; lowercase letters, digits, ``-`` and ``_``, and not one of the
        built-in commands (a plugin command with a built-in name is ignored, with a warning).
    :param summary: one line for ``weavelet -h`` and the subcommand's own help.
    :param action: ``action(args) -> int | None``, called with the parsed ``argparse.Namespace``; its result
        is the exit status (``None``: 0). Raising :class:`~weavelet_core.WeaveletError` prints one line and
        exits 1.
    :param configure_parser: ``configure_parser(parser)`` adds the subcommand's arguments to its
        ``argparse.ArgumentParser``; default: none. It runs only when the subcommand is the one being run (or
        when help or completion lists every option), so import heavy modules inside ``action``.
    :param requires: importable module names the subcommand needs; when one is missing the subcommand is
        still listed, and running it says how to install it (``extra`` or ``install_hint``).
    :param extra: the ``pip install "weavelet[extra]"`` extra that provides ``requires``, for weavelet's own
        plugins.
    :param install_hint: the command that installs ``requires``, for third-party plugins.

    Raises ``ValueError`` for a malformed name or an empty summary, ``TypeError`` when ``action`` or
    ``configure_parser`` is not callable.
    """

    name: str
    summary: str
    action: SubcommandAction
    configure_parser: ParserSetup | None = None
    requires: tuple[str, ...] = ()
    extra: str | None = None
    install_hint: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(f"SubcommandSpec.name {self.name!r}: use lowercase letters, digits, '-' and '_'")
        if not isinstance(self.summary, str) or not self.summary.strip():
            raise ValueError(f"SubcommandSpec {self.name!r}: give a one-line summary")
        if not callable(self.action):
            raise TypeError(f"SubcommandSpec {self.name!r}: action must be callable")
        if self.configure_parser is not None and not callable(self.configure_parser):
            raise TypeError(f"SubcommandSpec {self.name!r}: configure_parser must be callable or None")
        requires = (self.requires,) if isinstance(self.requires, str) else tuple(self.requires)
        object.__setattr__(self, "requires", requires)

    def missing_modules(self) -> list[str]:
        """The modules in ``requires`` that cannot be imported here."""
        return missing_modules(self.requires)

    def install_command(self) -> str:
        """How to install what this subcommand needs."""
        if self.install_hint:
            return self.install_hint
        if self.extra:
            return f'pip install "weavelet[{self.extra}]"'
        return "pip install " + " ".join(self.requires)
