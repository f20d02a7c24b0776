"""`python -m diffdraft`: the same as the `diffdraft` command."""

from diffdraft.entry import console

console()
