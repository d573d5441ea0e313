"""Developer tasks: ``nox -s tests``, ``nox -s lint``, ``nox -s typecheck``, ``nox -s bench``."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

# A CPU build of torch, pinned for tests and CI; the public extras keep a range.
TORCH = "torch==2.13.0"


def install_project(session: nox.Session, extras: str) -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the whole test suite against real nats-server and redis-server processes it starts itself."""
    install_project(session, "all,test")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff lint and format check."""
    session.install("ruff>=0.17,<0.18")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the packages."""
    install_project(session, "all,test")
    session.install("mypy>=2.4,<3")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks, each printed beside a baseline measured in the same run (see docs/benchmarks.md)."""
    install_project(session, "all,test")
    session.run("python", "benchmarks/run_all.py", *session.posargs)
