"""Evaluation: statistics, error analysis, results schema, lm-eval runs against a served model.

The run tests drive lm-eval's real ``local-chat-completions`` model against a real HTTP server
process (tests/fake_chat_server.py) that answers from a table, so every score, table and
p-value below is known in advance. The demo end-to-end test serves the demo GGUF with
llama-server (marked slow + llamacpp).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from moeprune.errors import MoepruneError
from moeprune.eval import analysis, stats
from moeprune.eval.results import check_results, recompute_results
from moeprune.eval.failure import EvalError
from moeprune.eval.records import reported_scores
from moeprune.eval.run import partial_log_path, run_eval
from moeprune.eval.tasks import check_hub_access
from moeprune.eval.samples import read_sample_log, write_sample_log
from moeprune.layout import RunLayout
from moeprune.recipe import parse_recipe
from moeprune.schemas import SchemaError, validate

ROOT = Path(__file__).resolve().parents[1]
FAKE_SERVER = ROOT / "tests" / "fake_chat_server.py"


# --- statistics -----------------------------------------------------------------------------------
def test_accuracy_and_stderr_known_values():
    # mean 0.75; sample variance ((3 * 0.25^2) + 0.75^2) / 3 = 0.25 -> std 0.5 -> se 0.5 / 2
    assert stats.accuracy([1, 0, 1, 1]) == 0.75
    assert stats.accuracy_stderr([1, 0, 1, 1]) == 0.25
    assert stats.accuracy_stderr([1.0]) is None  # lm-eval reports "N/A"


def test_stderr_reproduces_the_reference_card():
    # Card: 142 of 198 correct -> 71.72% +- 3.21%; strict-match 1 of 198 -> 0.51% +- 0.51%.
    flexible = [1.0] * 142 + [0.0] * 56
    assert round(100 * stats.accuracy(flexible), 2) == 71.72
    assert round(100 * stats.accuracy_stderr(flexible), 2) == 3.21
    strict = [1.0] + [0.0] * 197
    assert round(100 * stats.accuracy(strict), 2) == 0.51
    assert round(100 * stats.accuracy_stderr(strict), 2) == 0.51


def test_stderr_equals_lm_eval_bit_for_bit():
    from lm_eval.api.metrics import mean, mean_stderr

    rng = np.random.default_rng(3)
    for n in (2, 7, 198, 1000):
        values = [float(x) for x in rng.integers(0, 2, size=n)]
        assert stats.accuracy(values) == mean(values)
        assert stats.accuracy_stderr(values) == mean_stderr(values)


def test_agreement_table_counts_each_cell():
    table = stats.agreement_table([1, 1, 0, 0, 1, 0], [1, 0, 1, 0, 1, 0])
    assert (table.both_correct, table.a_only, table.b_only, table.both_wrong) == (2, 1, 1, 2)
    assert table.n == 6 and table.discordant == 2
    with pytest.raises(ValueError, match="differ in length"):
        stats.agreement_table([1, 0], [1])
    with pytest.raises(ValueError, match="0 or 1"):
        stats.agreement_table([0.5], [1])


def test_mcnemar_hand_worked_cases():
    # 1 vs 7 discordant: n = 8, P(X <= 1) = (C(8,0) + C(8,1)) / 2^8 = 9/256; p = 18/256.
    assert stats.mcnemar_exact_p(1, 7) == 18 / 256
    assert stats.mcnemar_exact_p(7, 1) == 18 / 256
    # 0 vs 5: p = 2 * (1/32) = 0.0625
    assert stats.mcnemar_exact_p(0, 5) == 0.0625
    # balanced discordance and no discordance: no evidence at all
    assert stats.mcnemar_exact_p(3, 3) == 1.0
    assert stats.mcnemar_exact_p(0, 0) == 1.0
    # 2 vs 10: n = 12, P(X <= 2) = (1 + 12 + 66) / 4096 = 79/4096
    assert stats.mcnemar_exact_p(2, 10) == 158 / 4096


def test_mcnemar_matches_scipy_binomial_test():
    scipy_stats = pytest.importorskip("scipy.stats")
    for a_only, b_only in [(1, 7), (12, 25), (30, 31), (0, 9), (40, 17)]:
        expected = scipy_stats.binomtest(min(a_only, b_only), a_only + b_only, 0.5).pvalue
        assert stats.mcnemar_exact_p(a_only, b_only) == pytest.approx(expected, rel=1e-12)


def test_bootstrap_is_seeded_and_brackets_the_difference():
    a = [1] * 150 + [0] * 48
    b = [1] * 140 + [0] * 10 + [0] * 40 + [1] * 8
    first = stats.paired_bootstrap_ci(a, b, resamples=2000, seed=7)
    again = stats.paired_bootstrap_ci(a, b, resamples=2000, seed=7)
    other = stats.paired_bootstrap_ci(a, b, resamples=2000, seed=8)
    assert first == again
    assert (first.low, first.high) != (other.low, other.high)
    assert first.difference == pytest.approx((148 - 150) / 198)
    assert first.low < first.difference < first.high


def test_bootstrap_interval_covers_the_true_difference_about_95_percent():
    # 200 simulated paired datasets with the card's shape: P(both) .65, base only .10,
    # pruned only .065, both wrong .185 -> true difference (pruned - base) = -0.035.
    rng = np.random.default_rng(2026)
    cells = np.array([0.65, 0.10, 0.065, 0.185])
    true_difference = (0.65 + 0.065) - (0.65 + 0.10)
    covered = 0
    datasets = 200
    for index in range(datasets):
        kind = rng.choice(4, size=200, p=cells)
        base = np.isin(kind, (0, 1)).astype(float)
        pruned = np.isin(kind, (0, 2)).astype(float)
        interval = stats.paired_bootstrap_ci(base, pruned, resamples=1000, seed=index)
        covered += interval.low <= true_difference <= interval.high
    coverage = covered / datasets
    # Binomial sd of the coverage estimate is ~1.5 points: 0.89..0.99 is a ~4-sigma band.
    assert 0.89 <= coverage <= 0.99, coverage


def test_mcnemar_rejects_at_most_alpha_under_the_null():
    rng = np.random.default_rng(11)
    rejections = 0
    for _ in range(400):
        discordant = rng.binomial(60, 0.5)  # under H0 each discordant pair falls either way
        rejections += stats.mcnemar_exact_p(discordant, 60 - discordant) < 0.05
    assert rejections / 400 <= 0.05 + 0.03  # exact test is conservative; allow sampling noise


# --- error analysis on hand-made logs ---------------------------------------------------------------
def _record(doc_id: int, filt: str, response: str, extracted: str, target: str) -> dict:
    return {
        "doc_id": doc_id,
        "doc": {"q": doc_id},
        "target": target,
        "arguments": [["prompt", {}]],
        "resps": [[response]],
        "filtered_resps": [extracted],
        "filter": filt,
        "metrics": ["exact_match"],
        "exact_match": 1.0 if extracted == target else 0.0,
        "doc_hash": f"d{doc_id}",
        "prompt_hash": f"p{doc_id}",
        "target_hash": f"t{target}",
    }


def test_error_analysis_counts_letters_and_lengths():
    long_30k = "x" * 30_001
    long_20k = "y" * 25_000
    rows = [
        (0, "a" * 100, "(A)", "(A)"),       # correct
        (1, "b" * 200, "(B)", "(B)"),       # correct
        (2, "c" * 300, "(C)", "(A)"),       # wrong, letter C
        (3, long_20k, "(C)", "(D)"),        # wrong, letter C, > 20k
        (4, long_30k, "[invalid]", "(B)"),  # invalid, > 20k and > 30k
        (5, "d" * 400, "(d)", "(A)"),       # wrong, letter D (case-insensitive)
    ]
    records = [_record(i, "flexible-extract", resp, ext, tgt) for i, resp, ext, tgt in rows]
    records += [_record(i, "strict-match", resp, "[invalid]", tgt) for i, resp, _, tgt in rows]
    result = analysis.error_analysis(records)
    assert (result["total"], result["correct"], result["wrong"], result["invalid"]) == (6, 2, 3, 1)
    assert result["wrong_answer_letters"] == {"C": 2, "D": 1}
    assert result["target_letters"] == {"A": 3, "B": 2, "D": 1}
    lengths = sorted([100, 200, 300, 25_000, 30_001, 400])
    length = result["response_length"]
    assert length["median_chars"] == (lengths[2] + lengths[3]) / 2
    assert length["mean_chars"] == sum(lengths) / 6
    assert length["mean_tokens_approx"] == sum(lengths) / 6 / 4
    assert length["over_chars"] == {"20000": 2, "30000": 1}
    assert length["max_chars"] == 30_001
    strict = analysis.error_analysis(records, filter_name="strict-match")
    assert (strict["correct"], strict["invalid"]) == (0, 6)


def test_analyse_lm_eval_timestamped_log(tmp_path):
    from moeprune.eval.results import analyse_sample_logs

    rows = [(0, "(A)", "(A)"), (1, "(C)", "(B)"), (2, "[invalid]", "(D)")]
    records = [_record(i, "flexible-extract", "text", ext, tgt) for i, ext, tgt in rows]
    write_sample_log(tmp_path / "samples_gpqa_diamond_cot_zeroshot_2026-01-01T00-00-00.jsonl", records)
    result = analyse_sample_logs(tmp_path, "gpqa_diamond_cot_zeroshot")
    assert result["scores"]["flexible-extract"]["exact_match"]["value"] == 1 / 3
    assert (result["error_analysis"]["wrong"], result["error_analysis"]["invalid"]) == (1, 1)
    write_sample_log(tmp_path / "samples_gpqa_diamond_cot_zeroshot_2026-01-02T00-00-00.jsonl", records)
    with pytest.raises(MoepruneError, match="2 sample logs"):
        analyse_sample_logs(tmp_path, "gpqa_diamond_cot_zeroshot")


def test_paired_comparison_on_hand_made_logs():
    from moeprune.eval.results import paired_comparison

    # base correct on 0..9, pruned on 0..2: 7 base-only, 0 pruned-only -> p = 2 / 2^7.
    base = [_record(i, "flexible-extract", "t", "(A)" if i < 10 else "(B)", "(A)") for i in range(12)]
    pruned = [_record(i, "flexible-extract", "t", "(A)" if i < 3 else "(B)", "(A)") for i in range(12)]
    result = paired_comparison(base, pruned, filter_name="flexible-extract", metric="exact_match",
                               resamples=300, seed=0)
    assert result["table"] == {"both_correct": 3, "base_only_correct": 7, "pruned_only_correct": 0, "both_wrong": 2}
    assert result["mcnemar"]["p_value"] == 2 / 2**7
    assert result["difference"] == 3 / 12 - 10 / 12
    assert result["bootstrap"]["high"] < 0  # every resample favours base


def test_paired_comparison_refuses_different_questions():
    from moeprune.eval.results import ResultsError, paired_comparison

    base = [_record(i, "flexible-extract", "t", "(A)", "(A)") for i in range(4)]
    shuffled = [_record(i, "flexible-extract", "t", "(A)", "(B)" if i == 2 else "(A)") for i in range(4)]
    with pytest.raises(ResultsError, match="doc_id 2 differs.*target_hash"):
        paired_comparison(base, shuffled, filter_name="flexible-extract", metric="exact_match", resamples=100, seed=0)
    with pytest.raises(ResultsError, match="different questions"):
        paired_comparison(base, base[:3], filter_name="flexible-extract", metric="exact_match", resamples=100, seed=0)


def test_sample_log_round_trip_and_bad_line(tmp_path):
    path = tmp_path / "samples_x.jsonl"
    records = [_record(0, "flexible-extract", "r", "(A)", "(A)")]
    assert write_sample_log(path, records) == 1
    assert read_sample_log(path) == records
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(MoepruneError, match=r"samples_x.jsonl:2: not valid JSON"):
        read_sample_log(path)


def test_reported_scores_parse_lm_eval_keys():
    parsed = reported_scores(
        {"alias": "t", "exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": "N/A",
         "exact_match,flexible-extract": 1.0, "exact_match_stderr,flexible-extract": 0.0}
    )
    assert parsed == {"strict-match": {"exact_match": {"value": 0.5, "stderr": None}},
                      "flexible-extract": {"exact_match": {"value": 1.0, "stderr": 0.0}}}


def test_hub_token_missing_for_gated_dataset_says_how_to_provide_one():
    with pytest.raises(EvalError, match=r"HF_TOKEN.*hf auth login"):
        check_hub_access({"gpqa_diamond_cot_zeroshot": "Idavidrein/gpqa"}, token=None)
    check_hub_access({"gpqa_diamond_cot_zeroshot": "Idavidrein/gpqa"}, token="hf_x")
    check_hub_access({"demo": "json"}, token=None)


# --- runs against a fake OpenAI-compatible server -----------------------------------------------------
QUESTIONS = 12
LETTERS = "ABCD"
BASE_CORRECT = set(range(0, 9))            # 9/12
PRUNED_CORRECT = set(range(0, 7)) | {9}    # 8/12
INVALID = {10}                             # both: no letter in the answer


def _target(i: int) -> str:
    return LETTERS[i % 4]


def _response(i: int, correct: set[int]) -> str:
    if i in INVALID:
        return "I am not sure."
    letter = _target(i) if i in correct else LETTERS[(i + 1) % 4]
    # Half the answers in the strict "The answer is (X)." form, half not: strict-match differs.
    return f"Let me think. The answer is ({letter})." if i % 2 == 0 else f"So ({letter}) it is"


def _write_task(root: Path, data_file: Path | None = None) -> Path:
    tasks = root / "tasks" / "tiny_mcq"
    tasks.mkdir(parents=True)
    data = tasks / "data.jsonl"
    with open(data, "w") as handle:
        for i in range(QUESTIONS):
            choices = [f"Planet{i}x{j}" for j in range(4)]
            handle.write(json.dumps({"question": f"[q{i:02d}] Which planet?", "choices": choices,
                                     "answer": f"({_target(i)})"}) + "\n")
    yaml = f"""task: tiny_mcq
