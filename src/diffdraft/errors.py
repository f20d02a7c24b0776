"""User-facing errors.

`DiffdraftError` marks a problem in what the user asked for (a bad prompt, a bad sampling
value, a missing or corrupt file, a drafter that does not fit the target). The CLI prints
its message on one line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class DiffdraftError(ValueError):
    """A problem with the user's input, reported as one clear line."""
