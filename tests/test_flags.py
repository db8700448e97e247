"""Settings from flags and the environment: a flag wins over the variable, which wins
over the default."""

import dataclasses
from pathlib import Path

import pytest

from server.flags import parse_settings


@dataclasses.dataclass(frozen=True)
class Settings:
    listen: str = "127.0.0.1:1"
    window_s: float = 0.5
    shards: int = 4
    demo: bool = False
    run_dir: Path = Path("/tmp/run")


def parse(argv: list[str], environ: dict[str, str]) -> Settings:
    return parse_settings(
        Settings,
        argv,
        prog="test",
        description="test",
        env_name=lambda field: "T_" + field.upper(),
        environ=environ,
    )


def test_defaults_then_variables_then_flags() -> None:
    assert parse([], {}) == Settings()

    from_env = parse([], {"T_WINDOW_S": "2.5", "T_DEMO": "yes", "T_RUN_DIR": "/x"})
    assert (from_env.window_s, from_env.demo, from_env.run_dir) == (
        2.5,
        True,
        Path("/x"),
    )

    flagged = parse(["--window-s", "3", "--no-demo", "--shards", "7"], {"T_DEMO": "1"})
    assert (flagged.window_s, flagged.demo, flagged.shards) == (3.0, False, 7)


def test_an_empty_variable_is_a_value_not_an_absence() -> None:
    assert parse([], {"T_LISTEN": ""}).listen == ""


def test_a_variable_that_does_not_parse_names_itself() -> None:
    with pytest.raises(SystemExit, match=r"\$T_SHARDS is not a valid --shards"):
        parse([], {"T_SHARDS": "many"})
