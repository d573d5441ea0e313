"""Stopping live weavelets on every exit path: interpreter exit (``atexit``) and SIGTERM to the trainer.

Objects register while they run and unregister when stopped. The SIGTERM handler is installed only from the
main thread, only while at least one object is registered, and only over a Python-level or default
disposition (an ignored SIGTERM stays ignored). After stopping the registered objects it chains to the
previous handler: a callable is called; the default disposition is restored and the signal re-raised, so the
process ends exactly as it would have without weavelet.
"""

from __future__ import annotations

import atexit
import logging
import signal
import threading
import weakref
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

log = logging.getLogger(__name__)

EXIT_STOP_TIMEOUT = 3.0
"""Bound on each stop made by these hooks."""


class Stoppable(Protocol):
    def stop(self, timeout: float = ...) -> None: ...


_lock = threading.RLock()
_live: weakref.WeakSet[Any] = weakref.WeakSet()
_atexit_installed = False
_previous_sigterm: Any = None
_sigterm_installed = False


def register(obj: Stoppable) -> None:
    """Stop ``obj`` at interpreter exit and on SIGTERM until :func:`unregister` is called."""
    global _atexit_installed
    with _lock:
        _live.add(obj)
        if not _atexit_installed:
            atexit.register(_stop_all, "interpreter exit")
            _atexit_installed = True
        _install_sigterm()


def unregister(obj: Stoppable) -> None:
    """Forget ``obj``; when nothing is registered any more, put the previous SIGTERM handler back."""
    with _lock:
        _live.discard(obj)
        if not _live:
            _restore_sigterm()


def _install_sigterm() -> None:
    global _previous_sigterm, _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except (ValueError, OSError):
        return
    if previous is signal.SIG_IGN or previous is None:
        return
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError) as exc:
        log.debug("weavelet: cannot install a SIGTERM handler: %s", exc)
        return
    _previous_sigterm = previous
    _sigterm_installed = True


def _restore_sigterm() -> None:
    global _previous_sigterm, _sigterm_installed
    if not _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, _previous_sigterm)
    except (ValueError, OSError):
        return
    _previous_sigterm = None
    _sigterm_installed = False


def _stop_all(reason: str) -> None:
    with _lock:
        live = list(_live)
    for obj in live:
        try:
            obj.stop(timeout=EXIT_STOP_TIMEOUT)
        except Exception as exc:
            log.warning("weavelet: stopping on %s failed: %s", reason, exc)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    previous = _previous_sigterm
    _stop_all("SIGTERM")
    if callable(previous):
        handler: Callable[[int, FrameType | None], Any] = previous
        handler(signum, frame)
    elif previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


__all__ = ["EXIT_STOP_TIMEOUT", "register", "unregister"]
