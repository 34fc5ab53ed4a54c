"""The one exception type that reaches users as a single line instead of a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class EdgefedError(Exception):
    """Bad input from the user (a file, a flag, a model path): the message says what and where."""


def report_errors(command: Callable[[], int]) -> int:
    """Run a command; an EdgefedError is one line on stderr and exit status 2, not a traceback."""
    try:
        return command()
    except EdgefedError as error:
        print(f"edgefed: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgefed: interrupted", file=sys.stderr)
        return 130
