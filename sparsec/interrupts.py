"""Stopping a command cleanly: Ctrl-C and SIGTERM while a stage works.

The CLI's signal handlers record the request (``request_stop``) and raise; every output
is written to a temp file and renamed into place, so a stopped command leaves the
previous output as it was. Some libraries swallow or wrap the interrupt (torch's
exporter reports it as its own error): ``check_stop`` is called just before an output
is renamed into place, and ``interrupt_in_chain`` finds an interrupt behind a wrapped
error, so neither can make a stopped command look finished or failed.
"""

from __future__ import annotations

import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the running command stops, outputs stay as they were."""


_stop_signal: int | None = None


def request_stop(signum: int) -> None:
    """Record that the command was asked to stop (by a signal handler)."""
    global _stop_signal
    _stop_signal = signum


def stop_requested() -> int | None:
    """The signal number of a stop request made since the command started, or None."""
    return _stop_signal


def clear_stop() -> None:
    global _stop_signal
    _stop_signal = None


def check_stop() -> None:
    """Raise the stop exception again if a stop was requested: called before an output
    is renamed into place, so an interrupt some library swallowed still keeps it."""
    if _stop_signal == signal.SIGTERM:
        raise Terminated
    if _stop_signal is not None:
        raise KeyboardInterrupt


def interrupt_in_chain(exc: BaseException | None) -> KeyboardInterrupt | None:
    """The interrupt behind ``exc``, when a library wrapped one in its own exception.

    Follows ``__cause__`` and ``__context__``. Besides a real ``KeyboardInterrupt`` this
    recognizes torch dynamo's ``ObservedKeyboardInterruptError`` (a ``KeyboardInterrupt``
    seen while tracing, wrapped in ``Unsupported``) without importing torch."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, KeyboardInterrupt):
            return exc
        if type(exc).__name__ == "ObservedKeyboardInterruptError":
            return KeyboardInterrupt()
        exc = exc.__cause__ or exc.__context__
    return None


def _stop_handler(signum, frame):
    request_stop(signum)
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def install_handlers() -> dict:
    """SIGINT and SIGTERM raise in the main thread (SIGTERM as ``Terminated``), and are
    recorded, so an interrupt a library swallows still stops the command (see
    check_stop). Returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL):
            previous[signum] = signal.signal(signum, _stop_handler)
    return previous
