"""Reading a file the user wrote or pointed at: one line naming the file (and line) on any failure.

Recipes, calibration prompts, a base model's ``config.json``, a drop map given with
``--drop-map``: each is read here, so a missing file, a directory, an unreadable file, a byte that
is not UTF-8 or malformed JSON ends in one :class:`UserFileError` saying which file, where and what
to do, never in a ``UnicodeDecodeError`` traceback from deep inside a stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moeprune.errors import MoepruneError


class UserFileError(MoepruneError):
    """A user-supplied file that cannot be read as the text or JSON it must be."""


def read_text(path: Path, what: str, error: type[MoepruneError] = UserFileError) -> str:
    """The file's text, decoded as UTF-8; ``what`` says what the file is (e.g. "recipe")."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: {what} is a directory, not a file") from None
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise error(
            f"{path}:{line}: the {what} is not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None


def read_json(path: Path, what: str, error: type[MoepruneError] = UserFileError) -> Any:
    """The file's JSON value (see :func:`read_text`); errors name the line and column."""
    text = read_text(path, what, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path}:{exc.lineno}: the {what} is not valid JSON ({exc.msg}, column {exc.colno}); "
                    "fix it or restore the original file") from None


def read_json_object(path: Path, what: str, error: type[MoepruneError] = UserFileError) -> dict[str, Any]:
    """:func:`read_json`, refusing anything but a JSON object."""
    value = read_json(path, what, error)
    if not isinstance(value, dict):
        raise error(f"{path}: the {what} must be a JSON object, not {type(value).__name__}")
    return value


def read_yaml(path: Path, what: str, error: type[MoepruneError] = UserFileError) -> Any:
    """The file's YAML value (see :func:`read_text`). Tags (lm-eval's ``!function``) are accepted
    and read as None: the check is that the file parses, as lm-eval would otherwise skip it silently."""
    import yaml

    class _AnyTagLoader(yaml.SafeLoader):
        pass

    _AnyTagLoader.add_multi_constructor("!", lambda loader, suffix, node: None)
    text = read_text(path, what, error)
    try:
        return yaml.load(text, Loader=_AnyTagLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{path}{line}: the {what} is not valid YAML ({problem}); fix it") from None
