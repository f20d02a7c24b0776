"""The `diffdraft` command's entry point: the command line behind an interrupt boundary that holds from
the first import.

Importing torch and transformers takes seconds; a Ctrl-C then would otherwise print a
KeyboardInterrupt traceback. Here the import itself runs inside the boundary, so Ctrl-C at any
moment ends with `diffdraft: interrupted` and exit code 130. Everything else is diffdraft.cli's.
"""

from __future__ import annotations

import sys

INTERRUPTED = 130


def main() -> int:
    from diffdraft import interrupts  # no imports of its own beyond the standard library

    interrupts.install()
    try:
        from diffdraft.cli import main as run

        return run()
    except KeyboardInterrupt:
        print("\ndiffdraft: interrupted", file=sys.stderr)
        return INTERRUPTED


def console() -> None:
    """The console script: exit with main()'s code, quietly even if interrupted while exiting."""
    try:
        code = main()
    except KeyboardInterrupt:
        code = INTERRUPTED
    if code == INTERRUPTED:
        exit_interrupted()
    sys.exit(code)


def exit_interrupted() -> None:
    """Exit with 130 now, after the exit handlers and a flush of the standard streams.

    Under `python -m`, CPython ends the process by SIGINT instead of with the exit code asked for
    if a KeyboardInterrupt ever escaped code run through its C-level `PyRun_String` (as
    extension modules' embedded evaluations do), even when Python code caught it later; a
    Ctrl-C that landed there made `python -m diffdraft` die by signal (-2) after printing
    `diffdraft: interrupted` (seen once in CI). `os._exit` takes the code as given.
    """
    import atexit
    import os

    try:
        atexit._run_exitfuncs()  # what a normal exit would run (logging's final flush among them)
    except BaseException:  # an exit handler interrupted or failing changes nothing now
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can reach it
            pass
    os._exit(INTERRUPTED)