dataset_path: json
dataset_kwargs:
  data_files: {json.dumps(str(data_file or data))}
test_split: train
output_type: generate_until
doc_to_text: "{{{{question}}}}\\n(A) {{{{choices[0]}}}}\\n(B) {{{{choices[1]}}}}\\n(C) {{{{choices[2]}}}}\\n(D) {{{{choices[3]}}}}\\nAnswer:"
doc_to_target: answer
generation_kwargs:
  until: ["</s>"]
  do_sample: false
  temperature: 0.0
filter_list:
  - name: "strict-match"
    filter:
      - function: "regex"
        regex_pattern: "(?<=The answer is )(.*)(?=.)"
      - function: "take_first"
  - name: "flexible-extract"
    filter:
      - function: "multi_choice_regex"
        group_select: -1
        ignore_case: true
        ignore_punctuation: true
        regex_pattern: "(\\\\([A-Z]\\\\))"
      - function: "take_first"
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
metadata:
  version: 1.5
"""
    (tasks / "tiny_mcq.yaml").write_text(yaml)
    return root / "tasks"


def _recipe(tmp_path: Path, **eval_overrides):
    data = {
        "name": "evaltest",
        "model": {"base": str(tmp_path), "name": "t"},
        "calibration": {"prompts": "p.jsonl", "domains": ["math"], "prompts_per_domain": 1, "max_new_tokens": 4},
        "dropmap": {"strategy": "uniform-count", "keep_count": 2},
        "prune": {"max_shard_bytes": 4096},
        # one request per server slot (the recipe requires eval.num_concurrent == serve.parallel)
        "serve": {"ctx_size": 512, "parallel": eval_overrides.get("num_concurrent", 2)},
        "eval": {"tasks": ["tiny_mcq"], "include_path": "tasks", "max_gen_toks": 77, "seed": 1234,
                 "num_concurrent": 2, "request_timeout_s": 30, "bootstrap_resamples": 500, **eval_overrides},
    }
    return parse_recipe(data, source_path=tmp_path / "recipe.toml")


class FakeServed(SimpleNamespace):
    """A fake_chat_server process as the evaluator sees a LlamaServer: it proves its identity
    (the alias it was started with, the GGUF path) through llama-server's /props fields."""

    def props(self):
        from moeprune.llamacpp.server import read_props

        return read_props("127.0.0.1", self.port)

    def confirm_serving(self):
        from moeprune.llamacpp.server import LlamaServerError, identity_problem

        code = self.process.poll()
        problem = (f"it exited with code {code}" if code is not None
                   else identity_problem(self.props(), self.alias, str(self.gguf_path)))
        if problem:
            raise LlamaServerError(f"fake server for {self.gguf_path.name}: {problem}; log: {self.log_path}")


