"""One exception type for every problem a user can fix; the CLI prints it as one line."""


class LayerfoldError(Exception):
    """A user-facing error: bad input, missing file, unsupported model, full disk."""
