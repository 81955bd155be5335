"""KL divergence: llama-perplexity's output parsed strictly, the rival chosen by size, the
self-check, recomputation from the evidence, the card section and verify's recheck."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moeprune.kld.report import KldError, choose_rival, recompute_kld, self_check
from moeprune.llamacpp.perplexity import (
    PerplexityOutputError,
    base_evidence_text,
    evidence_text,
    parse_base_output,
    parse_kld_output,
    perplexity_command,
)

ROOT = Path(__file__).resolve().parents[1]


def kld_output(chunks: int = 4, ctx: int = 128, kld: float = 0.05, top: float = 91.5, stop_after: int | None = None,
               stats: bool = True) -> str:
    """What the pinned llama-perplexity prints for --kl-divergence (stderr lines, then stdout)."""
    err = [
        "0.00.1 I system_info: n_threads = 2 (n_threads_batch = 2) / 2 | CPU : AVX2 = 1 |",
        f"0.02.6 I kl_divergence: computing over {chunks} chunks, n_ctx={ctx}, batch_size={ctx}, n_seq=1",
        "0.03.0 I kl_divergence: 0.50 seconds per pass - ETA 0.03 minutes",
    ]
    out = ["", "chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              "
               "Δp RMS            Same top p"]
    for chunk in range(1, (stop_after or chunks) + 1):
        value = kld * (1 + 0.1 / chunk)
        out.append(f"{chunk:4d}    {10 + chunk:9.4f} ± {0.5:9.4f}    {0.01:10.5f} ± {0.002:10.5f}    "
                   f"{value:10.5f} ± {value / 10:10.5f}     {3.1:6.3f} ± {0.2:6.3f} %    {top:6.3f} ± {0.8:6.3f} %")
    if stats and stop_after is None:
        out += ["", "====== Perplexity statistics ======", "Mean PPL(Q)                   :  14.0 ±   0.5"]
    return "\n".join(err) + "\n" + "\n".join(out) + "\n"


def base_output(chunks: int = 4, ctx: int = 128) -> str:
    return (f"0.02.3 I perplexity: calculating perplexity over {chunks} chunks, n_ctx={ctx}, batch_size={ctx}, n_seq=1\n"
            + "".join(f"[{k}]{20.0 + k:.4f}," for k in range(1, chunks + 1))
            + f"\n0.48.9 I Final estimate: PPL = {20 + chunks:.4f} +/- 1.00000\n")


def test_kld_figures_come_from_the_last_scored_chunk_not_the_spare():
    stats = parse_kld_output(kld_output(chunks=4))
    assert (stats.chunks, stats.ctx_size, stats.scored_tokens) == (3, 128, 3 * 63)
    assert stats.values["mean_kld"] == {"value": pytest.approx(0.05 * (1 + 0.1 / 3), abs=1e-5),
                                        "stderr": pytest.approx(0.05 * (1 + 0.1 / 3) / 10, abs=1e-5)}
    assert stats.values["top1_agreement"] == {"value": pytest.approx(0.915), "stderr": pytest.approx(0.008)}
    assert stats.values["ppl"]["value"] == pytest.approx(13.0)
    assert stats.values["rms_delta_p"]["value"] == pytest.approx(0.031)


def test_output_that_ended_early_is_an_error_naming_the_missing_rows():
    with pytest.raises(PerplexityOutputError, match=r"row for chunk\(s\) \[3\] of the 3 scored"):
        parse_kld_output(kld_output(chunks=4, stop_after=2))
    # the spare chunk's row may be lost: that is what it is for
    assert parse_kld_output(kld_output(chunks=4, stop_after=3)).chunks == 3


def test_llama_perplexity_errors_are_quoted():
    text = ("0.1 E kl_divergence: inconsistent vocabulary (1536 vs 32000)\n"
            "0.2 I kl_divergence: computing over 4 chunks, n_ctx=128, batch_size=128, n_seq=1\n")
    with pytest.raises(PerplexityOutputError, match="inconsistent vocabulary"):
        parse_kld_output(text)
    with pytest.raises(PerplexityOutputError, match="you need at least 256 tokens"):
        parse_base_output("perplexity: you need at least 256 tokens to evaluate perplexity with a context of 128\n")


def test_unrecognised_format_and_non_finite_numbers_fail_clearly():
    changed = kld_output().replace("KL Divergence", "KL-Div")
    with pytest.raises(PerplexityOutputError, match="does not recognise"):
        parse_kld_output(changed)
    with pytest.raises(PerplexityOutputError, match="computing over N chunks"):
        parse_kld_output("Mean    KLD:   0.1 ± 0.01\n")
    nan = kld_output(chunks=3).replace(f"{0.05 * (1 + 0.1 / 2):10.5f} ±", f"{'nan':>10} ±")
    with pytest.raises(PerplexityOutputError, match="non-finite"):
        parse_kld_output(nan)


def test_too_little_text_is_an_error():
    with pytest.raises(PerplexityOutputError, match="at least 100 scored tokens"):
        parse_kld_output(kld_output(chunks=2))  # one scored chunk of 63 tokens


def test_evidence_keeps_only_the_deterministic_rows_and_parses_back():
    text = kld_output(chunks=4)
    evidence = evidence_text(text)
    assert "seconds per pass" not in evidence and "system_info" not in evidence
    assert len(evidence.strip().splitlines()) == 2 + 3  # chunk line, header, three scored rows
    assert parse_kld_output(evidence) == parse_kld_output(text)
    base = base_evidence_text(base_output(chunks=4))
    assert parse_base_output(base) == parse_base_output(base_output(chunks=4)) == {
        "ppl": 23.0, "chunks": 3, "ctx_size": 128, "chunks_run": 4}


def test_command_saves_one_spare_chunk_and_one_chunk_per_batch(tmp_path):
    class Build:
        def binary(self, name):
            return tmp_path / name

    save = perplexity_command(Build(), Path("m.gguf"), Path("t.txt"), Path("r.kld"), ctx_size=128, compare=False,
                              chunks=16, threads=2)
    assert save[save.index("--chunks") + 1] == "17" and save[save.index("--batch-size") + 1] == "128"
    assert "--kl-divergence" not in save
    compare = perplexity_command(Build(), Path("q.gguf"), Path("t.txt"), Path("r.kld"), ctx_size=128, compare=True,
                                 chunks=16)
    assert "--kl-divergence" in compare and "--chunks" not in compare
    assert compare[compare.index("--kl-divergence-base") + 1] == "r.kld"


def test_rival_is_the_closest_file_size():
    assert choose_rival(3_446_656, {"Q3_K_M": 2_942_048, "Q4_K_S": 3_355_232, "Q5_K_S": 3_879_520}) == "Q4_K_S"
    assert choose_rival(100, {"A": 90, "B": 110}) == "A"  # a tie goes to the smaller file
    with pytest.raises(KldError, match="no candidate"):
        choose_rival(100, {})


def test_self_check_demands_zero_kld_and_identical_top1():
    row = {"label": "base-F32", "mean_kld": {"value": -0.0}, "top1_agreement": {"value": 1.0}, "ppl_ratio": 1.0}
    assert self_check(row, 1e-3)["passed"]
    assert not self_check({**row, "mean_kld": {"value": 0.01}}, 1e-3)["passed"]
    assert not self_check({**row, "top1_agreement": {"value": 0.999}}, 1e-3)["passed"]


# --- kld.json in a run: recompute, card section, verify -------------------------------------------
def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def write_fake_kld(layout, pruned_gguf: dict) -> dict:
    """A kld.json with evidence in the run's eval dir, as the stage writes it (synthetic figures)."""
    from moeprune.atomic import write_json
    from moeprune.kld.report import rival_record, row_numbers, self_check
    from moeprune.schemas import validate

    evidence = {"reference.txt": base_evidence_text(base_output(chunks=5))}
    reference_ppl = parse_base_output(evidence["reference.txt"])["ppl"]
    plan = [("base-BF16", "base", "BF16", "reference", 0.0, 100.0, 4_000_000),
            ("base-Q4_K_M", "base", "Q4_K_M", "base-eval", 0.03, 95.0, 1_200_000),
            ("pruned-Q4_K_M", "pruned", "Q4_K_M", "pruned-eval", 0.05, 92.0, pruned_gguf["size_bytes"]),
            ("pruned-BF16", "pruned", "BF16", "pruned-converted", 0.02, 97.0, 3_500_000),
            ("base-Q3_K_M", "base", "Q3_K_M", "base-candidate", 0.09, 89.0, pruned_gguf["size_bytes"] - 1000),
            ("base-Q2_K", "base", "Q2_K", "base-candidate", 0.3, 80.0, 600_000)]
    rows = []
    for label, model, qtype, role, kld, top, size in plan:
        text = evidence_text(kld_output(chunks=5, kld=kld, top=top))
        if role == "reference":  # the reference against itself: KLD 0, the ppl of its own run
            text = "\n".join(line if not line.strip().startswith("4 ") else
                             line.replace(f"{14.0:9.4f}", f"{reference_ppl:9.4f}") for line in text.splitlines()) + "\n"
        evidence[f"{label}.txt"] = text
        gguf = pruned_gguf if role == "pruned-eval" else {"file": f"gguf/{label}.gguf", "sha256": _sha(label),
                                                          "size_bytes": size}
        rows.append({"label": label, "model": model, "quant_type": qtype, "role": role, "gguf": gguf,
                     "command": ["llama-perplexity", "--kl-divergence"], "evidence": f"kld/{label}.txt",
                     "evidence_sha256": _sha(text), **row_numbers(text, reference_ppl, label)})
    document = {
        "format_version": 1, "recipe_name": "fake", "enabled": True,
        "settings": {"ctx_size": 128, "chunks": 4, "threads": 2, "n_gpu_layers": 0, "rival_types": ["Q3_K_M", "Q2_K"],
                     "self_kld_tolerance": 1e-3, "convert_outtype": "bf16", "eval_type": "Q4_K_M"},
        "text": {"file": "heldout.txt", "sha256": _sha("text"), "size_bytes": 4},
        "llamacpp_build": "fake",
        "reference": {"label": "base-BF16", "gguf": {"file": "gguf/base-BF16.gguf", "sha256": _sha("ref"),
                                                     "size_bytes": 4_000_000},
                      "command": ["llama-perplexity", "--kl-divergence-base"], "evidence": "kld/reference.txt",
                      "evidence_sha256": _sha(evidence["reference.txt"]), **parse_base_output(evidence["reference.txt"])},
        "rows": rows,
        "rival": rival_record(rows, "pruned-Q4_K_M", "base-Q3_K_M"),
        "self_check": self_check(rows[0], 1e-3),
    }
    validate("kld", document)
    (layout.eval_dir / "kld").mkdir(parents=True, exist_ok=True)
    for name, text in evidence.items():
        (layout.eval_dir / "kld" / name).write_text(text, encoding="utf-8")
    write_json(layout.kld_path, document)
    return document