class FakeServers:
    """A server factory for run_eval: one fake_chat_server process per model."""

    def __init__(self, tmp_path: Path, extra_args: dict[str, list[str]] | None = None) -> None:
        self.tmp_path = tmp_path
        self.extra_args = extra_args or {}
        self.started: list[str] = []
        self.processes: list[subprocess.Popen] = []

    @contextlib.contextmanager
    def __call__(self, model: str, gguf_path: Path, log_path: Path):
        from moeprune.llamacpp.server import new_alias, stable_identity

        correct = BASE_CORRECT if model == "base" else PRUNED_CORRECT
        answers = {f"[q{i:02d}]": _response(i, correct) for i in range(QUESTIONS)}
        answers_path = self.tmp_path / f"answers-{model}.json"
        answers_path.write_text(json.dumps(answers))
        self.started.append(model)
        alias = new_alias()
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [sys.executable, str(FAKE_SERVER), "--answers", str(answers_path), "--reasoning",
                 "--alias", alias, "--model", str(gguf_path), *self.extra_args.get(model, [])],
                stdout=subprocess.PIPE, stderr=log, text=True,
            )
        self.processes.append(process)
        try:
            port = int(process.stdout.readline().split()[1])
            served = FakeServed(base_url=f"http://127.0.0.1:{port}", flags=["--fake", model], port=port,
                                process=process, log_path=log_path, alias=alias, gguf_path=Path(gguf_path))
            served.identity = stable_identity(served.props())
            yield served
        finally:
            process.terminate()
            process.wait(timeout=10)


