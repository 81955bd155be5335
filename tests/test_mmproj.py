"""The vision projector of a multimodal base: converted once by the ``mmproj`` stage, recorded,
published in the GGUF repository, named on its card, checked by ``invoke verify``, and served by a
real llama-server that then answers a chat request with an image.

The run is the fake run (tests/fakerun.py: real drop map and pruned checkpoint, stand-in GGUFs and
eval logs) of the tiny Gemma 4 with its vision tower; everything about the projector is made by
the real stage through ``invoke``'s command line.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from fakerun import make_fake_run
from invoke_cli import ROOT, invoke
from tiny_gemma4 import save_servable_tiny_gemma4

from moeprune.custody import chain_problems
from moeprune.hashing import sha256_file
from moeprune.layout import RunLayout
from moeprune.llamacpp.mmproj import tower_digest

WIDE = {"COLUMNS": "3000"}
OUTTYPE = "BF16"  # the fake recipe's quantize.convert_outtype (the default)


def _save_vision_base(directory: Path) -> Path:
    return save_servable_tiny_gemma4(directory, vision=True, max_shard_size="300KB")


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory, llama_build_shared):
    """(root, layout, recipe file, env) of a fake run whose base has a vision tower, with the
    projector made by ``invoke stage mmproj`` and the card and manifest made after it."""
    root = tmp_path_factory.mktemp("mmproj") / "work"
    run = make_fake_run(root, with_card=False, with_manifest=False, save_model=_save_vision_base)
    env = {**WIDE, "MOEPRUNE_RUNS_DIR": str(root / "runs")}
    recipe = root / "fake.toml"
    for step in (["stage", "mmproj"], ["card"], ["manifest"]):
        done = invoke(*step, "--recipe", str(recipe), env=env, timeout=900)
        assert done.returncode == 0, f"invoke {' '.join(step)}:\n{done.stdout}\n{done.stderr}"
    return root, run.layout, recipe, env


@pytest.mark.llamacpp
def test_the_projector_is_recorded_published_and_named_on_the_gguf_card(vision_run):
    root, layout, _, _ = vision_run
    projector = layout.mmproj_path(OUTTYPE)
    record = json.loads(RunLayout.gguf_record_path(projector).read_text())
    assert record["stage"] == "mmproj" and record["file"] == projector.name
    assert record["sha256"] == sha256_file(projector) and record["size_bytes"] == projector.stat().st_size
    assert record["checks"]["architecture"] == "clip" and record["checks"]["projector_type"] == "gemma4v"
    # Converted from the base, and its tower is the pruned checkpoint's, bit for bit.
    base_tower, count = tower_digest(root / "base")
    assert count > 0 and record["tower_sha256"] == base_tower == tower_digest(layout.pruned_dir)[0]
    assert record["source_files"]["config.json"] == sha256_file(root / "base" / "config.json")

    manifest = json.loads(layout.manifest_path.read_text())
    published = {(e["repo"], e["path"]): e for e in manifest["files"]}
    assert published[("gguf", projector.name)]["sha256"] == record["sha256"]
    assert ("gguf", projector.name + ".json") in published
    card = (layout.card_dir / "gguf" / "README.md").read_text()
    assert f"`{projector.name}` is the vision projector" in card and f"--mmproj {projector.name}" in card


@pytest.mark.llamacpp
def test_verify_follows_the_projector_and_names_a_tampered_one(vision_run, tmp_path):
    root, layout, _, env = vision_run
    clean = invoke("verify", str(layout.root), "--base", str(root / "base"), env=env, in_process=True)
    assert clean.returncode == 0, clean.stdout + clean.stderr

    copy = tmp_path / "fake"
    shutil.copytree(layout.root, copy)
    projector = RunLayout(copy).mmproj_path(OUTTYPE)
    data = bytearray(projector.read_bytes())
    data[-1] ^= 0xFF
    projector.write_bytes(bytes(data))
    tampered = invoke("verify", str(copy), env=env, in_process=True)
    assert tampered.returncode != 0
    failing = [line for line in tampered.stdout.splitlines() if "FAIL" in line]
    assert any(projector.name in line for line in failing), tampered.stdout


def test_a_projector_of_another_tower_breaks_the_chain():
    """The record's tower digest must equal the published checkpoint's: the finding names the file."""
    record = {"stage": "mmproj", "sha256": "a" * 64, "tower_sha256": "b" * 64, "source_files": {"config.json": "c"}}
    manifest = {"files": [{"repo": "gguf", "path": "mmproj-BF16.gguf", "sha256": "a" * 64}]}
    same = chain_problems(manifest, {"mmproj-BF16.gguf": record}, {}, None, "b" * 64)
    assert same.problems == [] and same.descends["mmproj-BF16.gguf"]
    other = chain_problems(manifest, {"mmproj-BF16.gguf": record}, {}, None, "d" * 64)
    assert len(other.problems) == 1 and other.problems[0].startswith("gguf:mmproj-BF16.gguf: converted from a vision")
    from_base = chain_problems(manifest, {"mmproj-BF16.gguf": record}, {}, {"config.json": "e"}, "b" * 64)
    assert "does not descend from the --base safetensors" in from_base.problems[0]


def test_a_text_only_base_has_no_projector(tmp_path):
    """The demo (text only) gets no projector and no file: its outputs stay as they were."""
    from moeprune.demo import MODEL_DIR
    from moeprune.llamacpp.stages import mmproj_stage
    from moeprune.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "demo.toml", check_inputs=False)
    layout = RunLayout(tmp_path / "demo")
    assert mmproj_stage(recipe, MODEL_DIR, layout=layout, build=None) is None
    assert not layout.root.exists()


def _png_data_url() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 30)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _chat(base_url: str, content) -> dict:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0}
    request = urllib.request.Request(f"{base_url}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.llamacpp
def test_invoke_serve_takes_an_image_with_the_projector(vision_run):
    """The pruned GGUF (converted by ``invoke convert``) served by ``invoke serve``, which passes the
    run's projector: an image + text chat request is answered, and the image is in the prompt."""
    _, layout, recipe, env = vision_run
    done = invoke("convert", "--recipe", str(recipe), env=env, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "invoke", "serve", "--recipe", str(recipe), "--type", OUTTYPE.lower(),
                               "--port", str(port)], cwd=ROOT, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        said = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line:
                break
            said.append(line)
            if line.startswith("llama-server ready"):
                break
        assert said and said[-1].startswith("llama-server ready"), "".join(said)
        flags = server.stdout.readline()  # printed right after the ready line
        assert flags.startswith("flags:"), flags
        assert f"--mmproj {layout.mmproj_path(OUTTYPE)}" in flags
        base_url = f"http://127.0.0.1:{port}"
        text = [{"type": "text", "text": "What colour is this?"}]
        with_image = _chat(base_url, [*text, {"type": "image_url", "image_url": {"url": _png_data_url()}}])
        text_only = _chat(base_url, text)
        assert with_image["choices"][0]["message"]["content"] is not None
        # The image became prompt tokens (mtmd's Gemma 4 projector gives at least 70 per image).
        assert with_image["usage"]["prompt_tokens"] - text_only["usage"]["prompt_tokens"] >= 70
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
