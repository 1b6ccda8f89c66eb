"""The one exception type for mistakes a user can fix (bad flags, config keys, folders)."""


class UsageError(ValueError):
    """A one-line, actionable message about the user's input; CLIs print it and exit with code 2.

    It subclasses ValueError so library callers can catch it as one.
    """
