"""The trainer's link to its weavelet: run id, the sidecar process, and reporting what became of revisions."""

from __future__ import annotations

import logging
import os
import secrets
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from weavelet_core.protocol import Revision, validate_run_id
from weavelet_torch.applier import Applier, Verdict

if TYPE_CHECKING:
    from weavelet_core.process import WeaveletProcess

log = logging.getLogger("weavelet_torch")

RUN_ENV = "WEAVELET_RUN"


def resolve_run(run: str | None) -> tuple[str, bool]:
    """The run id to use: ``run``, else ``WEAVELET_RUN``, else a generated one; and whether it was generated.

    An invalid id raises :class:`~weavelet_core.InvalidRunId` at once.
    """
    if run is None:
        run = os.environ.get(RUN_ENV, "").strip() or None
    if run is not None:
        return validate_run_id(run), False
    return time.strftime("run-%Y%m%d-%H%M%S-") + secrets.token_hex(3), True


def announce(run: str, url: str) -> None:
    """Tell the person starting the fit which run id to address (used when the id was generated)."""
    from weavelet_core.plugins import mask_password

    print(
        f"weavelet: run id {run!r} at {mask_password(url)} (choose one with WEAVELET_RUN or run=...); "
        f"change it live with: weavelet set {run} lr=0.001",
        file=sys.stderr,
        flush=True,
    )


def loop_error(exc: BaseException | None) -> BaseException | None:
    """The exception that should end the run ``failed``: ``None`` for none, Ctrl-C and ``SystemExit``."""
    if exc is None or isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
        return None
    return exc


class LinkedRun:
    """``run`` and ``process`` for the Lightning and Trainer callbacks: from their :class:`Link` (``self.link``)
    once training started, else the run id they were given (``self._run``)."""

    link: Link | None
    _run: str | None

    @property
    def run(self) -> str | None:
        """The run id (known once training started, or when given)."""
        return self.link.run if self.link is not None else self._run

    @property
    def process(self) -> Any:
        """The :class:`~weavelet_core.WeaveletProcess` of the current training (rank 0 only), or ``None``."""
        return self.link.process if self.link is not None else None


class Link:
    """Owns the :class:`~weavelet_core.WeaveletProcess` of one run and reports verdicts through it.

    :param run: run id (see :func:`resolve_run`).
    :param url: transport URL (default: ``WEAVELET_URL`` or the per-user ``file://`` directory).
    :param report_interval: shortest time in seconds between two status snapshots (the process's
        ``status_interval``, its one throttle).
    :param fresh: what a fresh start does with a desired config an earlier incarnation left (``"reset"`` or
        ``"adopt"``; see :class:`~weavelet_core.WeaveletProcess`).
    :param takeover: take the run over from a live owner instead of failing with ``RunOwned``.
    :param process_options: more keyword arguments for :class:`~weavelet_core.WeaveletProcess`.
    :param labels: ``key: value`` strings published in the run's status, for choosing runs
        (``weavelet stop -l sweep=3``); default none. Invalid labels raise ``ValueError`` at start.
    """

    def __init__(
        self,
        run: str | None,
        url: str | None,
        *,
        report_interval: float = 1.0,
        start_timeout: float = 10.0,
        fresh: str = "reset",
        takeover: bool = False,
        process_options: Mapping[str, Any] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        self.run, self.generated = resolve_run(run)
        self.url = url
        self.report_interval = report_interval
        self.start_timeout = start_timeout
        self.process_options: dict[str, Any] = {
            "status_interval": report_interval,
            "fresh": fresh,
            "takeover": takeover,
            **({"labels": dict(labels)} if labels else {}),
            **dict(process_options or {}),
        }
        self.process: WeaveletProcess | None = None

    def start(self, after: int, *, resume: bool | None = None) -> WeaveletProcess:
        """Create and start the process; revisions ``<= after`` are already applied. Idempotent.

        ``resume`` says whether this start continues from a checkpoint (default: ``after > 0``). Raises
        :class:`~weavelet_core.RunOwned` when another live trainer owns the run.
        """
        if self.process is not None:
            return self.process
        from weavelet_core.process import WeaveletProcess

        process = WeaveletProcess(self.run, self.url, after=after, resume=resume, **self.process_options)
        if self.generated:
            announce(self.run, process.url)
        self.process = process
        process.start(timeout=self.start_timeout)
        return process

    @property
    def incarnation(self) -> str:
        """This start's incarnation id (empty before :meth:`start`)."""
        process = self.process
        return process.incarnation if process is not None else ""

    def stop(self, error: BaseException | None = None) -> None:
        """Stop the process (bounded, idempotent, never raises); with ``error`` the run ends ``failed``."""
        process = self.process
        if process is None:
            return
        try:
            process.stop(error=loop_error(error))
        except Exception as exc:
            log.warning("weavelet: stopping the weavelet of run %r failed: %s", self.run, exc)

    def poll(self) -> Revision | None:
        """The newest revision not yet handed out, or ``None`` (also when not started)."""
        process = self.process
        return process.poll() if process is not None else None

    def is_baseline(self, revision: Revision) -> bool:
        """Whether ``revision`` was stored before this incarnation started (its commands never act)."""
        process = self.process
        return process is not None and process.is_baseline(revision)

    def settle(self, verdict: Verdict, applier: Applier) -> None:
        """Report ``verdict`` as the revision's outcome, and the optimizer it left active."""
        process = self.process
        if process is None:
            return
        if verdict.result == "applied":
            line = f"weavelet: run {self.run!r} revision {verdict.revision} applied at step {verdict.step}: "
            line += verdict.message or ""
            if log.hasHandlers() and log.isEnabledFor(logging.INFO):
                log.info("%s", line)  # the application logs INFO somewhere: it goes there
            else:
                print(line, file=sys.stderr, flush=True)  # one line on the training console, like rejections
        else:
            log.warning(
                "weavelet: run %r revision %d %s: %s", self.run, verdict.revision, verdict.result, verdict.message
            )
        process.report_outcome(
            verdict.revision, verdict.result, step=verdict.step, message=verdict.message, detail=verdict.detail
        )
        rewrite, applier.rewrite = applier.rewrite, None
        if rewrite is not None:  # after a rollback: the desired config becomes what the trainer now runs with
            process.write(
                rewrite,
                f"weavelet rollback of revision {verdict.revision} (incarnation {process.incarnation}): the "
                "checkpoint's config plus the rollback's changes",
                replace=True,
            )
        process.report(optimizer=applier.describe(), schema=applier.schema())

    def write(self, changes: Mapping[str, Any], author: str, *, replace: bool = False) -> bool:
        """Have the sidecar store a revision this trainer authored (see :meth:`WeaveletProcess.write`); ``False``
        when not started."""
        process = self.process
        return process is not None and process.write(changes, author, replace=replace)

    def report_due(self) -> bool:
        """Whether a status snapshot is due (lets callers skip gathering metrics)."""
        process = self.process
        return process is not None and process.report_due()

    def report(
        self,
        *,
        step: int | None = None,
        epoch: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        optimizer: dict[str, object] | None = None,
        schema: dict[str, object] | None = None,
        force: bool = False,
    ) -> None:
        """Hand the status to the process (it writes a snapshot when one is due, or with ``force``); ``schema``
        is what the run accepts (:meth:`~weavelet_torch.Applier.schema`), passed on at once when it is new."""
        process = self.process
        if process is None:
            return
        process.report(step=step, epoch=epoch, metrics=metrics, optimizer=optimizer, schema=schema, force=force)
