"""moeprune tasks. Run `invoke --list` for the list, `invoke --help TASK` for a task's flags.

Each task is thin: it parses its flags, loads the recipe, and calls one function of
``src/moeprune``. Every user-facing failure arrives as ``MoepruneError`` and leaves as
``invoke.Exit`` with its message, never as a traceback.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from invoke import Collection, Exit, task

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "src"))  # usable from a source tree even before `pip install -e .`

from moeprune.errors import MoepruneError  # noqa: E402
from moeprune.recipe import Recipe, load_recipe  # noqa: E402

DEFAULT_RECIPE = "recipes/demo.toml"
RECIPE_HELP = f"Recipe TOML file (default: {DEFAULT_RECIPE})."


def user_errors(func):
    """Turn MoepruneError into a clean `Exit` with the message and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except MoepruneError as exc:
            raise Exit(f"error: {exc}", code=1) from None

    return wrapper


def _recipe(path: str | None, check_inputs: bool = True) -> Recipe:
    """Load --recipe (relative to the working directory), or the demo recipe by default."""
    return load_recipe(Path(path) if path else ROOT / DEFAULT_RECIPE, check_inputs=check_inputs)


@task(help={"k": "Only tests matching this pytest -k expression.", "fast": "Skip tests marked slow."})
def test(c, k="", fast=False):
    """Run the test suite (pytest)."""
    args = [sys.executable, "-m", "pytest", "tests"]
    if k:
        args += ["-k", repr(k)]
    if fast:
        args += ["-m", "'not slow'"]
    c.run(" ".join(args), pty=False)


@task
@user_errors
def schema(c):
    """Regenerate schemas/recipe.schema.json from the typed recipe model."""
    from moeprune.atomic import write_json
    from moeprune.recipe import recipe_json_schema

    target = ROOT / "schemas" / "recipe.schema.json"
    write_json(target, recipe_json_schema())
    print(f"wrote {target.relative_to(ROOT)}")


@task(help={"recipe": RECIPE_HELP})
@user_errors
def check(c, recipe=None):
    """Validate a recipe and its inputs without running anything."""
    loaded = _recipe(recipe)
    print(f"recipe '{loaded.name}' is valid ({loaded.source_path})")


ns = Collection(test, schema, check)
