"""Run a stage command inside the moeprune image, through the Docker SDK.

The container runs ``invoke <argv...>`` (the image's entry point is ``invoke``) as the calling
user's uid:gid, so the files it writes belong to the caller; host paths are bind-mounted at the
same absolute paths and the working directory is the caller's, so the command line and the
outputs are the same as in a native run. ``HF_TOKEN`` travels in the container's environment
only: it is redacted from every line streamed, logged or put in an error. The container is
removed afterwards whatever happens (success, failure, kill, Ctrl-C).
"""

from __future__ import annotations

import codecs
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moeprune.runner.base import (
    SECRET_ENV_VARS,
    LogSink,
    Mount,
    Runner,
    RunnerResult,
    Stream,
    _print_line,
    redact,
    secret_values,
)
from moeprune.runner.engine import connect, docker_host, get_image, image_record
from moeprune.runner.errors import ContainerKilledError, RunnerError, StageFailedError

RUNNER_LABEL = "moeprune.runner"
STAGE_LABEL = "moeprune.stage"
KILL_EXIT_CODES = {137: "SIGKILL", 143: "SIGTERM"}
GPU_PROBE_TIMEOUT_S = 30


def gpu_present() -> bool:
    """True when this host shows an NVIDIA GPU (``nvidia-smi -L`` lists one)."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=GPU_PROBE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and "GPU" in result.stdout


def merge_mounts(mounts: Sequence[Mount]) -> list[Mount]:
    """One mount per container path (read-write wins), dropping those already covered by a
    parent mount of the same mode; sorted parents first."""
    by_target: dict[str, Mount] = {}
    for mount in mounts:
        target = mount.container_path
        known = by_target.get(target)
        if known is None or (known.read_only and not mount.read_only):
            by_target[target] = Mount(Path(mount.source).resolve(), target, mount.read_only)
    kept = []
    for target, mount in sorted(by_target.items()):
        covered = any(
            other_target != target
            and target.startswith(other_target.rstrip("/") + "/")
            and other.read_only == mount.read_only
            and Path(mount.source) == Path(other.source) / Path(target).relative_to(other_target)
            for other_target, other in by_target.items()
        )
        if not covered:
            kept.append(mount)
    return kept


class DockerRunner(Runner):
    """Runs stage commands in containers of ``image`` (a local tag or image id)."""

    kind = "docker"

    def __init__(self, image: str, mounts: Sequence[Mount] = (), workdir: Path | None = None,
                 env: Mapping[str, str] | None = None, gpus: bool | None = None,
                 client: Any | None = None, entrypoint: Sequence[str] | None = None) -> None:
        """``gpus``: request all GPUs (True), none (False) or whatever this host has (None).
        ``entrypoint`` replaces the image's ``invoke`` (diagnostics and tests only)."""
        super().__init__(mounts=mounts, workdir=workdir, env=env)
        self.image = image
        self.gpus = gpus
        self.entrypoint = list(entrypoint) if entrypoint else None
        self._client = client
        self._image_record: dict[str, Any] | None = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = connect()
        return self._client

    def describe(self) -> dict[str, Any]:
        """``{"kind": "docker", "image": {ref, id, repo_digests, tags, labels}, "engine": ...}``."""
        if self._image_record is None:
            self._image_record = image_record(get_image(self.client, self.image), self.image)
        return {"kind": self.kind, "image": self._image_record, "docker_host": docker_host()}

    def container_spec(self, argv: Sequence[str], mounts: Sequence[Mount], env: Mapping[str, str]) -> dict[str, Any]:
        """Keyword arguments of ``client.containers.create`` for one stage (no secrets logged)."""
        from docker.types import DeviceRequest
        from docker.types import Mount as DockerMount

        merged = merge_mounts([*self.mounts, *mounts])
        for mount in merged:
            if not mount.read_only:
                Path(mount.source).mkdir(parents=True, exist_ok=True)
            elif not Path(mount.source).exists():
                raise RunnerError(f"{mount.source}: does not exist, cannot be mounted into the stage's container")
        environment = {name: os.environ[name] for name in SECRET_ENV_VARS if os.environ.get(name)}
        environment |= {**self.env, **env}
        use_gpus = gpu_present() if self.gpus is None else self.gpus
        stage = (self.entrypoint or argv or ["invoke"])[0]
        stage = re.sub(r"[^a-zA-Z0-9_.-]+", "-", Path(stage).name).strip("-.")[:40] or "stage"
        spec: dict[str, Any] = {
            "command": list(argv),
            "name": f"moeprune-{stage}-{uuid.uuid4().hex[:8]}",
            "labels": {RUNNER_LABEL: "docker", STAGE_LABEL: stage},
            "user": f"{os.getuid()}:{os.getgid()}",
            "working_dir": str(self._workdir()),
            "environment": environment,
            "mounts": [DockerMount(target=m.container_path, source=str(m.source), type="bind",
                                   read_only=m.read_only) for m in merged],
            "init": True,  # tini as PID 1: signals reach the stage, zombies are reaped
            "detach": True,
        }
        if use_gpus:
            spec["device_requests"] = [DeviceRequest(count=-1, capabilities=[["gpu"]])]
        if self.entrypoint:
            spec["entrypoint"] = self.entrypoint
        return spec

    def shell_command(self, shell: str = "bash") -> list[str]:
        """A ``docker run -it`` command line for an interactive shell with the stage's mounts,
        user and environment. Secrets are passed by name only (``-e HF_TOKEN``: the docker CLI
        copies the value from its own environment), so they never appear on a command line."""
        image = self.describe()["image"]
        spec = self.container_spec([], [], {})
        command = ["docker", "run", "--rm", "-it", "--init", "--user", spec["user"],
                   "--workdir", spec["working_dir"], "--label", f"{RUNNER_LABEL}=shell"]
        for mount in spec["mounts"]:
            option = f"type=bind,source={mount['Source']},target={mount['Target']}"
            command += ["--mount", option + (",readonly" if mount.get("ReadOnly") else "")]
        for name, value in sorted(spec["environment"].items()):
            command += ["-e", name if name in SECRET_ENV_VARS else f"{name}={value}"]
        if "device_requests" in spec:
            command += ["--gpus", "all"]
        return [*command, "--entrypoint", shell, image["id"]]

    def run_stage(
        self,
        argv: Sequence[str],
        *,
        mounts: Sequence[Mount] = (),
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        stream: Stream | None = _print_line,
    ) -> RunnerResult:
        from docker.errors import APIError, DockerException, NotFound

        client = self.client
        environment = self.describe()
        image = environment["image"]
        spec = self.container_spec(argv, mounts, env or {})
        secrets = secret_values({**os.environ, **spec["environment"]})
        sink = LogSink(log_path, stream, secrets)
        shown = " ".join(argv)
        sink.note(f"docker: image {image['ref']} ({image['id'][:19]}), container {spec['name']}: invoke {shown}")
        started = time.monotonic()
        container = None
        try:
            try:
                container = client.containers.create(image["id"], **spec)
                container.start()
            except APIError as exc:
                raise RunnerError(redact(_start_error(exc, spec), secrets)) from None
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # chunks may split characters
            for chunk in container.logs(stream=True, follow=True):
                sink.write(decoder.decode(chunk))
            sink.write(decoder.decode(b"", final=True))
            try:
                status = container.wait()
                container.reload()
            except (NotFound, APIError):
                raise ContainerKilledError(
                    f"stage `invoke {shown}`: container {spec['name']} disappeared before it finished "
                    f"(removed from outside?)\n--- last lines ---\n{sink.tail_text()}",
                    exit_code=-1, log_tail=sink.tail_text(),
                ) from None
            exit_code = int(status.get("StatusCode", -1))
            oom = bool(container.attrs.get("State", {}).get("OOMKilled"))
        except KeyboardInterrupt:
            sink.note("interrupted: killing the container")
            raise
        except DockerException as exc:
            raise RunnerError(redact(f"docker error while running `invoke {shown}`: {exc}", secrets)) from None
        finally:
            sink.close()
            if container is not None:
                _remove(container)
        duration_s = time.monotonic() - started
        if exit_code != 0:
            where = f"; full log: {log_path}" if log_path else ""
            tail = sink.tail_text()
            if oom or exit_code in KILL_EXIT_CODES:
                reason = "ran out of memory (OOM-killed)" if oom else f"was killed ({KILL_EXIT_CODES[exit_code]}, exit {exit_code})"
                raise ContainerKilledError(
                    redact(f"stage `invoke {shown}`: container {spec['name']} {reason} before the stage "
                           f"finished; outputs of this stage are incomplete{where}\n--- last lines ---\n{tail}", secrets),
                    exit_code=exit_code, log_tail=tail,
                )
            raise StageFailedError(
                redact(f"stage `invoke {shown}` exited with status {exit_code} in container "
                       f"{spec['name']} (image {image['ref']}){where}\n--- last lines ---\n{tail}", secrets),
                exit_code=exit_code, log_tail=tail,
            )
        return RunnerResult(self.kind, tuple(argv), exit_code, duration_s, log_path, environment)


def _start_error(exc: Exception, spec: Mapping[str, Any]) -> str:
    text = str(exc)
    if "device driver" in text and "gpu" in text.lower():
        return ("the Docker engine cannot give containers GPUs (install the NVIDIA Container "
                f"Toolkit and restart dockerd), or run without GPUs: {text}")
    return f"could not start container {spec['name']}: {text}"


def _remove(container: Any) -> None:
    """Kill (if running) and remove a container with its anonymous volumes; ignore 'gone'."""
    from docker.errors import APIError, NotFound

    try:
        container.remove(force=True, v=True)
    except NotFound:
        pass
    except APIError as exc:
        if getattr(exc, "status_code", None) != 409:  # 409: removal already in progress
            raise
