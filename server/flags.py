"""Settings dataclasses read from flags and the environment, in one way for every
stockward process: each field is a flag (`--batch-window-s`) and an environment
variable (`<PREFIX>BATCH_WINDOW_S`); a flag wins over the variable, which wins over
the field's default."""

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})


def parse_settings(
    cls: type[T],
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    env_name: Callable[[str], str],
    environ: Mapping[str, str] | None = None,
) -> T:
    """An instance of the frozen dataclass `cls` with every field settable by flag
    and by the variable `env_name(field)`. Booleans take --flag / --no-flag."""
    environ = os.environ if environ is None else environ
    defaults = cls()
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        variable = env_name(field.name)
        # Absent is unset; an empty value is a value (an empty listen turns it off).
        text = environ.get(variable)
        if isinstance(default, bool):
            value = default if text is None else text.lower() in _TRUE_WORDS
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=value
            )
            continue
        kind: Callable[[str], Any] = (
            Path if isinstance(default, Path) else type(default)
        )
        try:
            value = default if text is None else kind(text)
        except ValueError as error:
            raise SystemExit(f"${variable} is not a valid {flag}: {error}") from error
        parser.add_argument(
            flag, type=kind, default=value, help=f"default: ${variable}, else {default}"
        )
    namespace = parser.parse_args(argv)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    return cls(**{name: getattr(namespace, name) for name in names})
