"""Why an evaluation failed: :class:`EvalError`, and a server death, timeout or lost connection
told apart from an internal error, so the user reads what to change."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from typing import Any

from moeprune.errors import MoepruneError


class EvalError(MoepruneError):
    """An evaluation that cannot start or did not complete."""



def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _server_exit_code(server: Any) -> int | None:
    """Exit code of the server process when it has exited, else None (alive or unknown)."""
    process = getattr(server, "process", None)
    wait = getattr(process, "wait", None)
    if not callable(wait):
        return None
    try:
        # A dropped connection often arrives a moment before the process is reaped.
        return wait(timeout=2.0)
    except subprocess.TimeoutExpired:
        return None


def classify_failure(exc: BaseException, server: Any, timeout_s: float, max_retries: int) -> str | None:
    """A user-facing reason for a failed eval, or None for an unexpected (internal) error."""
    import aiohttp
    import requests

    exit_code = _server_exit_code(server)
    if exit_code is not None:
        check_alive = getattr(server, "check_alive", None)
        if callable(check_alive):  # LlamaServer explains the death and quotes its log
            try:
                check_alive()
            except MoepruneError as err:
                return f"llama-server exited with code {exit_code} during the evaluation: {err}"
        return f"llama-server exited with code {exit_code} during the evaluation (see its log)"
    for item in _chain(exc):
        if isinstance(item, (TimeoutError, asyncio.TimeoutError, requests.Timeout, aiohttp.ServerTimeoutError)):
            return (
                f"a request timed out (eval.request_timeout_s = {timeout_s:g} s, tried "
                f"eval.max_retries = {max_retries} time(s)); raise the timeout, or lower "
                "eval.max_gen_toks / serve.reasoning_budget"
            )
        if isinstance(item, (aiohttp.ClientConnectionError, requests.ConnectionError)):
            return f"the connection to llama-server was lost ({type(item).__name__}: {item})"
        if isinstance(item, (aiohttp.ClientResponseError, requests.HTTPError)):
            return f"llama-server answered with an HTTP error ({item})"
    return None