@pytest.fixture
def kld_run(tmp_path):
    """The synthetic run with a kld.json, its card re-rendered and its manifest rewritten."""
    from fakerun import make_fake_run

    from moeprune.card.render import run_card
    from moeprune.manifest import write_manifest

    fake = make_fake_run(tmp_path / "work", with_card=False, with_manifest=False)
    results = json.loads(fake.layout.results_path.read_text())
    evaluated = results["models"]["pruned"]["gguf"]
    write_fake_kld(fake.layout, {"file": evaluated["path"], "sha256": evaluated["sha256"],
                                 "size_bytes": evaluated["size_bytes"]})
    run_card(fake.recipe, fake.layout)
    write_manifest(fake.layout, fake.recipe.settings(), {"repo_ids": {"model": "me/fake-pruned", "gguf": "me/fake-pruned-GGUF"}})
    return fake


def test_recompute_from_evidence_reproduces_kld_json(kld_run):
    stored = json.loads(kld_run.layout.kld_path.read_text())
    assert recompute_kld(kld_run.layout.eval_dir, stored) == stored
    (kld_run.layout.eval_dir / "kld" / "pruned-Q4_K_M.txt").unlink()
    with pytest.raises(KldError, match="evidence file of eval/kld.json is missing"):
        recompute_kld(kld_run.layout.eval_dir, stored)


