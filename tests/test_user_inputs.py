"""Every file a user hands moeprune, damaged, through the real command line (issue 22, item 6).

Each case breaks one user file (recipe, calibration prompts, the base model's config.json and
tokenizer, the held-out KLD text, a task YAML, a drop map given with --drop-map) and runs
``python -m invoke``: the task must exit non-zero with exactly one line on stderr that names the
file, print no traceback, and leave nothing behind in the runs directory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from fakerun import demo_recipe_text
from invoke_cli import invoke
from moeprune.demo import MODEL_DIR as DEMO_MODEL

ROOT = Path(__file__).resolve().parents[1]
DEMO_TASKS = ROOT / "src" / "moeprune" / "demo" / "tasks"
NOT_UTF8 = b"\xff\xfe"


@dataclass
class Case:
    """A recipe in ``tmp`` whose inputs can be swapped for damaged copies."""

    tmp: Path
    text: str

    def use(self, written: str, replacement: Path) -> None:
        """Point the recipe line ``<key> = "<ROOT>/<written>"`` at ``replacement`` instead."""
        old = f'"{ROOT}/{written}"'
        assert self.text.count(old) == 1, old
        self.text = self.text.replace(old, f'"{replacement}"')

    def base_copy(self) -> Path:
        model = self.tmp / "model"
        if not model.exists():
            shutil.copytree(DEMO_MODEL, model)
            self.use("src/moeprune/demo/model", model)
        return model

    def edit_config(self, change: Callable[[dict], None]) -> Path:
        path = self.base_copy() / "config.json"
        config = json.loads(path.read_text())
        change(config)
        path.write_text(json.dumps(config, indent=2))
        return path

    def recipe(self) -> Path:
        path = self.tmp / "recipe.toml"
        if not path.exists():
            path.write_text(self.text)
        return path


def _insert_bytes(path: Path, line: int, data: bytes) -> None:
    """Put ``data`` inside line ``line`` (1-based) of a text file."""
    lines = path.read_bytes().split(b"\n")
    lines[line - 1] = lines[line - 1][:20] + data + lines[line - 1][20:]
    path.write_bytes(b"\n".join(lines))


def recipe_not_utf8(case: Case) -> tuple[list[str], str]:
    path = case.recipe()
    path.write_bytes(path.read_bytes().replace(b"# The embedded demo", b"# The embedded \xe9 demo"))
    return ["check"], f"{path}:1"


def calibration_not_utf8(task: str) -> Callable[[Case], tuple[list[str], str]]:
    def make(case: Case) -> tuple[list[str], str]:
        prompts = case.tmp / "prompts.jsonl"
        shutil.copyfile(ROOT / "calibration" / "demo.jsonl", prompts)
        _insert_bytes(prompts, 3, NOT_UTF8)
        case.use("calibration/demo.jsonl", prompts)
        return [task], f"{prompts}:3"

    return make


def config_malformed(case: Case) -> tuple[list[str], str]:
    path = case.base_copy() / "config.json"
    path.write_text(path.read_text()[:-40])
    return ["check"], str(path)


def config_not_utf8(case: Case) -> tuple[list[str], str]:
    path = case.base_copy() / "config.json"
    _insert_bytes(path, 2, b"\xc3\x28")
    return ["check"], f"{path}:2"


def config_disagrees_with_tensors(case: Case) -> tuple[list[str], str]:
    path = case.edit_config(lambda c: c["text_config"].update(num_experts=12))
    return ["check"], str(path)


def config_without_architectures(case: Case) -> tuple[list[str], str]:
    path = case.edit_config(lambda c: c.pop("architectures"))
    return ["check"], str(path)


def tokenizer_damaged(case: Case) -> tuple[list[str], str]:
    path = case.base_copy() / "tokenizer.json"
    path.write_text(path.read_text()[: 1000])
    return ["check"], str(path.parent)


def kld_text_not_utf8(case: Case) -> tuple[list[str], str]:
    text = case.tmp / "heldout.txt"
    text.write_bytes(b"Plain text.\nThen a Latin-1 byte: caf\xe9.\n")
    case.use("src/moeprune/demo/kld_heldout.txt", text)
    return ["check"], f"{text}:2"


def task_yaml_broken(case: Case) -> tuple[list[str], str]:
    tasks = case.tmp / "tasks"
    shutil.copytree(DEMO_TASKS, tasks)
    yaml = tasks / "demo_mcq" / "demo_mcq.yaml"
    yaml.write_text(yaml.read_text() + "\nmetric_list: [unclosed\n")
    case.use("src/moeprune/demo/tasks", tasks)
    return ["check"], str(yaml)


def drop_map(content: bytes) -> Callable[[Case], tuple[list[str], str]]:
    def make(case: Case) -> tuple[list[str], str]:
        path = case.tmp / "drop.json"
        path.write_bytes(content)
        return ["prune", "--drop-map", str(path), "--out", str(case.tmp / "runs" / "pruned")], str(path)

    return make


CASES = {
    "recipe not UTF-8": recipe_not_utf8,
    "calibration not UTF-8 (check)": calibration_not_utf8("check"),
    "calibration not UTF-8 (profile)": calibration_not_utf8("profile"),
    "config.json malformed": config_malformed,
    "config.json not UTF-8": config_not_utf8,
    "config.json num_experts disagrees with the tensors": config_disagrees_with_tensors,
    "config.json without architectures": config_without_architectures,
    "tokenizer.json damaged": tokenizer_damaged,
    "kld text not UTF-8": kld_text_not_utf8,
    "task YAML broken": task_yaml_broken,
    "drop map not UTF-8": drop_map(b'{"format_version": 1, "base_model": "caf\xe9"}'),
    "drop map malformed": drop_map(b'{"format_version": 1,'),
    "drop map not an object": drop_map(b"[1, 2]"),
}


def run_invoke(args: list[str], recipe: Path, runs: Path) -> subprocess.CompletedProcess:
    """The real entry point (a subprocess): a bad input must end it with one line, no traceback."""
    return invoke(args[0], "--recipe", str(recipe), *args[1:], env={"MOEPRUNE_RUNS_DIR": str(runs)})


def assert_one_line_refusal(result: subprocess.CompletedProcess, names: str, runs: Path) -> str:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert names in lines[0], lines[0]
    written = [p for p in runs.rglob("*") if p.is_file()] if runs.exists() else []
    assert written == [], f"left behind: {written}"
    return lines[0]


@pytest.mark.parametrize("make", list(CASES.values()), ids=list(CASES))
def test_a_damaged_user_file_is_refused_in_one_line_naming_it(tmp_path: Path, make):
    case = Case(tmp_path, demo_recipe_text())
    args, names = make(case)
    runs = tmp_path / "runs"
    assert_one_line_refusal(run_invoke(args, case.recipe(), runs), names, runs)


def test_config_and_tensor_shapes_are_compared_with_the_key_value_and_shape(tmp_path: Path):
    case = Case(tmp_path, demo_recipe_text())
    args, names = config_disagrees_with_tensors(case)
    runs = tmp_path / "runs"
    line = assert_one_line_refusal(run_invoke(args, case.recipe(), runs), names, runs)
    assert "text_config.num_experts = 12" in line and "has shape [16," in line, line
    assert not list(runs.glob("**/*.safetensors"))


def test_prompt_length_is_measured_through_the_chat_template(tmp_path: Path):
    """A prompt that fits the context as raw text but not as the chat-template-rendered turn the
    profile feeds: refused by `invoke check`, naming the prompt's line."""
    from moeprune.profile.generate import render_prompt_ids
    from moeprune.profile.loading import load_tokenizer
    from moeprune.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "demo.toml")
    tokenizer = load_tokenizer(DEMO_MODEL)
    lines = (ROOT / "calibration" / "demo.jsonl").read_text().splitlines()
    record = json.loads(lines[6])
    record["prompt"] = "Which of these numbers is odd, and why? " * 8
    lines[6] = json.dumps(record)
    raw = len(tokenizer(record["prompt"], add_special_tokens=True)["input_ids"])
    rendered = len(render_prompt_ids(tokenizer, record["prompt"], recipe.calibration.enable_thinking))
    others = max(len(render_prompt_ids(tokenizer, json.loads(line)["prompt"], True)) for line in lines if line != lines[6])
    assert rendered > raw >= others, "only the long prompt, and only once rendered, exceeds the context"
    context = raw + recipe.calibration.max_new_tokens  # the raw prompt fits exactly, the rendered one not

    case = Case(tmp_path, demo_recipe_text())
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    case.use("calibration/demo.jsonl", prompts)
    case.edit_config(lambda c: c["text_config"].update(max_position_embeddings=context))
    runs = tmp_path / "runs"
    line = assert_one_line_refusal(run_invoke(["check"], case.recipe(), runs), f"{prompts}:7", runs)
    assert f"is {rendered} tokens through the chat template" in line, line
    assert f"context of {context} tokens" in line, line
