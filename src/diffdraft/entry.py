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
    sys.exit(code)