@pytest.fixture
def eval_setup(tmp_path):
    _write_task(tmp_path)
    layout = RunLayout(tmp_path / "runs" / "evaltest")
    ggufs = {}
    for model in ("base", "pruned"):
        path = tmp_path / f"{model}.gguf"
        path.write_bytes(b"GGUF-not-really-" + model.encode())
        ggufs[model] = path
    return tmp_path, layout, ggufs


def _run(tmp_path, layout, ggufs, servers, **eval_overrides):
    return run_eval(_recipe(tmp_path, **eval_overrides), layout, gguf_paths=ggufs,
                    server_factory=servers, build_record={"key": "fake-build"})


def test_run_eval_scores_both_models_and_recomputes_exactly(eval_setup):
    tmp_path, layout, ggufs = eval_setup
    servers = FakeServers(tmp_path)
    results = _run(tmp_path, layout, ggufs, servers)
    assert servers.started == ["base", "pruned"]
    stored = json.loads(layout.results_path.read_text())
    assert stored == json.loads(json.dumps(results))
    validate("results", stored)

    # Numbers known in advance from the answer tables.
    base = stored["models"]["base"]["tasks"]["tiny_mcq"]
    pruned = stored["models"]["pruned"]["tasks"]["tiny_mcq"]
    assert base["n_samples"] == QUESTIONS
    assert base["scores"]["flexible-extract"]["exact_match"]["value"] == 9 / 12
    assert pruned["scores"]["flexible-extract"]["exact_match"]["value"] == 8 / 12
    flex = [1.0 if i in BASE_CORRECT else 0.0 for i in range(QUESTIONS)]
    assert base["scores"]["flexible-extract"]["exact_match"]["stderr"] == stats.accuracy_stderr(flex)
    strict_base = sum(1 for i in BASE_CORRECT if i % 2 == 0) / 12  # only the strict form matches
    assert base["scores"]["strict-match"]["exact_match"]["value"] == strict_base
    assert base["task_version"] == 1.5
    assert (base["error_analysis"]["correct"], base["error_analysis"]["wrong"],
            base["error_analysis"]["invalid"]) == (9, 2, 1)
    comparison = stored["comparisons"]["tiny_mcq"]
    assert comparison["table"] == {"both_correct": 7, "base_only_correct": 2, "pruned_only_correct": 1,
                                   "both_wrong": 2}
    assert comparison["mcnemar"]["p_value"] == 1.0  # 2 vs 1 discordant: 2 * 4/8 capped at 1
    assert comparison["difference"] == 8 / 12 - 9 / 12
    assert comparison["bootstrap"]["resamples"] == 500 and comparison["bootstrap"]["seed"] == 1234

    # Provenance: served file, flags, build, seeds, lm-eval version and settings.
    record = stored["models"]["pruned"]
    assert record["gguf"]["sha256"] == __import__("hashlib").sha256(ggufs["pruned"].read_bytes()).hexdigest()
    assert record["server_flags"] == ["--fake", "pruned"]
    # run.json: what the server proved about itself (no nonce, port or pid) and its log in the run.
    run_record = json.loads((layout.eval_dir / "pruned" / "run.json").read_text())
    assert run_record["server"] == {"model_file": "pruned.gguf", "model_ftype": "fake", "build_info": "fake-build",
                                    "total_slots": 1, "n_ctx": 512, "log": "logs/llama-server-pruned.log"}
    assert record["llamacpp_build"] == {"key": "fake-build"}
    assert set(record["seeds"].values()) == {1234}
    assert record["lm_eval"]["version"] == __import__("lm_eval").__version__
    assert record["lm_eval"]["model_args"]["tokenizer_backend"] is None
    assert stored["settings"]["max_gen_toks"] == 77

    # What went over the wire: the recipe's budget, greedy, the pinned seed.
    payloads = [json.loads(line.split(" ", 1)[1]) for line in
                (layout.logs_dir / "llama-server-base.log").read_text().splitlines()
                if line.startswith("payload ")]
    assert len(payloads) == QUESTIONS
    assert {(p["max_tokens"], p["temperature"], p["seed"]) for p in payloads} == {(77, 0.0, 1234)}

    # Logs: written whole, partial log gone, and an auditor's recomputation is identical.
    log = layout.eval_dir / "base" / "samples_tiny_mcq.jsonl"
    assert len(read_sample_log(log)) == 2 * QUESTIONS  # one record per (question, filter)
    assert not (layout.eval_dir / "base" / "samples.partial.jsonl").exists()
    assert not partial_log_path(layout, "base").exists()
    assert not list(layout.eval_dir.glob(".*.tmp-*")), "no staging directory left behind"
    responses = [json.loads(line) for line in (layout.eval_dir / "base" / "responses.jsonl").read_text().splitlines()]
    assert sorted(r["doc_ids"][0] for r in responses) == list(range(QUESTIONS))
    assert {(r["finish_reason"], r["reasoning_chars"]) for r in responses} == {("stop", len("thinking " * 3))}
    assert json.loads(json.dumps(recompute_results(layout.eval_dir))) == stored
    assert check_results(layout.eval_dir) == []

    from moeprune.eval.results import summary_lines

    lines = summary_lines(stored)
    assert lines[0].startswith("base tiny_mcq (n=12): exact_match,flexible-extract 75.00% ± ")
    assert lines[-1].startswith("tiny_mcq: pruned - base = -8.33 pp (paired bootstrap 95% CI ")


