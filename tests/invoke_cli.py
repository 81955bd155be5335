"""The one way tests run ``invoke TASK ...``: as a subprocess, or in this process.

A subprocess (``python -m invoke``, cwd = the checkout) is the real entry point: use it where the
entry point is what is tested (exit codes, one-line errors without a traceback, signals, locks,
resource limits, a checkout at another path). In-process runs the same task collection
(``tasks.ns``) through invoke's own ``Program``, with the environment and working directory set
for the call and stdout/stderr captured; it saves the interpreter start and the imports (seconds
per call) where the command's result is what is tested, not how it was started. An exception that
is not an ``invoke.Exit`` propagates, so a NameError still fails the test.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: str, env: Mapping[str, str] | None = None, cwd: Path = ROOT, timeout: float = 900,
           in_process: bool = False, inherit_env: bool = True,
           preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    """Run ``invoke *args``; return its exit code, stdout and stderr.

    ``env`` is added to this process's environment (or, with ``inherit_env=False``, is the whole
    environment of the subprocess)."""
    if in_process:
        assert inherit_env and preexec_fn is None, "in-process runs share this process's environment and limits"
        return _in_process(list(args), dict(env or {}), cwd)
    full_env = {**(os.environ if inherit_env else {}), "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=preexec_fn)


def _in_process(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    from invoke import Program

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import tasks

    saved_env, saved_cwd = dict(os.environ), Path.cwd()
    out, err = io.StringIO(), io.StringIO()
    code = 0
    os.environ.update(env)
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                # A copy: parsing pops each task's help texts, which would leave the module's
                # tasks without them for every later run and for tests that read them.
                Program(namespace=copy.deepcopy(tasks.ns)).run(["invoke", *args])
            except SystemExit as exc:  # Program.run exits with the task's code on invoke.Exit
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess(["invoke", *args], code, out.getvalue(), err.getvalue())


def invoke_ok(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """:func:`invoke` that must exit 0 (the failure shows the end of both streams)."""
    result = invoke(*args, **kwargs)
    assert result.returncode == 0, f"invoke {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result
