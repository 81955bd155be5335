"""Render the model card: ``card/README.md``, ``card/card_numbers.json`` and ``card/plots/*.png``.

The card text comes from ``model_card/template.md`` (top level of the repository) rendered by huggingface_hub's
``ModelCard.from_template`` with ``ModelCardData`` metadata (base_model, license, tags, the model
index built from ``EvalResult``s). Every number it shows is a key of
:class:`~moeprune.card.numbers.CardNumbers`; ``card_numbers.json`` stores them with their sources
and the non-numeric context, so :func:`render_text` can re-render the exact same text from a
recomputation (that is how ``verify`` checks the card). Rendering never uses the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moeprune.atomic import atomic_dir
from moeprune.base_model import is_hub_id
from moeprune.card.numbers import CardNumbers, compute_card_numbers
from moeprune.eval.analysis import PRIMARY_FILTER, PRIMARY_METRIC
from moeprune.card.plots import render_plots
from moeprune.card.source import ArtifactSource
from moeprune.errors import MoepruneError
from moeprune.hashing import sha256_file
from moeprune.manifest import GGUF_CARD_DIR
from moeprune.resources import data_dir

TEMPLATE_PATH = data_dir("model_card") / "template.md"
GGUF_TEMPLATE_PATH = TEMPLATE_PATH.with_name("gguf_template.md")
# The card of a recalibrated checkpoint has one more section, from its own template (so the card of
# a checkpoint that was not recalibrated, and its record of the template, stay as they were). It
# goes just before this heading of the main template: after the pruning decision it amends.
RECALIBRATION_TEMPLATE_PATH = TEMPLATE_PATH.with_name("recalibration.md")
RECALIBRATION_BEFORE = "\n## Evaluation\n"
CARD_NUMBERS_NAME = "card_numbers.json"
CARD_FORMAT_VERSION = 1

def card_context(recipe: dict[str, Any], drop_map_base_id: str | None, code: dict[str, Any],
                 drop_map_base_revision: str | None = None) -> dict[str, Any]:
    """Non-numeric inputs of the template: names, links, license, code version.

    ``drop_map_base_revision`` is the Hub commit of the base the drop map was made from: the link
    then points at that commit, not at the branch that may have moved since."""
    publish = recipe.get("publish", {}) or {}
    repo_id = publish.get("repo_id")
    base_id = drop_map_base_id if is_hub_id(drop_map_base_id) else None
    version = code.get("moeprune", "?")
    if code.get("git_commit"):
        version += f" (git {code['git_commit'][:12]}{', modified' if code.get('git_dirty') else ''})"
    return {
        "title": recipe["model"]["name"],
        "run_name": recipe["name"],
        "base_id": base_id,
        "base_link": _base_link(base_id, drop_map_base_id, drop_map_base_revision),
        "repo_ref": repo_id or f"path/to/{recipe['name']}",
        "gguf_repo": publish.get("gguf_repo_id"),
        "license": recipe["model"].get("license", "other"),
        "tags": list((recipe.get("card") or {}).get("tags", [])),
        "language": list((recipe.get("card") or {}).get("language", [])),
        "code_version": version,
    }


def _base_link(base_id: str | None, written: str | None, commit: str | None) -> str:
    if not base_id:
        return f"`{written}`"
    if commit:
        return f"[{base_id}](https://huggingface.co/{base_id}/tree/{commit}) (commit `{commit[:12]}`)"
    return f"[{base_id}](https://huggingface.co/{base_id})"


def card_data(numbers: CardNumbers, context: dict[str, Any]) -> Any:
    """``ModelCardData`` with the model index of the pruned model's scores."""
    from huggingface_hub import EvalResult, ModelCardData

    eval_results = []
    for task in numbers.facts.get("tasks", []):
        for key, number in sorted(numbers.numbers.items()):
            prefix = f"eval.pruned.{task}."
            if not key.startswith(prefix) or key.endswith(".n"):
                continue
            filter_name = key[len(prefix):]
            eval_results.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type=task,
                    dataset_name=task,
                    metric_type=PRIMARY_METRIC,
                    metric_name=f"exact_match ({filter_name})",
                    metric_value=round(float(number.value), 6),
                )
            )
    kwargs: dict[str, Any] = {
        "license": context["license"],
        "tags": context["tags"],
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
    }
    if context["language"]:
        kwargs["language"] = context["language"]
    if context["base_id"]:
        kwargs["base_model"] = context["base_id"]
    if eval_results:
        kwargs["eval_results"] = eval_results
        kwargs["model_name"] = context["repo_ref"].split("/")[-1]
    return ModelCardData(**kwargs)


