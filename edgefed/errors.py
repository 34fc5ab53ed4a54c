"""The one exception type that reaches users as a single line instead of a traceback."""


class EdgefedError(Exception):
    """Bad input from the user (a file, a flag, a model path): the message says what and where."""
