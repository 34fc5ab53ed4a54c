"""The one exception type that reaches users as a single line instead of a traceback."""

from __future__ import annotations

import sys
import unicodedata
from collections.abc import Callable


class EdgefedError(Exception):
    """Bad input from the user (a file, a flag, a model path): the message says what and where."""


# What the `torch` extra installs: a command that needs one of them, where it is missing, says so.
TORCH_STACK = ("torch", "transformers", "peft", "accelerate", "safetensors", "tqdm", "psutil")


def one_line(text: str) -> str:
    """`text` with its line breaks, control characters and unpaired surrogates escaped (`\\n`, `\\x00`,
    `\\udcff`): a message that quotes a user's value stays one line, whatever the value holds."""
    return "".join(
        repr(char)[1:-1] if unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp") else char for char in text
    )


def report_errors(command: Callable[[], int]) -> int:
    """Run a command; an EdgefedError is one line on stderr and exit status 2, not a traceback."""
    try:
        return command()
    except EdgefedError as error:
        print(f"edgefed: error: {one_line(str(error))}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in TORCH_STACK:
            raise
        print(
            f"edgefed: error: this command needs {error.name}, which is not installed: pip install "
            "'edgefed[torch]' (without it, a device trains through ONNX Runtime: edgefed client "
            "--runtime ort)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("edgefed: interrupted", file=sys.stderr)
        return 130
