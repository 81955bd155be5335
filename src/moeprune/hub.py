"""Hugging Face Hub helpers shared by publish and verify: endpoint, token, redaction, repo ids.

One place for how moeprune talks to the Hub, so publish.py and verify.py need not import each
other. The token comes from an explicit value, else ``$HF_TOKEN``, else the saved ``hf auth login``;
it is passed to ``HfApi`` explicitly and removed from every message shown to a user.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DEFAULT_ENDPOINT = "https://huggingface.co"
_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{8,}")
# A Hub repo id: "name" or "owner/name", letters, digits, '-', '_', '.' (no '--' or '..').
_REPO_ID_PATTERN = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def resolve_endpoint(endpoint: str | None = None) -> str:
    """Explicit endpoint, else $HF_ENDPOINT, else https://huggingface.co (no trailing slash)."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def resolve_token(token: str | None = None) -> str | None:
    """Explicit token, else $HF_TOKEN, else the token saved by `hf auth login`."""
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from huggingface_hub import get_token

    return get_token()


def redact(text: str, token: str | None) -> str:
    """Remove the token (and anything shaped like an HF token) from a message."""
    if token:
        text = text.replace(token, "***")
    return _TOKEN_PATTERN.sub("hf_***", text)


def looks_like_local_path(target: str) -> bool:
    """True for what a user means as a local path: absolute, ~, ./ or ../, a trailing slash,
    a path separator other than the one '/' of "owner/name", or a name that exists on disk."""
    if not target:
        return True
    if target.startswith(("/", "~", ".", "\\")) or target.endswith(("/", "\\")) or "\\" in target:
        return True
    if target.count("/") > 1 or os.sep != "/" and os.sep in target:
        return True
    if Path(target).expanduser().exists():
        return True
    # The first component existing locally ("runs/demoo" when runs/ exists) is a mistyped path.
    first = target.split("/", 1)[0]
    return "/" in target and Path(first).is_dir()


def is_hub_repo_id(target: str) -> bool:
    """A Hub repo id ("owner/name") that cannot be read as a local path."""
    return (
        not looks_like_local_path(target)
        and bool(_REPO_ID_PATTERN.match(target))
        and "--" not in target
        and ".." not in target
        and not target.endswith(".git")
    )
