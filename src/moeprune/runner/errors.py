"""Errors of the runner and the image builder (all user-facing: MoepruneError subclasses)."""

from __future__ import annotations

from moeprune.errors import MoepruneError


class RunnerError(MoepruneError):
    """A stage could not be run by the chosen runner."""


class DockerUnavailableError(RunnerError):
    """The Docker engine cannot be reached (not installed, not running, wrong DOCKER_HOST)."""


class ImageNotFoundError(RunnerError):
    """The image the docker runner should use is not in the local engine."""


class StageFailedError(RunnerError):
    """The stage command ran and exited with a non-zero status."""

    def __init__(self, message: str, exit_code: int, log_tail: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.log_tail = log_tail


class ContainerKilledError(StageFailedError):
    """The stage's container was killed (SIGKILL/SIGTERM, OOM, removed) before it finished."""


class ImageBuildError(RunnerError):
    """Making the base image, the wheelhouse or the image itself failed."""
