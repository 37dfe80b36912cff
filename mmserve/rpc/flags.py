"""Command-line flags whose defaults come from the environment, derived one way.

Flag `--foo-bar` with dest `foo_bar` defaults to `<PREFIX>FOO_BAR`; a repeatable flag
takes a comma-separated list there (flags on the command line replace it), a boolean one
true/false (1/0, yes/no, on/off). The value is parsed like the flag's, so a bad
environment value is a usage error naming the variable. A few variables are shared by
every tool (`SHARED`) and keep their own names.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

SHARED = {"cache_dir": "MMSERVE_CACHE_DIR"}


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def env_name(prefix: str, dest: str) -> str:
    return SHARED.get(dest, prefix + dest.upper())


def parse_with_env(parser: argparse.ArgumentParser, argv: Sequence[str] | None, prefix: str,
                   environ: Mapping[str, str]) -> argparse.Namespace:
    """Parses `argv`; every flag the command line left unset takes its environment value."""
    lists: dict[str, list[object]] = {}
    for action in parser._actions:
        name = env_name(prefix, action.dest)
        if not action.option_strings or action.dest == "help" or not environ.get(name):
            continue
        try:
            value = _from_env(action, environ[name])
        except (ValueError, TypeError) as exc:
            parser.error(f"environment variable {name}: {exc}")
        if isinstance(action, argparse._AppendAction):
            lists[action.dest] = value  # type: ignore[assignment]
        else:
            action.default = value
    args = parser.parse_args(argv)
    for dest, value in lists.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    return args


def _from_env(action: argparse.Action, text: str) -> object:
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
        return parse_bool(text)
    convert = action.type if callable(action.type) else str
    if isinstance(action, argparse._AppendAction):
        return [convert(part.strip()) for part in text.split(",") if part.strip()]
    value = convert(text)
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{value!r} is not one of {sorted(action.choices)}")
    return value
