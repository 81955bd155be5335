"""The KLD stage's held-out text from a pinned file of a Hub dataset (``kld.source``): downloaded
with huggingface_hub when the stage runs, refused unless its sha256 is the recipe's, and its rows
joined into the text.

No network here: the dataset is served by the test's fake Hub (tests/hub_server.py) at
``HF_ENDPOINT``, as the Hub serves Salesforce/wikitext's parquet files; the stage is run through
``invoke stage kld``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import pytest
from fakerun import demo_recipe_text
from hub_server import FakeHub
from invoke_cli import ROOT, invoke

REVISION = "b08601e04326c79dfdd32d625aee71d232d685c3"
FILE = "wikitext-2-raw-v1/test-00000-of-00001.parquet"
ROWS = ["", " = Valkyria Chronicles III = \n", "", " Senjō no Valkyria 3 is a tactical game .\n", " @-@ é \n"]


def _parquet(rows: list[str]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = io.BytesIO()
    pq.write_table(pa.table({"text": rows}), out)
    return out.getvalue()


def _recipe(tmp_path: Path, revision: str, sha256: str | None) -> Path:
    text = demo_recipe_text()
    pin = f'file_sha256 = "{sha256}"\n' if sha256 else ""
    text = re.sub(r'text = "[^"]*kld_heldout\.txt"\n', "", text)
    text = text.replace("[card]", f'[kld.source]\ndataset = "Salesforce/wikitext"\nrevision = "{revision}"\n'
                                  f'file = "{FILE}"\n{pin}\n[card]', 1)
    path = tmp_path / f"demo-{sha256 or 'unpinned'}.toml"
    path.write_text(text)
    return path


@pytest.fixture
def hub():
    """A fake Hub holding Salesforce/wikitext with the test file at one commit (``hub.revision``)."""
    with FakeHub() as hub:
        hub.data = _parquet(ROWS)
        hub.revision = hub.create("Salesforce/wikitext").add_commit({FILE: hub.data})
        yield hub


def _stage_kld(tmp_path: Path, hub: FakeHub, recipe: Path, offline: bool = False):
    env = {"MOEPRUNE_RUNS_DIR": str(tmp_path / "runs"), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_OFFLINE": "1" if offline else "0"}
    return invoke("stage", "kld", "--recipe", str(recipe), env=env, timeout=600)


@pytest.mark.llamacpp  # the stage ensures the pinned build before it reads the text
def test_the_stage_downloads_the_pinned_file_and_refuses_any_other(tmp_path, hub):
    want = hashlib.sha256(hub.data).hexdigest()
    unpinned = _stage_kld(tmp_path, hub, _recipe(tmp_path, hub.revision, None))
    assert unpinned.returncode != 0
    error = [line for line in unpinned.stderr.splitlines() if line.startswith("error:")]  # besides download progress
    assert len(error) == 1 and "Traceback" not in unpinned.stderr, unpinned.stderr
    assert "kld.source.file_sha256 is not set" in error[0] and want in error[0], error[0]

    wrong = _stage_kld(tmp_path, hub, _recipe(tmp_path, hub.revision, "0" * 64))
    assert wrong.returncode != 0 and "kld.source.file_sha256 = " + "0" * 64 in wrong.stderr and want in wrong.stderr
    assert not list((tmp_path / "runs" / "demo" / "kld").glob("heldout-*.txt"))  # no text from a refused file

    missing = _stage_kld(tmp_path, hub, _recipe(tmp_path, "1" * 40, want))
    assert missing.returncode != 0 and "kld.source: cannot download Salesforce/wikitext@111111111111" in missing.stderr

    pinned = _stage_kld(tmp_path, hub, _recipe(tmp_path, hub.revision, want))
    # The text passed: the stage went on to the GGUFs, which this run does not have.
    assert pinned.returncode != 0 and "base-F32.gguf: not found" in pinned.stderr, pinned.stderr
    kept = list((tmp_path / "runs" / "demo" / "kld").glob("heldout-*.txt"))
    assert [p.name for p in kept] == [f"heldout-{want[:16]}.txt"]
    assert kept[0].read_text(encoding="utf-8") == "".join(ROWS)

    # A machine without internet uses the file from the HF cache, checked the same way.
    hub.repos.clear()
    offline = _stage_kld(tmp_path, hub, _recipe(tmp_path, hub.revision, want), offline=True)
    assert offline.returncode != 0 and "base-F32.gguf: not found" in offline.stderr, offline.stderr


def test_check_shows_the_reference_recipe_kld_with_its_pinned_source():
    done = invoke("check", "--recipe", str(ROOT / "recipes" / "gemma-4-26b-a4b-109e.toml"),
                  env={"MOEPRUNE_RUNS_DIR": "/nonexistent-runs"}, in_process=True)
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("kld:"))
    assert line == ("kld: enabled; held-out text downloaded when the stage runs: "
                    f"Salesforce/wikitext@{REVISION[:12]} ({FILE}), file sha256 "
                    "5f1bea067869d04849c0f975a2b29c4ff47d867f484f5010ea5e861eab246d91"), line
    assert "NOT PINNED" not in done.stdout
    kld = next(line for line in done.stdout.splitlines() if line.startswith("  kld "))
    assert re.search(r"reference log-probabilities 13\.\d\d GB", kld), kld  # 101 x 256 tokens x 262144 x 2 bytes


def test_a_recipe_names_its_held_out_text_once(tmp_path):
    from moeprune.recipe import RecipeError, load_recipe

    text = _recipe(tmp_path, REVISION, None).read_text().replace("[kld.source]", 'text = "x.txt"\n\n[kld.source]', 1)
    (tmp_path / "both.toml").write_text(text)
    with pytest.raises(RecipeError, match="kld.text and kld.source both name the held-out text"):
        load_recipe(tmp_path / "both.toml", check_inputs=False)


def test_kld_work_dir_moves_the_large_files_and_the_plan_follows(tmp_path):
    """kld.work_dir: the plan counts the reference and rival files there (on that filesystem), and
    the stage records them as kld/<file>, as if they were in the run."""
    from moeprune.kld.paths import kld_work_dir
    from moeprune.kld.stage import _shown
    from moeprune.layout import RunLayout
    from moeprune.pipeline.stages import stage_names
    from moeprune.plan.gather import run_plan
    from moeprune.recipe import load_recipe

    text = demo_recipe_text().replace("rival_types = ", 'work_dir = "scratch/kld"\nrival_types = ', 1)
    (tmp_path / "demo.toml").write_text(text)
    recipe = load_recipe(tmp_path / "demo.toml", check_inputs=False)
    layout = RunLayout(tmp_path / "runs" / "demo")
    work = kld_work_dir(recipe, layout)
    assert work == tmp_path / "scratch" / "kld" / "demo"
    names = stage_names()
    kld = next(p for p in run_plan(recipe, layout, set(names), names) if p.stage == "kld")
    assert kld.writes and all(w.path.parent == work for w in kld.writes), kld.writes
    assert _shown(work / "base-Q3_K_M.gguf", layout, work) == "kld/base-Q3_K_M.gguf"
    assert _shown(layout.gguf_dir / "base-F32.gguf", layout, work) == "gguf/base-F32.gguf"
    default = load_recipe(ROOT / "recipes" / "demo.toml", check_inputs=False)
    assert kld_work_dir(default, layout) == layout.kld_work_dir


def test_kld_json_records_the_pinned_file_it_scored():
    """kld.json's text names the pinned file (schemas/kld.schema.json accepts it; a doctored one is refused)."""
    from moeprune.kld.heldout import source_record
    from moeprune.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "gemma-4-26b-a4b-109e.toml", check_inputs=False)
    record = source_record(recipe)
    assert record == {"dataset": "Salesforce/wikitext", "revision": REVISION, "file": FILE,
                      "file_sha256": recipe.kld.source.file_sha256}
    import jsonschema

    full = json.loads((ROOT / "schemas" / "kld.schema.json").read_text())
    # kld.json's "text" object, validated with the file's own definitions ($defs)
    schema = {**{k: v for k, v in full.items() if k not in ("if", "then", "required")}, **full["properties"]["text"]}
    text = {"file": "heldout.txt", "sha256": "a" * 64, "size_bytes": 1, "source": record}
    jsonschema.validate(text, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**text, "source": {**record, "revision": "main"}}, schema)
