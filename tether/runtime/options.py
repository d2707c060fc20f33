"""Command-line options of the argparse-based tools (demo, generate, eval): `key=value` is accepted wherever
`--key value` is, as the recipes take it, so `tether demo output_dir=X` equals `tether demo --output-dir X`."""

from __future__ import annotations

import argparse
import re

_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def key_value_as_flags(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`argv` with each `key=value` whose `--key` (underscores read as dashes) is an option of `parser` written as
    `--key=value`. A token that is the value of the option before it (`--prompt a=b`) is left alone."""
    actions = parser._option_string_actions  # option string -> action; argparse's own table
    out, expects_value = [], False
    for token in argv:
        key, sep, value = token.partition("=")
        flag = "--" + key.replace("_", "-")
        if not expects_value and sep and _KEY.fullmatch(key) and flag in actions:
            token = f"{flag}={value}"
        option = actions.get(token.split("=", 1)[0]) if token.startswith("-") else None
        expects_value = option is not None and "=" not in token and option.nargs != 0
        out.append(token)
    return out


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args` accepting `key=value` as well as `--key value` (see `key_value_as_flags`)."""
    return parser.parse_args(key_value_as_flags(parser, list(argv or [])))
