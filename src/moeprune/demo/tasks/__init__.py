"""lm-eval task ``demo_mcq``: the demo model's held-out questions, in gpqa_diamond_cot_zeroshot's shape.

The task mirrors ``gpqa_diamond_cot_zeroshot``: the same ``doc_to_text`` (question, choices
(A)-(D), "Let's think step by step: "), ``doc_to_target`` "(X)", ``generate_until`` with greedy
decoding, and the same ``strict-match`` and ``flexible-extract`` filters and ``exact_match``
metric. The choices are shuffled once, when the dataset is built (gpqa shuffles at load time
with Python's ``random``), so the task does not depend on lm-eval's seed.

Paths: lm-eval hands ``dataset_kwargs.data_files`` to ``datasets.load_dataset``, which resolves
a relative path against the *current working directory*, not the YAML's folder. The committed
``demo_mcq/demo_mcq.yaml`` therefore names the data relative to the repository root (it works
with ``--include_path src/moeprune/demo/tasks`` from the repository root). From anywhere else,
render a copy with an absolute path and include that directory instead::

    from moeprune.demo.tasks import render_task_dir
    include_path = render_task_dir(run_dir / "tasks")   # lm_eval ... --include_path <include_path>

Pass only one of the two directories to lm-eval: both define the task name ``demo_mcq``.
"""

from __future__ import annotations

from pathlib import Path

from moeprune.atomic import atomic_file

TASK_NAME = "demo_mcq"
TASKS_DIR = Path(__file__).resolve().parent
TASK_DIR = TASKS_DIR / TASK_NAME
DATA_FILENAME = "demo_mcq.jsonl"
DATA_PATH = TASK_DIR / DATA_FILENAME
YAML_FILENAME = "demo_mcq.yaml"
# The committed YAML's data path, relative to the repository root.
REPO_RELATIVE_DATA = "src/moeprune/demo/tasks/demo_mcq/demo_mcq.jsonl"


def task_yaml(data_file: str) -> str:
    """The demo_mcq task definition reading its documents from ``data_file``."""
    return f"""\
# demo_mcq: held-out questions of the moeprune demo model, in the exact prompt shape of
# lm-eval's gpqa_diamond_cot_zeroshot (same doc_to_text, filters, metric and generation_kwargs).
# Written by moeprune.demo.tasks.task_yaml; see that module for how data_files is resolved.
task: {TASK_NAME}
tag: moeprune_demo
dataset_path: json
dataset_kwargs:
  data_files:
    train: "{data_file}"
output_type: generate_until
training_split: null
validation_split: null
test_split: train
doc_to_text: "What is the correct answer to this question:{{{{Question}}}}\\nChoices:\\n(A) {{{{choice1}}}}\\n(B) {{{{choice2}}}}\\n(C) {{{{choice3}}}}\\n(D) {{{{choice4}}}}\\nLet's think step by step: "
doc_to_target: answer
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
generation_kwargs:
  until:
    - "</s>"
  do_sample: false
  temperature: 0.0
num_fewshot: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
metadata:
  version: 1.0
"""


def write_committed_yaml() -> Path:
    """(Re)write the packaged YAML, whose data path is relative to the repository root."""
    path = TASK_DIR / YAML_FILENAME
    with atomic_file(path) as handle:
        handle.write(task_yaml(REPO_RELATIVE_DATA))
    return path


def render_task_dir(dest: Path, data_path: Path = DATA_PATH) -> Path:
    """Write ``dest/demo_mcq/demo_mcq.yaml`` naming ``data_path`` absolutely; return ``dest``.

    ``dest`` is then usable as lm-eval's ``--include_path`` from any working directory.
    """
    dest = Path(dest)
    with atomic_file(dest / TASK_NAME / YAML_FILENAME) as handle:
        handle.write(task_yaml(Path(data_path).resolve().as_posix()))
    return dest
