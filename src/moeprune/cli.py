"""The one mechanism behind every task of ``tasks.py``: typed flags, user errors, ``--runner``.

``@moeprune_task(...)`` replaces invoke's ``@task`` for moeprune's tasks. Around the task body it

1. converts each flag to the type annotated on the task's parameter (``int``, ``float``,
   ``Path``, a ``Literal[...]`` of choices; invoke itself passes strings), so a bad value fails
   with one line naming the flag (``error: --keep-count: expected an integer, got 'abc'``);
2. for a task with a ``runner`` parameter (a stage task), resolves ``--runner`` (default: the
   recipe's ``[runner] kind``) and, for ``docker``, runs the same task with the same flags in the
   pinned image instead of here (inside the image it always runs here);
3. for a task that writes a run (``run_of``), holds the run's writer lock around all of it,
   dispatch to the image included (:mod:`moeprune.runlock`); such a task has a ``--wait`` flag,
   which the lock consumes: without it a second writer fails at once, naming the holder;
4. prints what the body returns (a :class:`TaskResult`) and turns a failed result or a
   ``MoepruneError`` into ``invoke.Exit`` with its message, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from invoke import Exit, task

from moeprune.errors import MoepruneError


@dataclass(frozen=True)
class TaskResult:
    """What a task prints: summary lines, and a failure message when its check failed."""

    lines: tuple[str, ...] = ()
    failure: str | None = None
    data: Any = field(default=None, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        return self.failure is None

    def __str__(self) -> str:
        return "\n".join(self.lines)


class FlagError(MoepruneError):
    """A command-line flag whose value does not have the flag's type."""


def flag_name(param: str) -> str:
    """The command-line spelling of a task parameter, as invoke derives it (``from_`` -> ``--from``)."""
    return "--" + param.strip("_").replace("_", "-")


_TYPE_WORDS = {int: "an integer", float: "a number", Path: "a path", str: "a string"}


def convert_flag(param: str, value: Any, annotation: Any) -> Any:
    """``value`` (a string from invoke, or the default) as ``annotation``; FlagError if it is not."""
    if value is None or isinstance(value, bool):
        return value
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        annotation = options[0] if len(options) == 1 else str
        args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        if value not in args:
            raise FlagError(f"{flag_name(param)}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if annotation in (int, float):
        try:
            return annotation(value)
        except (TypeError, ValueError):
            raise FlagError(f"{flag_name(param)}: expected {_TYPE_WORDS[annotation]}, got {value!r}") from None
    if annotation is Path:
        return Path(value).expanduser()
    return value


def _hints(func: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(func)
    except Exception:  # an annotation that cannot be evaluated: leave values as invoke gave them
        return {}


def task_argv(name: str, func: Callable[..., Any], values: dict[str, Any], skip: Sequence[str] = ("runner",)) -> list[str]:
    """The command line (after ``invoke``) that runs task ``name`` with ``values`` again.

    Flags equal to their default are left out; paths become absolute (the container runs in the
    caller's working directory, but spelling them out keeps the command unambiguous).
    """
    argv = [name]
    for param in list(inspect.signature(func).parameters)[1:]:  # [0] is invoke's context
        if param in skip:
            continue
        default = inspect.signature(func).parameters[param].default
        value = values.get(param, default)
        if value is None or value == default:
            continue
        if isinstance(value, bool):
            argv.append(flag_name(param) if value else "--no-" + flag_name(param)[2:])
            continue
        if isinstance(value, Path):
            value = value.resolve()
        argv += [flag_name(param), str(value)]
    return argv


def _run_in_image(name: str, func: Callable[..., Any], values: dict[str, Any], load_recipe: Callable[..., Any]) -> bool:
    """With docker as the runner, run the task in the image and return True; else False."""
    from moeprune.runner import Mount, get_runner, in_container, recipe_mounts

    recipe = load_recipe(values.get("recipe"))
    kind = values.get("runner") or recipe.runner.kind
    if kind == "native" or in_container():
        return False
    argv = task_argv(name, func, {**values, "recipe": recipe.source_path})
    # Paths given as flags (--base, --out, ...) are mounted at the same place, as the recipe's are.
    flagged = [Path(v).resolve() for key, v in values.items() if isinstance(v, Path) and key != "recipe"]
    extra = [Mount(path if path.exists() else path.parent) for path in flagged]
    from moeprune.runlock import child_env

    get_runner(kind, recipe).run_stage(argv, mounts=[*recipe_mounts(recipe), *extra], env=child_env())
    return True


def _writer_lock(task_name: str, values: dict[str, Any], run_of: Callable[[dict[str, Any]], Any] | None) -> Any:
    """The run's writer lock for a task that writes one (``run_of(values)`` is its RunLayout)."""
    wait = bool(values.pop("wait", False))
    layout = run_of(values) if run_of is not None else None
    from moeprune.profile.parallel import current_world

    # Ranks other than 0 of a torchrun-launched profile write nothing; rank 0 holds the lock.
    if layout is None or not current_world().is_root:
        return contextlib.nullcontext()
    from moeprune.runlock import run_writer

    return run_writer(layout, f"invoke {task_name}", wait=wait)


def moeprune_task(
    name: str | None = None,
    help: dict[str, str] | None = None,
    load_recipe: Callable[..., Any] | None = None,
    run_of: Callable[[dict[str, Any]], Any] | None = None,
    **task_kwargs: Any,
) -> Callable[[Callable[..., Any]], Any]:
    """``@task`` with typed flags, clean user errors and (for tasks with ``runner``) ``--runner``.

    ``load_recipe(path_or_None)`` loads the recipe a ``--runner`` decision reads. ``run_of(flags)``,
    for a task that writes a run, gives that run's ``RunLayout`` (None: no run to hold); the task
    must then have a ``wait: bool = False`` parameter (the lock's ``--wait``; the body never sees it).
    """

    def decorate(func: Callable[..., Any]) -> Any:
        task_name = name or func.__name__.strip("_").replace("_", "-")
        params = inspect.signature(func).parameters
        dispatches = "runner" in params
        if run_of is not None and "wait" not in params:
            raise TypeError(f"task {task_name} writes a run: it needs a `wait: bool = False` parameter (--wait)")

        @functools.wraps(func)
        def wrapper(c: Any, *args: Any, **kwargs: Any) -> Any:
            hints = _hints(func)
            try:
                bound = inspect.signature(func).bind(c, *args, **kwargs)
                values = {key: convert_flag(key, value, hints.get(key, Any))
                          for key, value in list(bound.arguments.items())[1:]}
                with _writer_lock(task_name, values, run_of):
                    if dispatches and load_recipe is not None and _run_in_image(task_name, func, values, load_recipe):
                        return None
                    result = func(c, **values)
            except MoepruneError as exc:
                raise Exit(f"error: {exc}", code=1) from None
            if isinstance(result, TaskResult):
                if result.lines:
                    print(result)
                if not result.ok:
                    raise Exit(f"error: {result.failure}", code=1)
            return None

        return task(wrapper, name=task_name, help=help or {}, **task_kwargs)

    return decorate
