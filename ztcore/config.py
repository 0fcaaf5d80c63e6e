"""One configuration path for every command: a frozen dataclass is the schema.

Each field is a flag (`--xds-port`), an environment variable (`ZTD_XDS_PORT`, or an Istio name such as
`CA_TRUSTED_NODE_ACCOUNTS` where Istio has one) and a key of the optional `--config FILE` YAML
(`xds-port:` or `xds_port:`). Precedence: flag > environment > file > default. A bad value anywhere ends
the program with exit code 2 and one line naming where the value came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit code 2), pointing at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_duration(text: str) -> float:
    """Seconds from "90", "30s", "1h30m", "2160h", "90d" or "500ms"."""
    value = text.strip()
    if not value:
        raise ValueError("empty duration")
    try:
        return float(value)
    except ValueError:
        pass
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(value):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(value) or pos == 0:
        raise ValueError(f"invalid duration {text!r} (use e.g. 90s, 15m, 24h, 90d)")
    return total


class Duration(float):
    """Marker type: a duration in seconds, written as 24h / 90d / 500ms in flags, env and files."""


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"invalid boolean {text!r}")


def option(
    default: Any,
    help: str,
    *,
    env: str | None = None,
    metavar: str | None = None,
    choices: Sequence[str] | None = None,
    short: str | None = None,
    positional: bool = False,
    env_aliases: Sequence[str] = (),
) -> Any:
    """Declare a configuration field. `env` overrides the derived variable name; `env_aliases` are read when
    that one is unset (e.g. Kubernetes' POD_NAMESPACE); a positional field is a command-line argument only
    (e.g. `ztctl token create NS/SA`)."""
    meta = {
        "help": help,
        "env": env,
        "metavar": metavar,
        "choices": choices,
        "short": short,
        "positional": positional,
        "env_aliases": tuple(env_aliases),
    }
    if isinstance(default, list | dict):
        frozen = tuple(default) if isinstance(default, list) else default
        return dataclasses.field(default_factory=lambda: frozen, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _converter(tp: Any) -> tuple[Callable[[str], Any], str]:
    """(converter from text, kind) for a field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        conv, kind = _converter(args[0])
        return (lambda s: None if s == "" else conv(s)), kind
    if origin is tuple or tp is tuple:
        return (lambda s: tuple(_split_list(s))), "list"
    if tp is bool:
        return _parse_bool, "bool"
    if tp is int:
        return int, "scalar"
    if tp is float:
        return float, "scalar"
    if tp is Duration:
        return (lambda s: Duration(parse_duration(s))), "scalar"
    if tp is Path:
        return Path, "scalar"
    return str, "scalar"


def _from_file_value(value: Any, conv: Callable[[str], Any], kind: str) -> Any:
    if kind == "list":
        if isinstance(value, list):
            return tuple(str(v) for v in value)
        return conv(str(value))
    if kind == "bool" and isinstance(value, bool):
        return value
    return conv(str(value))


def env_name(cls: type[Any], field: dataclasses.Field[Any]) -> str:
    explicit = field.metadata.get("env")
    if explicit:
        return str(explicit)
    prefix = getattr(cls, "ENV_PREFIX", "ZT")
    return f"{prefix}_{field.name.upper()}"


def add_arguments(cls: type[Any], parser: argparse.ArgumentParser) -> None:
    """Flags for every field of `cls`; defaults are suppressed so precedence can be applied after."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init or field.name.startswith("_"):
            continue
        conv, kind = _converter(hints[field.name])
        if field.metadata.get("positional"):
            parser.add_argument(
                field.name,
                type=_typed(conv, field.name),
                metavar=field.metadata.get("metavar"),
                help=str(field.metadata.get("help", "")).replace("%", "%%"),
            )
            continue
        flag = "--" + field.name.replace("_", "-")
        names = [flag] + ([field.metadata["short"]] if field.metadata.get("short") else [])
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = None
        shown = ",".join(default) if isinstance(default, tuple) else default
        envs = " or ".join((env_name(cls, field), *field.metadata.get("env_aliases", ())))
        # argparse %-formats help strings: a literal "10%" in an option's text must not break --help
        help_text = f"{field.metadata.get('help', '')} [env {envs}; default {shown!s}]".replace("%", "%%")
        common: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS, "help": help_text}
        if kind == "bool":
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **common)
        elif kind == "list":
            parser.add_argument(*names, action="append", metavar=field.metadata.get("metavar") or "VALUE", **common)
        else:
            parser.add_argument(
                *names,
                type=_typed(conv, flag),
                metavar=field.metadata.get("metavar"),
                choices=field.metadata.get("choices"),
                **common,
            )


def _typed(conv: Callable[[str], Any], flag: str) -> Callable[[str], Any]:
    def run(text: str) -> Any:
        try:
            return conv(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    run.__name__ = flag
    return run


def resolve(
    cls: type[T],
    parsed: argparse.Namespace,
    environ: Mapping[str, str],
    fail: Callable[[str], NoReturn],
    config_file: Path | None = None,
) -> T:
    """Apply flag > env > file > default for every field of `cls` and build the frozen config."""
    hints = typing.get_type_hints(cls)
    schema: Any = cls
    file_values: dict[str, Any] = {}
    if config_file is not None:
        file_values = _read_config_file(config_file, fail)
    known = {f.name for f in dataclasses.fields(schema)}
    for key in file_values:
        if key.replace("-", "_") not in known:
            fail(f"{config_file}: unknown key {key!r}")
    values: dict[str, Any] = {}
    for field in dataclasses.fields(schema):
        if not field.init or field.name.startswith("_"):
            continue
        conv, kind = _converter(hints[field.name])
        var = next(
            (v for v in (env_name(cls, field), *field.metadata.get("env_aliases", ())) if v in environ),
            env_name(cls, field),
        )
        if hasattr(parsed, field.name):
            raw = getattr(parsed, field.name)
            if kind == "list":
                raw = tuple(item for chunk in raw for item in _split_list(chunk))
            values[field.name] = raw
        elif var in environ:
            try:
                values[field.name] = conv(environ[var])
            except ValueError as err:
                fail(f"environment variable {var}: {err}")
        else:
            for key in (field.name.replace("_", "-"), field.name):
                if key in file_values:
                    try:
                        values[field.name] = _from_file_value(file_values[key], conv, kind)
                    except ValueError as err:
                        fail(f"{config_file}: {key}: {err}")
                    break
        choices = field.metadata.get("choices")
        if choices and field.name in values and values[field.name] not in choices:
            fail(f"{field.name.replace('_', '-')}: {values[field.name]!r} is not one of {', '.join(choices)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        fail(str(err))


def _read_config_file(path: Path, fail: Callable[[str], NoReturn]) -> dict[str, Any]:
    import yaml  # only with --config: the daemons that take flags alone never load it (1.4 MiB resident)

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        fail(f"cannot read config file {path}: {err.strerror}")
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        fail(f"{path}{where}: invalid YAML")
    if data is None:
        return {}
    if not isinstance(data, dict):
        fail(f"{path}: expected a mapping of option names to values")
    return {str(k): v for k, v in data.items()}


def load(
    cls: type[T],
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    prog: str,
    description: str,
) -> T:
    """Parse a whole command line for a single-command program."""
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, default=None, help="YAML file of option values (keys = flag names)")
    add_arguments(cls, parser)
    parsed = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    env = os.environ if environ is None else environ
    config_var = f"{getattr(cls, 'ENV_PREFIX', 'ZT')}_CONFIG"
    config_file = parsed.config or (Path(env[config_var]) if env.get(config_var) else None)
    return resolve(cls, parsed, env, parser.error, config_file)