def _template_inputs(numbers: CardNumbers) -> dict[str, Any]:
    """Lists the template iterates over, derived from the number keys (so a re-render matches)."""
    keys = numbers.numbers
    models = numbers.facts.get("models", [])
    tasks = numbers.facts.get("tasks", [])
    primary = numbers.facts.get("task")
    filters = {}
    for model in models:
        for task in tasks:
            prefix = f"eval.{model}.{task}."
            names = sorted(k[len(prefix):] for k in keys if k.startswith(prefix) and not k.endswith(".n"))
            # the headline filter first
            filters[f"{model}.{task}"] = sorted(names, key=lambda name: (name != PRIMARY_FILTER, name))
    letters = {m: sorted(k.rsplit(".", 1)[1] for k in keys if k.startswith(f"err.{m}.{primary}.wrong_letter.")) for m in models}
    marks = {m: sorted((k.rsplit(".", 1)[1] for k in keys if k.startswith(f"err.{m}.{primary}.over.")), key=int)
             for m in models}
    labels = {mark: (f"{int(mark) // 1000}k" if int(mark) % 1000 == 0 else mark)
              for ms in marks.values() for mark in ms}
    facts = dict(numbers.facts) | numbers.wording
    facts["comparisons"] = numbers.tables.get("comparisons", [])
    return {"n": numbers.display(), "f": facts, "t": numbers.tables, "filters": filters, "letters": letters,
            "marks": marks, "mark_labels": labels}


def render_text(numbers: CardNumbers, context: dict[str, Any], template_path: Path = TEMPLATE_PATH) -> str:
    """The card (YAML metadata + markdown) for these numbers and context."""
    from huggingface_hub import ModelCard

    if not template_path.is_file():
        raise MoepruneError(f"{template_path}: card template not found")
    card = ModelCard.from_template(
        card_data(numbers, context),
        template_path=str(template_path),
        **context,
        **_template_inputs(numbers),
    )
    text = str(card)
    text = _with_recalibration(text, numbers, template_path)
    return text if text.endswith("\n") else text + "\n"


def _with_recalibration(text: str, numbers: CardNumbers, template_path: Path) -> str:
    """``text`` with the router recalibration section before :data:`RECALIBRATION_BEFORE`, when the
    numbers have one."""
    import jinja2

    if not numbers.tables.get("recalibration"):
        return text
    if RECALIBRATION_BEFORE not in text:
        raise MoepruneError(f"{template_path}: has no line '{RECALIBRATION_BEFORE.strip()}' to put the "
                            f"recalibration section ({RECALIBRATION_TEMPLATE_PATH.name}) before")
    section = jinja2.Template(RECALIBRATION_TEMPLATE_PATH.read_text(encoding="utf-8"),
                              keep_trailing_newline=True).render(**_template_inputs(numbers))
    head, tail = text.split(RECALIBRATION_BEFORE, 1)
    return head + "\n" + section.strip("\n") + "\n" + RECALIBRATION_BEFORE + tail


def render_gguf_text(numbers: CardNumbers, context: dict[str, Any], template_path: Path = GGUF_TEMPLATE_PATH) -> str:
    """The GGUF repository's card: the published GGUF files, their scores, a link to the main repo."""
    from huggingface_hub import ModelCard, ModelCardData

    kwargs: dict[str, Any] = {"license": context["license"], "tags": sorted({*context["tags"], "gguf"}),
                              "pipeline_tag": "text-generation"}
    if is_hub_id(context["repo_ref"]):
        kwargs["base_model"] = context["repo_ref"]
        kwargs["base_model_relation"] = "quantized"
    if context["language"]:
        kwargs["language"] = context["language"]
    card = ModelCard.from_template(
        ModelCardData(**kwargs), template_path=str(template_path), repo_is_hub=is_hub_id(context["repo_ref"]),
        **context, **_template_inputs(numbers),
    )
    text = str(card)
    return text if text.endswith("\n") else text + "\n"


