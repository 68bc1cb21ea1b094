"""Where option values come from: flags > environment (ECHO_ASYNC_*) > TOML file > defaults.

Every error names where the bad value came from: `--port`, `ECHO_ASYNC_PORT`, or
`echo.toml: port`, so the one line a user sees points at the thing to fix.
"""

from __future__ import annotations

import codecs
import json
import math
import tomllib
from collections.abc import Mapping
from typing import Any

from echo_async.config import (
    ENVIRONMENT_PREFIX,
    OPTIONS,
    OPTIONS_BY_NAME,
    ConfigError,
    Option,
    ServiceConfig,
    build_service_config,
    option_flag,
)

CONFIG_ENVIRONMENT_VARIABLE = ENVIRONMENT_PREFIX + "CONFIG"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def load_service_config(
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    config_file: str | None = None,
) -> ServiceConfig:
    """Merge the sources, validate, and return the effective configuration.

    `flags` holds only the options given on the command line. `config_file` defaults to
    `$ECHO_ASYNC_CONFIG`. Raises ConfigError naming the source of the first bad value.
    """
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    path = config_file if config_file is not None else environ.get(CONFIG_ENVIRONMENT_VARIABLE)
    if path:
        for name, value in read_config_file(path).items():
            values[name] = value
            origin[name] = f"{path}: {name}"
    for name, value in environment_values(environ).items():
        values[name] = value
        origin[name] = OPTIONS_BY_NAME[name].environment_variable
    for name, value in flags.items():
        values[name] = value
        origin[name] = option_flag(name)
    try:
        return build_service_config(values)
    except ConfigError as error:
        if error.field is None:
            raise
        # The constructors name the field; say where the user wrote it (a default: its flag).
        raise error.renamed(origin.get(error.field, option_flag(error.field))) from None


def environment_values(environ: Mapping[str, str]) -> dict[str, Any]:
    """Option values from ECHO_ASYNC_<OPTION> variables, converted to each option's type."""
    values = {}
    for option in OPTIONS:
        text = environ.get(option.environment_variable)
        if text is not None:
            values[option.name] = parse_text(option, text, option.environment_variable)
    return values


def parse_text(option: Option, text: str, source: str) -> Any:
    """A string (from the environment) as the option's type."""
    text = text.strip()
    if option.kind is tuple:
        # Several values in one variable: separated by commas or whitespace.
        return tuple(part for part in text.replace(",", " ").split() if part)
    if option.kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(source, f"expected true or false, got {text!r}")
    if option.kind is int:
        try:
            return int(text, 10)
        except ValueError:
            raise ConfigError(source, f"expected an integer, got {text!r}") from None
    if option.kind is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(source, f"expected a number, got {text!r}") from None
    return text


def read_config_file(path: str) -> dict[str, Any]:
    """Option values from a TOML file of top-level `key = value` lines; unknown keys are errors."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        reason = (error.strerror or str(error)).lower()
        raise ConfigError("--config", f"cannot read {path}: {reason}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            "--config", f"{path} is not UTF-8 text ({_not_utf8(data, error)})"
        ) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError("--config", f"{path} is not valid TOML: {error}") from None
    values = {}
    for key, value in document.items():
        option = OPTIONS_BY_NAME.get(key)
        if option is None:
            hint = key.replace("-", "_")
            suggestion = f" (did you mean {hint}?)" if hint in OPTIONS_BY_NAME else ""
            raise ConfigError(f"{path}: {key}", f"unknown option{suggestion}")
        values[key] = _typed_file_value(option, value, f"{path}: {key}")
    return values


def _not_utf8(data: bytes, error: UnicodeDecodeError) -> str:
    """Where a file stops being UTF-8, and the likely reason when its start says."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "it is UTF-16; save it as UTF-8"
    line = data.count(b"\n", 0, error.start) + 1
    return f"byte 0x{data[error.start]:02x} on line {line}"


def _typed_file_value(option: Option, value: Any, source: str) -> Any:
    if option.kind is tuple:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ConfigError(source, f"expected a list of strings, got {value!r}")
        return tuple(value)
    if option.kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if option.kind is int and isinstance(value, bool):
        raise ConfigError(source, f"expected an integer, got {value!r}")
    if not isinstance(value, option.kind):
        raise ConfigError(source, f"expected {option.kind.__name__}, got {value!r}")
    return value


def render_toml(config: ServiceConfig) -> str:
    """The effective configuration as a TOML file that `--config` reads back unchanged."""
    lines = ["# echo-async effective configuration (flags > environment > file > defaults)"]
    for option in OPTIONS:
        source = config.server if option.scope == "server" else config
        lines.append(f"{option.name} = {_toml_value(getattr(source, option.name))}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else "inf"
    if isinstance(value, int):
        return str(value)
    # JSON string escapes are valid TOML basic-string escapes once non-ASCII text stays as it
    # is (TOML rejects JSON's surrogate pairs) and DEL, which TOML forbids raw, is escaped.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
