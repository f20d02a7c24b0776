"""Whether Ctrl-C was pressed in this process, even where a library swallowed it.

A SIGINT that lands inside a third-party import can be caught there and leave a module half
made (numpy's `dtypes`, once: the next attribute lookup then recursed until a RecursionError).
The handler installed here raises KeyboardInterrupt as Python's own does, and also remembers
that it fired, so the command line's error boundary can tell "interrupted" from "a bug".
Knows nothing else.
"""

from __future__ import annotations

import signal
import threading

_fired = threading.Event()


def _on_sigint(signum, frame) -> None:
    _fired.set()
    raise KeyboardInterrupt


def install() -> None:
    """Take SIGINT (from the main thread only, where Python delivers signals; elsewhere nothing changes)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)


def happened() -> bool:
    return _fired.is_set()
