"""Connecting to the Docker engine and describing images (shared by the runner and the builder)."""

from __future__ import annotations

import os
from typing import Any

from moeprune.runner.errors import DockerUnavailableError, ImageNotFoundError

DEFAULT_SOCKET = "unix:///var/run/docker.sock"
CONNECT_TIMEOUT_S = 60


def docker_host() -> str:
    """Where the Docker SDK will look for the engine ($DOCKER_HOST or the default socket)."""
    return os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET


def connect(timeout_s: int = CONNECT_TIMEOUT_S) -> Any:
    """A ``docker.DockerClient`` connected to a live engine.

    Raises DockerUnavailableError (naming DOCKER_HOST and what to do) when the SDK is missing or
    the engine does not answer a ping.
    """
    try:
        import docker
        from docker.errors import DockerException
    except ImportError:
        raise DockerUnavailableError(
            "the 'docker' Python package is not installed; `pip install docker` "
            "or use --runner native"
        ) from None
    where = docker_host()
    try:
        client = docker.from_env(timeout=timeout_s)
        client.ping()
    except (DockerException, OSError) as exc:
        raise DockerUnavailableError(
            f"cannot reach the Docker engine at {where} ({_first_line(exc)}). Start it "
            "(`sudo systemctl start docker`, or `sudo dockerd &`), fix $DOCKER_HOST, "
            "or use --runner native"
        ) from None
    return client


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def get_image(client: Any, ref: str) -> Any:
    """The local image ``ref`` (tag or id); ImageNotFoundError says how to build it."""
    from docker.errors import ImageNotFound

    try:
        return client.images.get(ref)
    except ImageNotFound:
        raise ImageNotFoundError(
            f"Docker image '{ref}' is not in the local engine ({docker_host()}). Build it with "
            "`invoke docker.build` (CUDA) or `invoke docker.build --cpu` (CPU test image), "
            "or set [runner] image in the recipe to an image you have"
        ) from None


def image_record(image: Any, ref: str) -> dict[str, Any]:
    """What the manifest records about an image: the ref asked for, its id and repo digests.

    ``id`` is the content hash of the image config (stable for a given build); ``repo_digests``
    is filled only for images pulled from or pushed to a registry.
    """
    labels = image.labels or {}
    return {
        "ref": ref,
        "id": image.id,
        "repo_digests": sorted(image.attrs.get("RepoDigests") or []),
        "tags": sorted(image.tags),
        "labels": {k: v for k, v in sorted(labels.items()) if k.startswith("moeprune.")},
    }