def test_eval_records_finish_reason_in_the_samples_and_the_canary_counts_truncation(eval_setup):
    # lm-eval's sample records drop the server's finish_reason; invoke eval puts it back, so the
    # loop canary can count answers cut off at max_gen_toks from the sample log alone.
    tmp_path, layout, ggufs = eval_setup
    servers = FakeServers(tmp_path, extra_args={"pruned": ["--truncate", "[q03]"]})
    stored = _run(tmp_path, layout, ggufs, servers)
    for model, cut in (("base", set()), ("pruned", {3})):
        records = read_sample_log(layout.eval_dir / model / "samples_tiny_mcq.jsonl")
        assert {r["doc_id"] for r in records if r["finish_reason"] == "length"} == cut
        assert {r["finish_reason"] for r in records} <= {"stop", "length"}
        canary = stored["models"][model]["tasks"]["tiny_mcq"]["error_analysis"]["canary"]
        assert canary["truncated"] == len(cut)
    from moeprune.eval.results import summary_lines

    assert [line.split(" | ")[-1] for line in summary_lines(stored)[:2]] == [
        "hit the budget 0, looping 0, empty 0", "hit the budget 1, looping 0, empty 0"]


def test_tampered_sample_log_is_caught(eval_setup):
    tmp_path, layout, ggufs = eval_setup
    _run(tmp_path, layout, ggufs, FakeServers(tmp_path), models=["base"])
    log = layout.eval_dir / "base" / "samples_tiny_mcq.jsonl"
    records = read_sample_log(log)
    for record in records:  # flip one wrong answer to correct
        if record["doc_id"] == 11:
            record["exact_match"] = 1.0
    write_sample_log(log, records)
    with pytest.raises(MoepruneError, match="lm-eval reported"):
        recompute_results(layout.eval_dir)


def test_server_dying_mid_eval_keeps_partial_log_and_writes_no_results(eval_setup):
    tmp_path, layout, ggufs = eval_setup
    servers = FakeServers(tmp_path, extra_args={"pruned": ["--die-after", "5"]})
    with pytest.raises(EvalError) as caught:
        _run(tmp_path, layout, ggufs, servers, num_concurrent=1)
    message = str(caught.value)
    assert "'pruned'" in message and "exited with code 1" in message
    partial = partial_log_path(layout, "pruned")
    assert str(partial) in message
    lines = [json.loads(line) for line in partial.read_text().splitlines()]
    assert len(lines) == 5
    assert all(line["task"] == "tiny_mcq" and line["response"] for line in lines)
    assert not layout.results_path.exists()
    # eval/ is replaced only when every model completed: nothing of this failed run is in it.
    assert not (layout.eval_dir / "pruned" / "run.json").exists()
    assert not (layout.eval_dir / "base" / "run.json").exists()
    assert not list(layout.eval_dir.glob(".*.tmp-*")) if layout.eval_dir.exists() else True


