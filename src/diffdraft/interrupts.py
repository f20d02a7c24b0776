"""Whether Ctrl-C was pressed in this process, even where a library swallowed it, and holding a
Ctrl-C back while a module is being imported.

A SIGINT that lands inside a third-party import can be caught there and leave a module half
made (numpy's `dtypes`, once: the next attribute lookup then recursed until a RecursionError).
Worse, an import can run C++ that calls back into Python (torch's `_c10d_init`, through
pybind11): a KeyboardInterrupt raised there becomes a C++ exception that nothing catches, and the
process aborts (SIGABRT, seen once in CI). So the handler installed here raises KeyboardInterrupt
as Python's own does, except while an import is under way: then it only remembers the Ctrl-C and
sends the signal again a moment later, until it lands outside any import. It also remembers that it
fired, so the command line's error boundary can tell "interrupted" from "a bug". Knows nothing else.
"""

from __future__ import annotations

import os
import signal
import threading

_fired = threading.Event()
RETRY_S = 0.05  # how soon a Ctrl-C held back during an import is delivered again


def _inside_an_import(frame) -> bool:
    """Whether the interrupted Python code runs under importlib (a module's body is executing)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def _send_again() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def _on_sigint(signum, frame) -> None:
    _fired.set()
    if _inside_an_import(frame):
        retry = threading.Timer(RETRY_S, _send_again)
        retry.daemon = True
        retry.start()
        return
    raise KeyboardInterrupt


def install() -> None:
    """Take SIGINT (from the main thread only, where Python delivers signals; elsewhere nothing changes)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)


def happened() -> bool:
    return _fired.is_set()
