"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class QuantkitError(ValueError):
    """User-facing error: the message says what is wrong and what is allowed."""