def test_answers_of_a_server_that_does_not_prove_its_identity_are_void(eval_setup):
    """After the eval the server must still be the one started for it (the /props nonce); an
    impostor's answers write nothing."""
    tmp_path, layout, ggufs = eval_setup
    servers = FakeServers(tmp_path, extra_args={"pruned": ["--props-alias", "moeprune-someone-else"]})
    with pytest.raises(EvalError) as caught:
        _run(tmp_path, layout, ggufs, servers)
    message = str(caught.value)
    assert "\n" not in message and "'pruned' is void" in message, message
    assert "moeprune-someone-else" in message and str(layout.log_path("llama-server-pruned")) in message
    assert not layout.results_path.exists() and not (layout.eval_dir / "pruned" / "run.json").exists()


def _tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_failed_eval_keeps_previous_results_and_logs(eval_setup):
    """Issue 15: a failed `invoke eval` must not delete the finished eval/results.json."""
    tmp_path, layout, ggufs = eval_setup
    _run(tmp_path, layout, ggufs, FakeServers(tmp_path))
    before = _tree_bytes(layout.eval_dir)
    assert "results.json" in before and "base/run.json" in before

    # Fault 1: the server dies mid-eval of the second model.
    servers = FakeServers(tmp_path, extra_args={"pruned": ["--die-after", "3"]})
    with pytest.raises(EvalError, match="'pruned'.*exited with code 1") as caught:
        _run(tmp_path, layout, ggufs, servers, num_concurrent=1)
    assert "Traceback" not in str(caught.value)
    assert _tree_bytes(layout.eval_dir) == before, "eval/ changed although the eval failed"
    assert partial_log_path(layout, "pruned").is_file()

    # Fault 2: the server never starts (before any request).
    class NoServer:
        def __call__(self, model, gguf_path, log_path):
            raise EvalError(f"llama-server for '{model}' did not start; log: {log_path}")

    with pytest.raises(EvalError, match="did not start"):
        run_eval(_recipe(tmp_path), layout, gguf_paths=ggufs, server_factory=NoServer(),
                 build_record={"key": "fake-build"})
    assert _tree_bytes(layout.eval_dir) == before
    assert not list(layout.eval_dir.glob(".*.tmp-*"))

    # The previous results still verify against their logs, and a rerun recovers.
    assert check_results(layout.eval_dir) == []
    _run(tmp_path, layout, ggufs, FakeServers(tmp_path))
    after = _tree_bytes(layout.eval_dir)
    assert after["results.json"] == before["results.json"]  # (responses.jsonl is in arrival order)
    assert sorted(after) == sorted(before)


def test_request_timeout_is_a_clear_error(eval_setup):
    tmp_path, layout, ggufs = eval_setup
    servers = FakeServers(tmp_path, extra_args={"base": ["--slow", "[q03]", "--slow-s", "20"]})
    with pytest.raises(EvalError, match=r"timed out \(eval.request_timeout_s = 1 s, tried eval.max_retries = 1"):
        _run(tmp_path, layout, ggufs, servers, request_timeout_s=1, max_retries=1, models=["base"])
    partial = partial_log_path(layout, "base")
    assert partial.exists()
    assert not layout.results_path.exists()


def test_missing_local_dataset_fails_before_any_server(tmp_path):
    _write_task(tmp_path, data_file=tmp_path / "nowhere" / "data.jsonl")
    layout = RunLayout(tmp_path / "runs" / "evaltest")
    ggufs = {m: tmp_path / f"{m}.gguf" for m in ("base", "pruned")}
    for path in ggufs.values():
        path.write_bytes(b"x")
    servers = FakeServers(tmp_path)
    with pytest.raises(EvalError, match="could not load the task dataset"):
        _run(tmp_path, layout, ggufs, servers)
    assert servers.started == []


def test_gated_task_without_token_fails_before_any_server(eval_setup, monkeypatch):
    tmp_path, layout, ggufs = eval_setup
    monkeypatch.setattr("moeprune.eval.run.hub_token", lambda: None)
    servers = FakeServers(tmp_path)
    with pytest.raises(EvalError, match="gated Hub dataset 'Idavidrein/gpqa'"):
        _run(tmp_path, layout, ggufs, servers, tasks=["gpqa_diamond_cot_zeroshot"])
    assert servers.started == []


def test_missing_gguf_names_the_file(eval_setup):
    tmp_path, layout, ggufs = eval_setup
    ggufs["pruned"].unlink()
    with pytest.raises(EvalError, match=r"GGUF of 'pruned' not found: .*pruned.gguf"):
        _run(tmp_path, layout, ggufs, FakeServers(tmp_path))


def test_results_schema_rejects_a_missing_field(eval_setup):
    tmp_path, layout, ggufs = eval_setup
    results = _run(tmp_path, layout, ggufs, FakeServers(tmp_path), models=["base"])
    assert results["comparisons"] == {}
    broken = json.loads(json.dumps(results))
    del broken["models"]["base"]["tasks"]["tiny_mcq"]["sample_log"]["sha256"]
    with pytest.raises(SchemaError, match="sha256"):
        validate("results", broken)


def test_demo_task_loads_from_any_working_directory(tmp_path, monkeypatch):
    from moeprune.eval.tasks import check_datasets, make_task_manager, resolve_include_path
    from moeprune.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "demo.toml", check_inputs=False)
    monkeypatch.chdir(tmp_path)  # the committed YAML's data path is relative to the repo root
    include = resolve_include_path(recipe, tmp_path / "eval" / "tasks")
    assert include == tmp_path / "eval" / "tasks"
    counts = check_datasets(make_task_manager(recipe, include), ["demo_mcq"], seed=1234, limit=None)
    rows = (ROOT / "src/moeprune/demo/tasks/demo_mcq/demo_mcq.jsonl").read_text().splitlines()
    assert counts == {"demo_mcq": len([r for r in rows if r.strip()])}


# --- the demo, served by llama-server ------------------------------------------------------------------
def _prune_demo(model_dir: Path, work: Path, drop_per_layer: int = 4) -> Path:
    """The demo model without the last ``drop_per_layer`` experts of every MoE layer."""
    from moeprune.dropmap.io import build_drop_map, moe_shape, write_drop_map
    from moeprune.dropmap.select import select_experts
    from moeprune.prune.surgery import prune_checkpoint

    config = json.loads((model_dir / "config.json").read_text())
    num_experts, top_k, layers = moe_shape(config)
    # Scores decreasing with the index: the selection keeps the first experts of each layer.
    scores = np.tile(np.arange(num_experts, 0, -1, dtype=float), (len(layers), 1))
    selection = select_experts("uniform-count", scores, scores, top_k=top_k, keep_count=num_experts - drop_per_layer)
    drop_map = build_drop_map(selection, layers=layers, top_k=top_k, base_model={"id": str(model_dir)},
                              profile_stats_sha256="0" * 64, recipe_sha256=None)
    write_drop_map(work / "expert_drop_metadata.json", drop_map)
    prune_checkpoint(model_dir, work / "expert_drop_metadata.json", work / "pruned", max_shard_bytes=6_000_000)
    return work / "pruned"


@pytest.fixture(scope="module")
def demo_ggufs(tmp_path_factory, llama_build_shared):
    """{"base": Q4_K_M GGUF of the demo model, "pruned": Q4_K_M GGUF with 4 experts/layer dropped}."""
    from moeprune.demo import MODEL_DIR
    from moeprune.llamacpp.convert import convert_to_gguf
    from moeprune.llamacpp.quantize import quantize_gguf

    work = tmp_path_factory.mktemp("demo_eval")
    build = llama_build_shared
    sources = {"base": MODEL_DIR, "pruned": _prune_demo(MODEL_DIR, work)}
    paths = {}
    for model, hf_dir in sources.items():
        convert_to_gguf(build, hf_dir, work / f"{model}-F32.gguf", "f32")
        quantize_gguf(build, work / f"{model}-F32.gguf", work / f"{model}-Q4_K_M.gguf", "Q4_K_M")
        paths[model] = work / f"{model}-Q4_K_M.gguf"
    return paths


def _demo_recipe(**eval_overrides):
    from moeprune.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "demo.toml", check_inputs=False)
    section = recipe.eval.model_copy(update=eval_overrides)
    return recipe.model_copy(update={"eval": section})


@pytest.mark.slow
@pytest.mark.llamacpp
def test_demo_eval_end_to_end(demo_ggufs, tmp_path):
    layout = RunLayout(tmp_path / "demo")
    recipe = _demo_recipe()
    results = run_eval(recipe, layout, gguf_paths=demo_ggufs)
    stored = json.loads(layout.results_path.read_text())
    validate("results", stored)
    data_rows = [line for line in (ROOT / "src/moeprune/demo/tasks/demo_mcq/demo_mcq.jsonl").read_text().splitlines()
                 if line.strip()]
    for model in ("base", "pruned"):
        entry = stored["models"][model]
        task = entry["tasks"]["demo_mcq"]
        assert task["n_samples"] == len(data_rows)
        assert {"flexible-extract", "strict-match"} <= set(task["scores"])
        assert entry["gguf"]["sha256"] == __import__("hashlib").sha256(demo_ggufs[model].read_bytes()).hexdigest()
        assert entry["gguf"]["file_type"] == "MOSTLY_Q4_K_M"
        assert "--reasoning-budget" in entry["server_flags"]
        assert entry["llamacpp_build"]["key"]
        analysis_ = task["error_analysis"]
        assert analysis_["correct"] + analysis_["wrong"] + analysis_["invalid"] == len(data_rows)
        log = layout.eval_dir / task["sample_log"]["path"]
        flexible = [r for r in read_sample_log(log) if r["filter"] == "flexible-extract"]
        assert task["scores"]["flexible-extract"]["exact_match"]["value"] == stats.accuracy(
            [r["exact_match"] for r in sorted(flexible, key=lambda r: r["doc_id"])])
        # a real llama-server's finish_reason reaches every sample, so the canary counts truncation
        assert all(r["finish_reason"] in ("stop", "length") for r in flexible)
        assert analysis_["canary"]["truncated"] == sum(r["finish_reason"] == "length" for r in flexible)
    comparison = stored["comparisons"]["demo_mcq"]
    assert sum(comparison["table"].values()) == len(data_rows)
    assert comparison["bootstrap"]["low"] <= comparison["difference"] <= comparison["bootstrap"]["high"]
    assert json.loads(json.dumps(recompute_results(layout.eval_dir))) == stored == json.loads(json.dumps(results))
    # The base model must actually answer: a demo that scores at chance proves no plumbing.
    assert stored["models"]["base"]["tasks"]["demo_mcq"]["error_analysis"]["invalid"] < len(data_rows)