def test_card_shows_the_kld_table_and_plot(kld_run):
    card = (kld_run.layout.card_dir / "README.md").read_text()
    numbers = json.loads((kld_run.layout.card_dir / "card_numbers.json").read_text())["numbers"]
    assert "## What pruning costs, and what quantization costs" in card
    assert "![KL divergence against file size](plots/kld.png)" in card
    assert (kld_run.layout.card_dir / "plots" / "kld.png").read_bytes()[:4] == b"\x89PNG"
    row = next(line for line in card.splitlines() if "(this model)" in line)
    assert numbers["kld.pruned-Q4_K_M.kld"]["display"] in row and numbers["kld.pruned-Q4_K_M.top1"]["display"] in row
    assert "equal-size rival" in card and "base quantized to Q3_K_M is closer" not in card  # pruned wins here


def test_verify_passes_then_fails_when_a_kld_number_on_the_card_is_edited(kld_run):
    from moeprune.manifest import write_manifest
    from moeprune.verify import verify

    root = kld_run.layout.root
    report = verify(str(root))
    assert report.ok, [(c.name, c.detail) for c in report.failures]
    assert any(c.name == "KLD recompute" and c.ok for c in report.checks)

    readme = kld_run.layout.card_dir / "README.md"
    numbers = json.loads((kld_run.layout.card_dir / "card_numbers.json").read_text())["numbers"]
    shown = numbers["kld.pruned-Q4_K_M.kld"]["display"]
    readme.write_text(readme.read_text().replace(shown, "0.0010 ± 0.0001"))
    write_manifest(kld_run.layout, kld_run.recipe.settings(), {"repo_ids": {"model": "me/fake-pruned"}})
    failed = verify(str(root))
    detail = "\n".join(c.detail for c in failed.failures)
    assert not failed.ok and "'kld.pruned-Q4_K_M.kld' should read" in detail and shown in detail


