"""Command-line flags built from RunConfig's fields and its components' settings: the flag, its type,
its help and its default are the field's own (edgefed/config.py, edgefed/methods/settings.py, ...), so
they are written once."""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, Field, fields
from typing import Any

from edgefed.config import FIELDS, SETTINGS_FIELDS, SETTINGS_TYPES, TYPES, ServerSettings
from edgefed.settings import key_of


def default_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(value) if value else "none"
    return str(value)


def add_option(parser: argparse.ArgumentParser, field: Field, kind: Any, with_default: bool = False) -> None:
    """`--<name>` for a settings field made with `option()` (edgefed/settings.py), of type `kind`. Without
    `with_default` the flag is absent from the parsed arguments unless given (the configuration's
    layers fill it); with it, the field's default."""
    help_text = field.metadata["help"]
    if field.default not in (None, MISSING):
        help_text += f" (default {default_text(field.default)})"
    kinds = set(typing.get_args(kind)) or {kind}
    options: dict[str, Any] = {"help": help_text}
    if with_default:
        options["default"] = field.default
    if bool in kinds:
        options["action"] = argparse.BooleanOptionalAction
    else:
        options["metavar"] = field.metadata.get("metavar")
        if int in kinds:
            options["type"] = int
        elif float in kinds:
            options["type"] = float
    parser.add_argument(f"--{key_of(field.name)}", **options)


def add_config_option(parser: argparse.ArgumentParser, name: str, with_default: bool = False) -> None:
    """`--<name>` for the RunConfig field or component setting `name`."""
    if name in FIELDS:
        add_option(parser, FIELDS[name], TYPES[name], with_default)
    else:
        add_option(parser, SETTINGS_FIELDS[name], SETTINGS_TYPES[name], with_default)


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """ServerSettings' fields as flags, each with its default."""
    kinds = typing.get_type_hints(ServerSettings)
    for field in fields(ServerSettings):
        add_option(parser, field, kinds[field.name], with_default=True)


def server_settings(args: dict[str, Any]) -> ServerSettings:
    """The ServerSettings of parsed arguments (taking their fields out of `args`)."""
    settings = ServerSettings(**{field.name: args.pop(field.name) for field in fields(ServerSettings)})
    settings.check()
    return settings


def add_run_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Every RunConfig field and every component's setting as a flag, with --config and --resume."""
    parser.add_argument("--config", metavar="FILE", help="TOML file with the same keys as these flags")
    for name in FIELDS:
        if name not in skip:
            add_config_option(parser, name)
    for name in SETTINGS_FIELDS:
        add_config_option(parser, name)
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last completed round"
    )
