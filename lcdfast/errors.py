"""The one exception type for user mistakes; the CLI prints it as one line and exits with code 2."""


class LcdError(Exception):
    """Bad input: the message names the file, key or argument, the value seen and what is allowed."""