def test_verify_fails_when_kld_json_disagrees_with_its_evidence(kld_run, tmp_path):
    from moeprune.manifest import write_manifest
    from moeprune.verify import verify

    copy = tmp_path / "copy" / kld_run.layout.root.name
    shutil.copytree(kld_run.layout.root, copy)
    path = copy / "eval" / "kld.json"
    document = json.loads(path.read_text())
    document["rows"][2]["mean_kld"]["value"] = 0.001
    path.write_text(json.dumps(document))
    from moeprune.layout import RunLayout

    write_manifest(RunLayout(copy), kld_run.recipe.settings(), {"repo_ids": {"model": "me/fake-pruned"}})
    report = verify(str(copy))
    detail = "\n".join(c.detail for c in report.failures if c.name == "KLD recompute")
    assert "eval/kld.json/rows/2/mean_kld/value: file says 0.001" in detail


@pytest.mark.slow
def test_demo_reproduce_measures_kld_with_a_zero_self_check(demo_run, tmp_path):
    """The real pipeline: eval/kld.json has the pruned, base and equal-size rows, the reference
    against itself gives KLD 0, and an edited KLD number on the card fails verify."""
    from moeprune.layout import RunLayout
    from moeprune.manifest import write_manifest
    from moeprune.recipe import load_recipe
    from moeprune.verify import verify

    document = json.loads((demo_run / "eval" / "kld.json").read_text())
    roles = {row["role"] for row in document["rows"]}
    assert {"reference", "base-eval", "pruned-eval", "pruned-converted", "base-candidate"} <= roles
    assert document["rival"]["label"] in {row["label"] for row in document["rows"] if row["role"] == "base-candidate"}
    reference = next(row for row in document["rows"] if row["role"] == "reference")
    assert reference["mean_kld"]["value"] == 0.0 and reference["top1_agreement"]["value"] == 1.0
    assert reference["ppl_ratio"] == 1.0 and document["self_check"]["passed"]
    assert all(row["mean_kld"]["value"] > 0 for row in document["rows"] if row["role"] != "reference")
    assert recompute_kld(demo_run / "eval", document) == document

    copy = tmp_path / "runs" / "demo"
    shutil.copytree(demo_run, copy, ignore=shutil.ignore_patterns("logs", "kld"))
    readme = copy / "card" / "README.md"
    numbers = json.loads((copy / "card" / "card_numbers.json").read_text())["numbers"]
    shown = numbers[f"kld.{document['rival']['label']}.kld"]["display"]
    readme.write_text(readme.read_text().replace(shown, "0.0001 ± 0.0001", 1))
    write_manifest(RunLayout(copy), load_recipe(ROOT / "recipes" / "demo.toml", check_inputs=False).settings())
    detail = "\n".join(c.detail for c in verify(str(copy)).failures)
    assert f"'kld.{document['rival']['label']}.kld' should read" in detail