@pytest.mark.slow
@pytest.mark.llamacpp
def test_demo_server_killed_mid_eval(demo_ggufs, tmp_path):
    import os
    import signal
    import threading
    import time

    from moeprune.llamacpp import ensure_llamacpp
    from moeprune.llamacpp.server import LlamaServer

    recipe = _demo_recipe(num_concurrent=1, max_retries=1)
    build = ensure_llamacpp(recipe.llamacpp)
    layout = RunLayout(tmp_path / "demo")
    partial = partial_log_path(layout, "base")

    @contextlib.contextmanager
    def killing_factory(model, gguf_path, log_path):
        with LlamaServer(build, gguf_path, recipe.serve, log_path) as server:
            def kill_after_two_answers():
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline:
                    if partial.is_file() and len(partial.read_text().splitlines()) >= 2:
                        os.killpg(server.process.pid, signal.SIGKILL)
                        return
                    time.sleep(0.05)
            threading.Thread(target=kill_after_two_answers, daemon=True).start()
            yield server

    with pytest.raises(EvalError) as caught:
        run_eval(recipe, layout, gguf_paths=demo_ggufs, server_factory=killing_factory,
                 build_record=dict(build.record))
    message = str(caught.value)
    assert "llama-server exited" in message and str(partial) in message
    assert len(partial.read_text().splitlines()) >= 2
    assert not layout.results_path.exists()
    assert not (layout.eval_dir / "base" / "run.json").exists()


@pytest.mark.slow
@pytest.mark.llamacpp
def test_demo_eval_is_reproducible_with_one_slot(demo_ggufs, tmp_path):
    # Greedy decoding is bit-reproducible only with one server slot and one request at a time:
    # with --parallel 2 llama.cpp batches requests together and the demo's answers change from
    # run to run (measured: 3 of 16 identical). The same GGUF twice must give the same log.
    recipe = _demo_recipe(models=["base"], limit=8, num_concurrent=1)
    recipe = recipe.model_copy(update={"serve": recipe.serve.model_copy(update={"parallel": 1})})
    texts, run_records = [], []
    for attempt in range(2):
        layout = RunLayout(tmp_path / f"run{attempt}")
        run_eval(recipe, layout, gguf_paths={"base": demo_ggufs["base"]})
        records = read_sample_log(layout.eval_dir / "base" / "samples_demo_mcq.jsonl")
        texts.append(sorted((r["doc_id"], r["filter"], r["resps"][0][0]) for r in records))
        run_records.append((layout.eval_dir / "base" / "run.json").read_bytes())
    assert texts[0] == texts[1]
    # Another port, another identity nonce, another run directory: the same run.json, byte for byte.
    assert run_records[0] == run_records[1]
    assert json.loads(run_records[0])["server"]["model_file"] == demo_ggufs["base"].name


def _metrics(base_url: str) -> dict[str, float]:
    """llama-server's Prometheus counters (``--metrics``): {"prompt_tokens_total": ..., ...}."""
    import urllib.request

    text = urllib.request.urlopen(f"{base_url}/metrics", timeout=30).read().decode()
    return {line.split()[0].removeprefix("llamacpp:"): float(line.split()[1])
            for line in text.splitlines() if line.startswith("llamacpp:")}


@pytest.mark.slow
@pytest.mark.llamacpp
def test_eval_never_scores_a_rival_llama_server_on_its_port(demo_ggufs, tmp_path, monkeypatch):
    """Issue 22: another llama-server, serving the *pruned* GGUF, holds the port that 8dc2f54's
    free_port() returned for the base's server (taken between the look and the bind). 8dc2f54 took
    the rival's /health 200 for its own server's and lm-eval scored the pruned model as the base.
    Now the base's server binds a port of its own (--port 0) and proves its identity: the eval
    scores it, run.json names what it served, and the rival answers no request."""
    import moeprune.llamacpp.server as server_module
    from moeprune.llamacpp import ensure_llamacpp
    from moeprune.llamacpp.server import LlamaServer

    recipe = _demo_recipe(models=["base"], limit=4, num_concurrent=1)
    build = ensure_llamacpp(recipe.llamacpp)
    layout = RunLayout(tmp_path / "demo")
    with LlamaServer(build, demo_ggufs["pruned"], recipe.serve, tmp_path / "rival.log",
                     extra_flags=["--metrics"]) as rival:
        monkeypatch.setattr(server_module, "free_port", lambda host="127.0.0.1": rival.port, raising=False)
        run_eval(recipe, layout, gguf_paths={"base": demo_ggufs["base"]}, combine=False)
        rival_metrics = _metrics(rival.base_url)
    assert rival_metrics["prompt_tokens_total"] == 0 and rival_metrics["tokens_predicted_total"] == 0, rival_metrics
    record = json.loads((layout.eval_dir / "base" / "run.json").read_text())
    assert record["server"]["model_file"] == demo_ggufs["base"].name
    assert record["server"]["log"] == "logs/llama-server-base.log" and record["server"]["build_info"]
    assert "<nonce>" in record["server_flags"] and not any("moeprune-" in flag for flag in record["server_flags"])