def numbers_document(numbers: CardNumbers, context: dict[str, Any], template_path: Path = TEMPLATE_PATH) -> dict[str, Any]:
    """The content of ``card_numbers.json``."""
    return {
        "format_version": CARD_FORMAT_VERSION,
        "template_sha256": sha256_file(template_path),
        "gguf_template_sha256": sha256_file(GGUF_TEMPLATE_PATH),
        **({"recalibration_template_sha256": sha256_file(RECALIBRATION_TEMPLATE_PATH)}
           if numbers.tables.get("recalibration") else {}),
        "context": context,
        "facts": numbers.facts,
        "tables": numbers.tables,
        "numbers": numbers.as_json(),
    }


def made_by_these_templates(stored: dict[str, Any], numbers: CardNumbers) -> bool:
    """Whether a stored ``card_numbers.json`` records the templates the card text is rendered from
    now (so a re-render must give its text exactly)."""
    if stored.get("template_sha256") != sha256_file(TEMPLATE_PATH):
        return False
    return (not numbers.tables.get("recalibration")
            or stored.get("recalibration_template_sha256") == sha256_file(RECALIBRATION_TEMPLATE_PATH))


def render_card(
    source: ArtifactSource,
    results: dict[str, Any],
    out_dir: Path,
    context: dict[str, Any],
    template_path: Path = TEMPLATE_PATH,
) -> CardNumbers:
    """Compute the numbers, render README.md, card_numbers.json and the plots into ``out_dir``
    (atomically: the directory is replaced whole). Returns the numbers."""
    from moeprune.schemas import validate

    numbers = compute_card_numbers(source, results)
    text = render_text(numbers, context, template_path)
    document = json.loads(json.dumps(numbers_document(numbers, context, template_path)))
    validate("card_numbers", document, source=out_dir / CARD_NUMBERS_NAME)
    with atomic_dir(out_dir) as tmp:
        (tmp / "README.md").write_text(text, encoding="utf-8")
        with open(tmp / CARD_NUMBERS_NAME, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2, sort_keys=True, ensure_ascii=False)
            handle.write("\n")
        render_plots(numbers.series, tmp / "plots")
        if numbers.tables.get("gguf_files"):
            (tmp / GGUF_CARD_DIR).mkdir()
            (tmp / GGUF_CARD_DIR / "README.md").write_text(render_gguf_text(numbers, context), encoding="utf-8")
    return numbers


def _base_dir_if_present(recipe: Any) -> Path | None:
    """The base checkpoint if it is here (local, or a Hub snapshot already downloaded), else None."""
    from moeprune.base_model import BaseModelError, resolve_base

    try:
        return resolve_base(recipe, download=False).local_dir
    except BaseModelError:
        return None


def run_card(recipe: Any, layout: Any) -> Path:
    """The ``invoke card`` stage: render ``runs/<name>/card/`` from the run's artifacts."""
    from moeprune.eval.results import RESULTS_NAME
    from moeprune.manifest import code_version
    from moeprune.schemas import validate_file

    results_path = layout.eval_dir / RESULTS_NAME
    if not results_path.is_file():
        raise MoepruneError(f"{results_path}: not found; run `invoke eval` before `invoke card`")
    results = validate_file("results", results_path)
    settings = recipe.settings()
    source = ArtifactSource.from_run(layout, settings, base_dir=_base_dir_if_present(recipe))
    drop_map = json.loads(source.drop_map_path.read_text(encoding="utf-8"))
    context = card_context(settings, drop_map["base_model"]["id"], code_version(), drop_map["base_model"].get("revision"))
    render_card(source, results, layout.card_dir, context)
    return layout.card_dir / "README.md"
