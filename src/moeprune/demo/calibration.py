"""The demo's calibration prompts and its held-out KLD text, drawn from its training distribution.

The demo model is trained on multiple-choice questions (four of five batches) and short general
replies in five domains (one batch in five), see :mod:`moeprune.demo.build`. Calibrating it on
anything else ranks experts on text the model never learned; so the calibration prompts follow
the same mix, drawn from the same generators with their own seed:

* ``mcq-even``, ``mcq-odd``, ``mcq-above``, ``mcq-below``: training-style questions of each kind;
* ``general``: one prompt per general domain generator in turn (math, logic, code, ...).

No calibration prompt is a held-out question of the eval (``heldout_mcqs``, in any choice order),
and the KLD text shares no question with either. Both files are pure functions of the demo seed;
``python -m moeprune.demo.calibration`` rewrites them and a test keeps the committed copies equal
to what this module generates.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from moeprune.atomic import atomic_file
from moeprune.demo import data

DEMO_SEED = 0
HELDOUT_COUNT = 48  # moeprune.demo.build.HELDOUT_COUNT (not imported: build pulls in torch)
MCQ_DOMAINS = {f"mcq-{kind}": kind for kind in data.QUESTION_KINDS}
GENERAL_DOMAIN = "general"
DOMAINS = [*MCQ_DOMAINS, GENERAL_DOMAIN]
PROMPTS_PER_DOMAIN = 5
KLD_TEXT_MCQS = 128
KLD_TEXT_GENERAL = 32

ROOT = Path(__file__).resolve().parents[3]
CALIBRATION_PATH = ROOT / "calibration" / "demo.jsonl"
KLD_TEXT_PATH = Path(__file__).resolve().parent / "kld_heldout.txt"

Key = tuple[str, tuple[int, ...]]


def heldout_keys(seed: int = DEMO_SEED, count: int = HELDOUT_COUNT) -> set[Key]:
    """Identities of the eval's held-out questions (never used for calibration or KLD text)."""
    return {q.key for q in data.heldout_mcqs(count, seed)}


def _fresh_mcq(rng: random.Random, kind: str | None, exclude: set[Key]) -> data.MCQ:
    while True:
        question = data.random_mcq(rng, kind)
        if question.key not in exclude:
            exclude.add(question.key)
            return question


def calibration_prompts(seed: int = DEMO_SEED, per_domain: int = PROMPTS_PER_DOMAIN) -> list[dict[str, str]]:
    """``{"id", "domain", "prompt"}`` rows: ``per_domain`` prompts in each of :data:`DOMAINS`."""
    rng = random.Random(f"demo-calibration-{seed}")
    exclude = heldout_keys(seed)
    rows = []
    for domain, kind in MCQ_DOMAINS.items():
        for index in range(per_domain):
            question = _fresh_mcq(rng, kind, exclude)
            rows.append({"id": f"{domain}-{index + 1:02d}", "domain": domain, "prompt": question.prompt()})
    generators = sorted(data.DOMAIN_GENERATORS)
    for index in range(per_domain):
        name = generators[index % len(generators)]
        prompt, _, _ = data.DOMAIN_GENERATORS[name](rng)
        rows.append({"id": f"{GENERAL_DOMAIN}-{index + 1:02d}-{name}", "domain": GENERAL_DOMAIN, "prompt": prompt})
    return rows


def calibration_keys(rows: list[dict[str, str]]) -> set[Key]:
    """Question identities of the MCQ calibration prompts (parsed back from their text)."""
    keys = set()
    for row in rows:
        kind = MCQ_DOMAINS.get(row["domain"])
        if kind is None:
            continue
        choices = [int(line.split(") ", 1)[1]) for line in row["prompt"].splitlines() if line[:1] == "("]
        keys.add((kind, tuple(sorted(choices))))
    return keys


def kld_text(seed: int = DEMO_SEED, num_mcq: int = KLD_TEXT_MCQS, num_general: int = KLD_TEXT_GENERAL) -> str:
    """Plain held-out text for ``llama-perplexity`` (which does not parse chat control tokens):
    question, step-by-step check and answer of training-style questions, and general replies,
    one blank line apart. Shares no question with the eval's held-out set or the calibration."""
    rng = random.Random(f"demo-kld-text-{seed}")
    exclude = heldout_keys(seed) | calibration_keys(calibration_prompts(seed))
    blocks = []
    general_every = max(1, (num_mcq + num_general) // max(1, num_general))
    made_general = 0
    for index in range(num_mcq + num_general):
        if made_general < num_general and index % general_every == general_every - 1:
            _, prompt, thought, reply = data.general_example(rng)
            made_general += 1
        else:
            question = _fresh_mcq(rng, None, exclude)
            prompt, thought, reply = question.prompt(), question.thought(), question.reply()
        blocks.append(f"{prompt}\n{thought}\n{reply}")
    return "\n\n".join(blocks) + "\n"


def calibration_jsonl(seed: int = DEMO_SEED) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in calibration_prompts(seed))


def write_demo_files(calibration_path: Path = CALIBRATION_PATH, kld_path: Path = KLD_TEXT_PATH,
                     seed: int = DEMO_SEED) -> list[Path]:
    """(Re)write the demo's calibration JSONL and KLD text."""
    with atomic_file(Path(calibration_path)) as handle:
        handle.write(calibration_jsonl(seed))
    with atomic_file(Path(kld_path)) as handle:
        handle.write(kld_text(seed))
    return [Path(calibration_path), Path(kld_path)]


if __name__ == "__main__":
    for path in write_demo_files():
        print(f"wrote {path}", file=sys.stderr)
