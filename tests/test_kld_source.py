"""The KLD stage's held-out text from a pinned Hub dataset (``kld.source``): fetched with ``datasets``
when the stage runs, built into one text, and refused unless its sha256 is the recipe's.

No network here: the dataset is a local copy laid out as the Hub's Salesforce/wikitext is (a
README whose ``configs`` name each configuration's parquet files), which ``datasets`` loads by the
same call; the stage is run through ``invoke stage kld``.
"""

from __future__ import annotations

import hashlib
import re
import textwrap
from pathlib import Path

import pytest
from fakerun import demo_recipe_text
from invoke_cli import ROOT, invoke

REVISION = "b08601e04326c79dfdd32d625aee71d232d685c3"
ROWS = ["", " = Valkyria Chronicles III = \n", "", " Senjō no Valkyria 3 is a tactical game .\n", " @-@ é \n"]


def _fake_wikitext(root: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "wikitext-2-raw-v1").mkdir(parents=True)
    (root / "README.md").write_text(textwrap.dedent("""\
        ---
        configs:
        - config_name: wikitext-2-raw-v1
          data_files:
          - split: test
            path: wikitext-2-raw-v1/test-*
        ---
        """))
    pq.write_table(pa.table({"text": ROWS}), root / "wikitext-2-raw-v1" / "test-00000-of-00001.parquet")
    return root


def _recipe(tmp_path: Path, dataset: Path, sha256: str | None) -> Path:
    text = demo_recipe_text()
    pin = f'sha256 = "{sha256}"\n' if sha256 else ""
    text = re.sub(r'text = "[^"]*kld_heldout\.txt"\n', "", text)
    text = text.replace("[card]", f'[kld.source]\ndataset = "{dataset}"\nconfig = "wikitext-2-raw-v1"\nsplit = "test"\n'
                                  f'revision = "{REVISION}"\n{pin}\n[card]', 1)
    path = tmp_path / f"demo-{sha256 or 'unpinned'}.toml"
    path.write_text(text)
    return path


@pytest.fixture
def dataset(tmp_path):
    return _fake_wikitext(tmp_path / "wikitext")


def _stage_kld(tmp_path: Path, recipe: Path):
    env = {"MOEPRUNE_RUNS_DIR": str(tmp_path / "runs"), "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1"}
    return invoke("stage", "kld", "--recipe", str(recipe), env=env, timeout=600)


@pytest.mark.llamacpp  # the stage ensures the pinned build before it reads the text
def test_the_stage_fetches_the_source_and_refuses_until_its_sha256_is_pinned(tmp_path, dataset):
    want = hashlib.sha256("".join(ROWS).encode("utf-8")).hexdigest()
    unpinned = _stage_kld(tmp_path, _recipe(tmp_path, dataset, None))
    assert unpinned.returncode != 0
    error = [line for line in unpinned.stderr.splitlines() if line.startswith("error:")]  # besides datasets' progress
    assert len(error) == 1 and "Traceback" not in unpinned.stderr, unpinned.stderr
    assert "kld.source.sha256 is not set" in error[0] and want in error[0], error[0]

    wrong = _stage_kld(tmp_path, _recipe(tmp_path, dataset, "0" * 64))
    assert wrong.returncode != 0 and "kld.source.sha256 = " + "0" * 64 in wrong.stderr and want in wrong.stderr

    pinned = _stage_kld(tmp_path, _recipe(tmp_path, dataset, want))
    # The text passed: the stage went on to the GGUFs, which this run does not have.
    assert pinned.returncode != 0 and "base-F32.gguf: not found" in pinned.stderr, pinned.stderr
    kept = list((tmp_path / "runs" / "demo" / "kld").glob("heldout-*.txt"))
    assert [p.read_text(encoding="utf-8") for p in kept] == ["".join(ROWS)]


def test_check_shows_the_reference_recipe_kld_with_its_pinned_source():
    done = invoke("check", "--recipe", str(ROOT / "recipes" / "gemma-4-26b-a4b-109e.toml"),
                  env={"MOEPRUNE_RUNS_DIR": "/nonexistent-runs"}, in_process=True)
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("kld:"))
    assert line.startswith("kld: enabled; held-out text fetched when the stage runs: "
                           f"Salesforce/wikitext@{REVISION[:12]} (wikitext-2-raw-v1, test split), sha256 "), line
    kld = next(line for line in done.stdout.splitlines() if line.startswith("  kld "))
    assert re.search(r"reference log-probabilities 13\.\d\d GB", kld), kld  # 101 x 256 tokens x 262144 x 2 bytes


def test_a_recipe_names_its_held_out_text_once(tmp_path, dataset):
    from moeprune.recipe import RecipeError, load_recipe

    text = _recipe(tmp_path, dataset, None).read_text().replace("[kld.source]", 'text = "x.txt"\n\n[kld.source]', 1)
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
