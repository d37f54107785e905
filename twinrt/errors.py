"""The one exception type for errors a user can fix: bad config, bad files, bad input.

The CLI prints these as a single line and exits with code 2; anything else is a bug and keeps its traceback.
"""


class TwinError(ValueError):
    """A user-facing error with a message that says what is wrong and where."""
