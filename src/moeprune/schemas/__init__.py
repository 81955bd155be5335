"""Validation of JSON artifacts against the project's JSON Schemas (``schemas/<name>.schema.json``
at the repository's top level; an installed wheel carries the same bytes, see
:mod:`moeprune.resources`)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema

from moeprune.errors import MoepruneError
from moeprune.resources import data_dir

SCHEMA_DIR = data_dir("schemas")


class SchemaError(MoepruneError):
    """A JSON artifact that does not match its schema."""


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict[str, Any]:
    """Load ``schemas/<name>.schema.json``."""
    path = SCHEMA_DIR / f"{name}.schema.json"
    if not path.is_file():
        raise SchemaError(f"schema '{name}' not found at {path}")
    return json.loads(path.read_text(encoding="utf-8"))


def validate(name: str, data: Any, source: str | Path = "<data>") -> None:
    """Validate ``data`` against schema ``name``; raise SchemaError naming the file and field."""
    schema = load_schema(name)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for err in errors[:10]:
            field = "/".join(str(p) for p in err.absolute_path) or "<root>"
            lines.append(f"{field}: {err.message}")
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise SchemaError(
            f"{source}: does not match schemas/{name}.schema.json:\n  - " + "\n  - ".join(lines) + more
        )


def validate_file(name: str, path: Path) -> Any:
    """Read a JSON file and validate it; return the data."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SchemaError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{path}: not valid JSON: {exc}") from None
    validate(name, data, source=path)
    return data
