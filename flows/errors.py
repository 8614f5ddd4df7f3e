"""User mistakes as one line: the exception the CLI turns into a message and exit code 2, and the
formatting of the mistakes it most often wraps (an unreadable file, bad YAML, a config that does not
validate).

A ``UserError`` is for what the user can fix by changing a path, a key, a value or a query; a bug in
stepforge stays an ordinary exception with its traceback. The heavy imports (yaml, pydantic) are
made inside the functions: the CLI imports this module before it knows what it will run.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError

MAX_ERRORS = 3  # a config with more mistakes than this is better fixed a few at a time than read in one line
MAX_INPUT_CHARS = 40


class UserError(Exception):
    """A mistake the user can fix. Its message is one line that names what is wrong (the file, key,
    run or query); the CLI prints it on stderr and exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(first_line(message))
        self.exit_code = exit_code


class ConfigError(UserError, ValueError):
    """A config file or config value that cannot be used. Also a ValueError, so code that validated a
    config and caught ValueError (pydantic's ValidationError is one) keeps working."""


def first_line(text: object) -> str:
    """The first non-empty line of ``text`` (libraries such as DuckDB put context on later lines)."""
    return next((line.strip() for line in str(text).splitlines() if line.strip()), str(text).strip())


def read_yaml(path: str | Path, what: str = "config") -> Any:
    """The parsed YAML document at ``path``; a missing or unreadable file, or a syntax error (with its
    1-based line and column), is a ConfigError naming the file."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} {path}: no such file") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{what} {path}: is a directory, not a file") from exc
    except PermissionError as exc:
        raise ConfigError(f"{what} {path}: not readable (permission denied)") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path}: not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot be read ({exc.strerror or exc})") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path}: {yaml_error_message(exc)}") from exc


def yaml_error_message(error: Exception) -> str:
    """A YAML error as one line with its 1-based line and column (PyYAML's own text spans several
    lines and quotes the document)."""
    import yaml

    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""  # marks count from 0
        return f"YAML syntax error{where}: {error.problem or error.context}"
    return f"YAML syntax error: {first_line(error)}"


def read_yaml_mapping(path: str | Path, what: str = "config") -> dict:
    """``read_yaml`` for files whose top level must be keys (an empty file is no keys)."""
    data = read_yaml(path, what)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: expected keys (a YAML mapping) at the top level, got {_kind(data)}")
    return data


def validation_message(error: ValidationError, model: type[BaseModel] | None = None) -> str:
    """A pydantic ValidationError as one line: each mistake's dotted key and pydantic's short message;
    an unknown key also names the closest valid key of ``model`` at that level."""
    errors = error.errors(include_url=False)
    parts = [_one_error(e, model) for e in errors[:MAX_ERRORS]]
    if len(errors) > MAX_ERRORS:
        parts.append(f"and {len(errors) - MAX_ERRORS} more")
    return "; ".join(parts)


def _one_error(error: dict, model: type[BaseModel] | None) -> str:
    loc = tuple(error.get("loc") or ())
    key = dotted(loc) or "(top level)"
    if error.get("type") == "extra_forbidden":
        message = f"{key}: unknown key"
        suggestion = _closest_key(model, loc)
        return f"{message}, did you mean {suggestion}?" if suggestion else message
    message = first_line(error.get("msg", "invalid value"))
    # A model validator's ValueError arrives as "Value error, <its message>": the prefix adds nothing.
    message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if error.get("type") != "missing" and "input" in error and not isinstance(error["input"], dict | list):
        shown = repr(error["input"])
        if len(shown) > MAX_INPUT_CHARS:
            shown = shown[: MAX_INPUT_CHARS - 1] + "…"
        message += f" (got {shown})"
    return f"{key}: {message}"


def dotted(loc: tuple) -> str:
    """``('rollout', 'samples', 0)`` as ``rollout.samples[0]``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _closest_key(model: type[BaseModel] | None, loc: tuple) -> str | None:
    """The dotted key of the field at ``loc``'s level whose name is closest to its last part."""
    if model is None or not loc or not isinstance(loc[-1], str):
        return None
    parent = _model_at(model, loc[:-1])
    if parent is None:
        return None
    names = list(parent.model_fields)
    aliases = [f.alias for f in parent.model_fields.values() if f.alias]
    match = difflib.get_close_matches(loc[-1], names + aliases, n=1, cutoff=0.6)
    return dotted((*loc[:-1], match[0])) if match else None


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model class that validates the value at ``loc`` (through optional sections and lists)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            current = _item_type(current)
        else:
            fields = getattr(current, "model_fields", None)
            if not fields or part not in fields:
                return None
            current = _model_in(fields[part].annotation)
        if current is None:
            return None
    return current if _is_model(current) else None


def _model_in(annotation: Any) -> Any:
    """The model (or list of models) inside ``X | None``; other types as they are."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        candidates = [a for a in typing.get_args(annotation) if a is not type(None)]
        models = [a for a in candidates if _is_model(a) or typing.get_origin(a) in (list, tuple)]
        return models[0] if len(models) == 1 else None
    return annotation


def _item_type(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return _model_in(args[0]) if args else None
    return None


def _is_model(value: Any) -> bool:
    from pydantic import BaseModel

    return isinstance(value, type) and issubclass(value, BaseModel)


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )
