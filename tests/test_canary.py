"""The loop canary: truncated, looping and empty responses, counted from the sample logs, shown on
the card and re-derived by verify."""

from __future__ import annotations

import json
import shutil

import pytest
from fakerun import LOOPING_DOCS, TASK, make_fake_run

from moeprune.eval.analysis import (
    LOOP_MAX_NGRAM_WORDS,
    LOOP_MIN_REPEATS,
    LOOP_MIN_SPAN_WORDS,
    ends_in_loop,
    error_analysis,
    is_empty_response,
    loop_canary,
)
from moeprune.eval.samples import with_finish_reasons
from moeprune.verify import verify

REASONING = "First compare the options. The energy levels differ by a factor of two, so the answer is"


def record(text: str, doc_id: int = 0, **extra) -> dict:
    return {"doc_id": doc_id, "resps": [[text]], "filter": "flexible-extract", "filtered_resps": ["[invalid]"],
            "exact_match": 0.0, "target": "(A)", **extra}


# --- the rule, on hand-made responses -----------------------------------------------------------
def test_a_tail_repeating_one_ngram_is_a_loop():
    assert ends_in_loop(REASONING + " wait, let me recheck" * 10)
    assert ends_in_loop(REASONING + " no" * LOOP_MIN_SPAN_WORDS)  # one word, over the minimum span
    # cut off at the budget in the middle of a copy: still a loop
    assert ends_in_loop(REASONING + " so the answer is (B) because" * 6 + " so the ans")


def test_near_loops_are_not_loops():
    phrase = " wait, let me recheck"
    # one copy short of the minimum repeats
    assert not ends_in_loop(REASONING + phrase * (LOOP_MIN_REPEATS - 1))
    # enough copies of a short n-gram, but below the minimum span of words
    assert not ends_in_loop(REASONING + " no" * (LOOP_MIN_SPAN_WORDS - 1))
    # a loop the model escaped from, then answered: the tail does not repeat
    assert not ends_in_loop(REASONING + phrase * 10 + " Having rechecked, the answer is (C).")
    # repetition with a counter that changes every copy is progress, not a loop
    assert not ends_in_loop(" ".join(f"step {i}: add one to the total." for i in range(40)))
    assert not ends_in_loop(REASONING + " (B).")


def test_empty_and_whitespace_only_responses_are_empty():
    assert is_empty_response("")
    assert is_empty_response(" \n\t ")
    assert not is_empty_response(" (B) ")
    assert not ends_in_loop("") and not ends_in_loop("   ")


def test_truncated_is_finish_reason_length_and_unknown_when_not_recorded():
    records = [record(REASONING + " hmm" * 30, 0, finish_reason="length"),
               record(REASONING + " (A).", 1, finish_reason="stop"),
               record("  ", 2, finish_reason="stop"),
               record("", 3, finish_reason="length")]
    canary = loop_canary(records)
    assert (canary["truncated"], canary["looping"], canary["empty"]) == (2, 1, 2)
    # a log without finish_reason (lm-eval's own writer) must not read as "none truncated"
    assert loop_canary([record("x", 0), record("y", 1, finish_reason="stop")])["truncated"] is None


def test_sample_file_with_known_loops_and_one_without():
    looping = [record(REASONING + " I cannot decide" * 8, 0), record(REASONING + " (B).", 1),
               record(REASONING + " let me think again about it." * 5, 2)]
    clean = [record(REASONING + f" ({letter}).", i) for i, letter in enumerate("ABCD")]
    assert error_analysis(looping)["canary"]["looping"] == 2
    assert error_analysis(clean)["canary"]["looping"] == 0


def test_finish_reasons_join_the_sample_records_by_task_doc_and_text():
    samples = [record("answer (A)", 0), record("answer (B)", 1), record("answer (C)", 2)]
    responses = [{"task": TASK, "doc_ids": [0], "response": "answer (A)", "finish_reason": "stop",
                  "completion_tokens": 12},
                 {"task": TASK, "doc_ids": [1], "response": "answer (B)", "finish_reason": "length",
                  "completion_tokens": 4096},
                 {"task": "other", "doc_ids": [2], "response": "answer (C)", "finish_reason": "stop"},
                 {"task": TASK, "doc_ids": [2], "response": "something else", "finish_reason": "stop"}]
    joined = with_finish_reasons(samples, responses, TASK)
    assert [r.get("finish_reason") for r in joined] == ["stop", "length", None]
    assert "finish_reason" not in joined[2]  # no reply of this task with this text: not guessed
    assert joined[1]["completion_tokens"] == 4096
    assert "finish_reason" not in samples[0]  # the input is not modified


# --- card and verify, through the fake run ------------------------------------------------------
@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    return make_fake_run(tmp_path_factory.mktemp("canary") / "work")


def test_card_reports_the_canary_next_to_accuracy_with_sources(fake_run):
    card_dir = fake_run.layout.card_dir
    numbers = json.loads((card_dir / "card_numbers.json").read_text())["numbers"]
    results = json.loads((fake_run.layout.eval_dir / "results.json").read_text())
    canary = results["models"]["pruned"]["tasks"][TASK]["error_analysis"]["canary"]
    assert (canary["truncated"], canary["looping"], canary["empty"]) == (2, 2, 1)
    for kind in ("truncated", "looping", "empty"):
        entry = numbers[f"err.pruned.{TASK}.{kind}"]
        assert entry["value"] == canary[kind]
        assert entry["source"].endswith(f"models.pruned.tasks.{TASK}.error_analysis.canary.{kind}")
    assert numbers[f"err.base.{TASK}.looping"]["value"] == 0
    text = (card_dir / "README.md").read_text()
    assert "Loop canary: 2 hit the generation budget, 2 end in a repeated n-gram loop, 1 end empty" in text
    assert "Loop canary: 0 hit the generation budget, 0 end in a repeated n-gram loop, 0 end empty" in text
    assert f"at least {LOOP_MIN_REPEATS} times in a row" in text
    assert len(LOOPING_DOCS) == 3


@pytest.fixture
def run_copy(fake_run, tmp_path):
    target = tmp_path / "runs" / fake_run.layout.root.name
    shutil.copytree(fake_run.layout.root, target, ignore=shutil.ignore_patterns("logs"))
    return target


def failures(report) -> str:
    return "\n".join(f"{c.name} {c.target}: {c.detail}" for c in report.failures)


def test_verify_fails_on_a_forged_loop_count_naming_file_and_values(run_copy):
    key = f"err.pruned.{TASK}.looping"
    numbers_path = run_copy / "card" / "card_numbers.json"
    document = json.loads(numbers_path.read_text())
    document["numbers"][key]["value"], document["numbers"][key]["display"] = 0, "0"
    numbers_path.write_text(json.dumps(document))
    readme = run_copy / "card" / "README.md"
    readme.write_text(readme.read_text().replace("2 end in a repeated n-gram loop", "0 end in a repeated n-gram loop"))
    results_path = run_copy / "eval" / "results.json"
    results = json.loads(results_path.read_text())
    results["models"]["pruned"]["tasks"][TASK]["error_analysis"]["canary"]["looping"] = 0
    results_path.write_text(json.dumps(results))

    report = verify(str(run_copy))
    assert not report.ok
    text = failures(report)
    assert f"card_numbers.json: '{key}' = '0' (0), recomputed '2' (2)" in text
    assert f"eval/results.json/models/pruned/tasks/{TASK}/error_analysis/canary/looping: file says 0, recomputed 2" \
        in text


# --- the seed audit: a card's canary line is a claim, recomputed from the sample log ------------
def test_audit_reads_the_canary_line_and_fails_a_forged_loop_count(tmp_path):
    from moeprune.audit.claims import compare_claims, parse_card
    from moeprune.audit.engine import seed_recomputed_values
    from moeprune.audit.report import AuditReport
    from moeprune.audit.seed import EvalRecomputation

    records = [record(REASONING + " I cannot decide" * 8, 0, finish_reason="length"),
               record(REASONING + " (A).", 1, finish_reason="stop"), record("", 2, finish_reason="stop")]
    log = tmp_path / "samples_gpqa_diamond.jsonl"
    analysis = error_analysis(records)
    values, _ = seed_recomputed_values(tmp_path, None, [EvalRecomputation("gpqa_diamond", log, None, {}, analysis)])
    assert values["looping"][0] == 1 and values["empty"][0] == 1 and values["truncated"][0] == 1

    card = "## Error Analysis\n- Loop canary: 1 hit the generation budget, 3 end in a repeated n-gram loop, 1 end empty\n"
    claims, unparsed = parse_card(card, "README.md")
    assert {c.key: c.value for c in claims} == {"truncated": 1, "looping": 3, "empty": 1} and not unparsed
    report = AuditReport("artifact", "seed")
    compare_claims(report, claims, unparsed, values)
    (failed,) = [row for row in report.rows if row.status == "fail"]
    assert failed.detail.startswith("README.md:2: looping: claimed 3, recomputed '1'")
    assert "samples_gpqa_diamond.jsonl" in failed.detail
    assert {row.check for row in report.rows if row.status == "pass"} == {"truncated", "empty"}


def test_readme_states_the_rule_with_its_constants():
    from pathlib import Path

    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert (f"its last {LOOP_MIN_SPAN_WORDS} or more words repeat one n-gram of at most {LOOP_MAX_NGRAM_WORDS} "
            f"words at least {LOOP_MIN_REPEATS} times in a row") in readme
