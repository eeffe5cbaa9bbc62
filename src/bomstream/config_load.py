"""Reading the configuration: ``config.toml``, then ``BOMSTREAM_<SECTION>_<KEY>``,
then overrides (CLI flags), each value checked against its declared type;
then the whole checked by :mod:`bomstream.config_checks`."""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bomstream.config import DEFAULT_CONFIG_FILE, ENV_PREFIX, SECRET_KEYS, Config, ConfigError
from bomstream.config_checks import validate


def _section_types() -> dict[str, type[Any]]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _key_types(section_cls: type[Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _is_str_tuple(tp: Any) -> bool:
    return typing.get_origin(tp) is tuple


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Check a TOML value against the declared type (ints are fine where floats are)."""
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif _is_str_tuple(tp):
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{name}: expected a list of strings, got {_describe(value)}")
    if name in SECRET_KEYS:
        raise ConfigError(f"{name}: expected {_type_name(tp)}, got a {type(value).__name__}")
    raise ConfigError(f"{name}: expected {_type_name(tp)}, got {_describe(value)}")


def _parse_env(name: str, tp: Any, text: str) -> Any:
    """Environment values are strings; lists are comma-separated."""
    try:
        if tp is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(text)
        if tp is int:
            return int(text.strip())
        if tp is float:
            return float(text.strip())
        if _is_str_tuple(tp):
            return tuple(part.strip() for part in text.split(",") if part.strip())
        return text
    except ValueError:
        raise ConfigError(f"{name}: expected {_type_name(tp)}, got {text!r}") from None


def _type_name(tp: Any) -> str:
    if _is_str_tuple(tp):
        return "a list of strings"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        tp, str(tp)
    )


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    default_file: bool = True,
) -> Config:
    """Build the config from file, environment and overrides (``"server.port": 9000``).

    ``path=None`` reads ``./config.toml`` when it exists (unless ``default_file``
    is false), else the defaults.
    """
    env = os.environ if env is None else env
    sections = _section_types()
    values: dict[str, dict[str, Any]] = {name: {} for name in sections}

    file_data = _read_file(path) if path is not None or default_file else {}
    for section, table in file_data.items():
        if section not in sections:
            raise ConfigError(f"config: unknown section [{section}]")
        if not isinstance(table, dict):
            raise ConfigError(f"config: [{section}] must be a table")
        keys = _key_types(sections[section])
        for key, value in table.items():
            if key not in keys:
                raise ConfigError(f"{section}.{key}: unknown key")
            values[section][key] = _coerce(f"{section}.{key}", keys[key], value)

    for env_name, text in env.items():
        if not env_name.startswith(ENV_PREFIX):
            continue
        section, key = _split_env(env_name, sections)
        keys = _key_types(sections[section])
        values[section][key] = _parse_env(env_name, keys[key], text)

    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in sections or key not in _key_types(sections[section]):
            raise ConfigError(f"{dotted}: unknown key")
        if value is not None:
            keys = _key_types(sections[section])
            values[section][key] = _coerce(dotted, keys[key], value)

    cfg = Config(**{name: sections[name](**values[name]) for name in sections})
    validate(cfg)
    return cfg


def _read_file(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    if path is None:
        default = Path(DEFAULT_CONFIG_FILE)
        if not default.is_file():
            return {}
        path = default
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{os.fspath(path)}: cannot read config file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{os.fspath(path)}: not valid TOML ({exc})") from None


def _split_env(env_name: str, sections: dict[str, type[Any]]) -> tuple[str, str]:
    rest = env_name[len(ENV_PREFIX) :].lower()
    section, _, key = rest.partition("_")
    if section not in sections:
        raise ConfigError(f"{env_name}: unknown section {section!r}")
    if key not in _key_types(sections[section]):
        raise ConfigError(f"{env_name}: unknown key {section}.{key}")
    return section, key


def describe_keys() -> list[tuple[str, str, str]]:
    """(dotted key, env var, default) for every key, for docs and ``--help``."""
    rows = []
    defaults = Config()
    for section, cls in _section_types().items():
        for key in _key_types(cls):
            value = getattr(getattr(defaults, section), key)
            if isinstance(value, tuple):
                value = list(value)
            rows.append((f"{section}.{key}", f"{ENV_PREFIX}{section}_{key}".upper(), repr(value)))
    return rows
