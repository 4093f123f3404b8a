"""The one error type for user mistakes: the CLI prints its message without a traceback."""


class PhonetuneError(Exception):
    """A problem the user can fix (bad option, missing file, bad config). The message says how."""
