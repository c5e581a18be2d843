"""The one exception type users see: a message that says what was wrong and what to do."""


class PtqdError(Exception):
    """A user-facing error. The CLI prints its message without a traceback."""
