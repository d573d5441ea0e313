"""Registers ``weavelet demo`` with the command line (entry point ``weavelet: lightning``).

Importing this module imports neither torch nor Lightning: the demo module is imported when the command runs.
"""

from __future__ import annotations

import argparse

from weavelet_core import SubcommandSpec, hookimpl


def _demo_parser(parser: argparse.ArgumentParser) -> None:
    from weavelet_lightning.demo import add_arguments

    add_arguments(parser)


def _demo(args: argparse.Namespace) -> int:
    from weavelet_lightning.demo import run

    return run(args)


@hookimpl
def weavelet_subcommands() -> list[SubcommandSpec]:
    return [
        SubcommandSpec(
            name="demo",
            summary="train a small model that you can reconfigure while it runs",
            action=_demo,
            configure_parser=_demo_parser,
            requires=("torch", "pytorch_lightning"),
            extra="lightning",
        )
    ]
