"""TOML in and out: one parser (tomllib, or tomli on Python 3.10) and one writer of values."""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from edgefed.errors import EdgefedError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def parse_toml(text: str, origin: str) -> dict[str, Any]:
    """The table of a TOML text; an EdgefedError naming `origin` when it is not TOML."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise EdgefedError(f"{origin}: invalid TOML ({error})") from None
    except ValueError:  # an integer of more digits than int() converts (sys.get_int_max_str_digits)
        raise EdgefedError(f"{origin}: invalid TOML (an integer too long to read)") from None
    except RecursionError:
        raise EdgefedError(f"{origin}: invalid TOML (arrays or tables nested too deeply)") from None


def toml_key(key: str) -> str:
    return key if BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)


def toml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_scalar(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_scalar(v)}" for k, v in value.items()) + " }"
    # A JSON string is a valid TOML basic string: quotes, backslashes and control characters escaped.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")  # TOML forbids a raw DEL
