"""flag > environment > file > default, and one readable line on a bad value."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ztcore import config
from ztcore.config import Duration, option, parse_duration


@dataclasses.dataclass(frozen=True)
class Demo:
    ENV_PREFIX = "DEMO"

    port: int = option(15010, "a port")
    ttl: Duration = option(Duration(3600), "a duration", env="MAX_TTL")
    names: tuple[str, ...] = option(["a/b"], "a list")
    flag: bool = option(False, "a switch")
    where: Path | None = option(None, "a path")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("30s", 30), ("1h30m", 5400), ("2160h", 2160 * 3600), ("90d", 90 * 86400), ("500ms", 0.5)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1x", "1h 2m", "-", "1h30"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_defaults() -> None:
    assert config.load(Demo, [], {}, prog="demo", description="") == Demo()


def test_precedence_flag_env_file(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("port: 1\nttl: 2h\nnames: [x/y, z/w]\nflag: true\n")
    from_file = config.load(Demo, ["--config", str(cfg_file)], {}, prog="demo", description="")
    assert (from_file.port, from_file.ttl, from_file.names, from_file.flag) == (1, 7200, ("x/y", "z/w"), True)
    env = {"DEMO_PORT": "2", "MAX_TTL": "3m", "DEMO_NAMES": "p/q,r/s", "DEMO_FLAG": "false"}
    from_env = config.load(Demo, ["--config", str(cfg_file)], env, prog="demo", description="")
    assert (from_env.port, from_env.ttl, from_env.names, from_env.flag) == (2, 180, ("p/q", "r/s"), False)
    from_flags = config.load(
        Demo,
        ["--config", str(cfg_file), "--port", "3", "--ttl", "4s", "--names", "m/n", "--flag"],
        env,
        prog="demo",
        description="",
    )
    assert (from_flags.port, from_flags.ttl, from_flags.names, from_flags.flag) == (3, 4, ("m/n",), True)


def test_config_file_from_env(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("port: 7\n")
    assert config.load(Demo, [], {"DEMO_CONFIG": str(cfg_file)}, prog="demo", description="").port == 7


@pytest.mark.parametrize(
    ("argv", "env", "file_text", "message"),
    [
        (["--port", "x"], {}, None, "argument --port: invalid"),
        ([], {"DEMO_PORT": "x"}, None, "environment variable DEMO_PORT"),
        ([], {"MAX_TTL": "soon"}, None, "environment variable MAX_TTL: invalid duration"),
        ([], {}, "nope: 1\n", "unknown key 'nope'"),
        ([], {}, "port: [1\n", "invalid YAML"),
        ([], {}, "- 1\n", "expected a mapping"),
    ],
)
def test_bad_values_exit_2_with_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    env: dict[str, str],
    file_text: str | None,
    message: str,
) -> None:
    if file_text is not None:
        (tmp_path / "c.yaml").write_text(file_text)
        argv = [*argv, "--config", str(tmp_path / "c.yaml")]
    with pytest.raises(SystemExit) as exit_info:
        config.load(Demo, argv, env, prog="demo", description="")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_every_ztd_flag_has_an_env_var_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    from xds_server.main import ZtdConfig

    with pytest.raises(SystemExit):
        config.load(ZtdConfig, ["--help"], {}, prog="ztd", description="")
    out = capsys.readouterr().out
    for field in dataclasses.fields(ZtdConfig):
        assert f"--{field.name.replace('_', '-')}" in out
        assert config.env_name(ZtdConfig, field) in out
    assert "env CA_TRUSTED_NODE_ACCOUNTS" in out and "env ZTD_XDS_PORT" in out


def test_a_percent_sign_in_an_option_text_does_not_break_help(capsys: pytest.CaptureFixture[str]) -> None:
    @dataclasses.dataclass(frozen=True)
    class Jitter:
        rekey: Duration = option(Duration(3600), "rekey this often (with 10% jitter)")

    with pytest.raises(SystemExit) as exit_info:
        config.load(Jitter, ["--help"], {}, prog="demo", description="")
    assert exit_info.value.code == 0
    assert "(with 10% jitter)" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["ztd", "ztctl", "zt-agent", "zt-bridge"])
def test_every_console_script_answers_help(script: str, capsys: pytest.CaptureFixture[str]) -> None:
    """What pyproject installs: each entry point's --help exits 0 and prints usage."""
    import importlib
    import tomllib

    target = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["scripts"][script]
    module, func = target.split(":")
    with pytest.raises(SystemExit) as exit_info:
        getattr(importlib.import_module(module), func)(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
