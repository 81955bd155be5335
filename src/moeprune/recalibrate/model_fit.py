"""The ``model-kl`` recalibration objective: the kept router tensors of every MoE layer fitted
together, end to end, so the pruned model's next-token distribution matches the base model's.

Why not the per-layer output MSE (``layer-mse``): on the demo at 8 of 16 experts the per-layer fit
moves each layer's loss by at most 2% and leaves the held-out KLD where it was (bench
``bench/recalibration.py``). Two things move it: the loss is the KL to the base's logits on text of
the kind the model is scored on (``recalibrate.text``, a JSONL of documents), and the fit can change
which experts a token goes to. The hard top-k gives the router rows of experts a token did not
choose no gradient; so while training, every router's top-k is relaxed (:class:`RelaxedTopK`):
each kept expert gets weight ``p_e * sigmoid((z_e - t) / tau)`` (``t`` halfway between the k-th
and (k+1)-th logit, renormalised, times the per-expert scale), with ``tau`` annealed
geometrically from ``relax_tau_start`` to ``relax_tau_end``; as ``tau`` falls this becomes the
hard top-k. The held-out loss that picks the kept values is measured with the real hard top-k,
which is also what the checkpoint runs.

Both models are in memory (float32, CPU, one thread, deterministic algorithms): the pruned model is
the base with the drop map's kept experts sliced in memory, as verify-prune proves the pruned
checkpoint holds, so an auditor reruns the fit from the base, the drop map and the text alone.
Mini-batch Adam over the documents' windows in a seeded order; every ``validate_every_steps`` the
held-out windows' KL is measured and the best values kept (rounded to the checkpoint's dtype; if
rounding leaves no held-out gain the pruned router stays as it was).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moeprune.errors import MoepruneError
from moeprune.patching import Patches

class ModelFitError(MoepruneError):
    """The end-to-end recalibration cannot run on these inputs."""


@dataclass(frozen=True)
class ModelFitSettings:
    """The ``[recalibrate]`` values the ``model-kl`` objective reads."""

    learning_rate: float
    epochs: int
    batch_sequences: int
    context_tokens: int
    relax_tau_start: float
    relax_tau_end: float
    validate_every_steps: int
    holdout_fraction: float
    seed: int


def read_documents(path: Path) -> list[str]:
    """The ``text`` of each JSONL row of ``path`` (blank lines skipped); one line naming the row
    when one is not ``{"text": "..."}``."""
    documents = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ModelFitError(f"{path}: cannot read the recalibration text ({exc.strerror}); fix recalibrate.text") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            text = None
        if not isinstance(text, str) or not text:
            raise ModelFitError(f"{path}:{number}: not a recalibration document (a JSON object with a non-empty "
                                "\"text\"); fix the row")
        documents.append(text)
    if not documents:
        raise ModelFitError(f"{path}: holds no document; recalibrate.text needs text in the format the model is scored on")
    return documents


def windows(token_lists: Sequence[Sequence[int]], context_tokens: int, bos_id: int | None) -> list[list[int]]:
    """Each document's tokens (BOS first, added unless it is there) in windows of at most
    ``context_tokens``; every window after a document's first starts again with BOS. Windows of
    fewer than two tokens (nothing to predict) are dropped."""
    out = []
    for tokens in token_lists:
        tokens = list(tokens)
        lead = [bos_id] if bos_id is not None else []
        if lead and tokens[:1] == lead:
            tokens = tokens[1:]
        step = context_tokens - len(lead)
        for start in range(0, len(tokens), step):
            window = lead + tokens[start:start + step]
            if len(window) >= 2:
                out.append(window)
    return out


def split_windows(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) window indices: a seeded permutation, its first ``round(fraction * n)``
    held out (at least one, and at least one left to train on)."""
    if count < 2:
        raise ModelFitError(f"recalibrate.text gives {count} window(s); the fit needs at least 2 (one held out)")
    held = min(count - 1, max(1, round(fraction * count)))
    order = [int(i) for i in np.random.default_rng(seed).permutation(count)]
    return sorted(order[held:]), sorted(order[:held])


class RelaxedTopK:
    """While :attr:`active`, every Gemma 4 router routes each token to all kept experts with the
    relaxed top-k weights (module docstring); otherwise the router's own forward (hard top-k)."""

    def __init__(self, routers: Sequence[torch.nn.Module], top_k: int, patches: Patches) -> None:
        """Wrap each router's forward in ``patches`` (undone when its ``with`` block ends)."""
        self.active, self.tau, self.top_k = False, 1.0, top_k
        for router in routers:
            missing = [name for name in ("norm", "scale", "scalar_root_size", "proj", "per_expert_scale")
                       if not hasattr(router, name)]
            if missing:
                raise ModelFitError(f"recalibrate.objective = 'model-kl' supports Gemma 4 routers only; "
                                    f"{type(router).__name__} has no {', '.join(missing)}: use objective = 'layer-mse'")
            patches.wrap_forward(router, lambda original, router=router: self._relaxed(router, original))

    def _relaxed(self, router: Any, original: Any) -> Any:
        def forward(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            if not self.active:
                return original(hidden)
            scores = router.proj(router.norm(hidden) * router.scale * router.scalar_root_size)
            probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32)
            k = self.top_k
            top = torch.topk(scores, min(k + 1, scores.shape[-1]), dim=-1).values
            threshold = ((top[:, k - 1] + top[:, -1]) / 2).detach()
            weights = probabilities * torch.sigmoid((scores - threshold[:, None]) / self.tau)
            weights = weights / weights.sum(dim=-1, keepdim=True) * router.per_expert_scale
            index = torch.arange(scores.shape[-1]).expand(scores.shape[0], -1)
            return probabilities, weights, index

        return forward


def _kl(model: Any, base: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean KL(base || model) over the positions that predict a real token (``mask`` 1) of ``ids``."""
    with torch.no_grad():
        target = torch.log_softmax(base(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
    log_probs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
    per_token = (target.exp() * (target - log_probs)).sum(dim=-1)
    return per_token[mask[:, 1:].bool()].mean()


def _pad(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (pad id 0, never attended to) and the attention mask."""
    width = max(len(row) for row in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for number, row in enumerate(rows):
        ids[number, :len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[number, :len(row)] = 1
    return ids, mask


def _mean_kl(model: Any, base: Any, rows: Sequence[Sequence[int]], batch: int) -> float:
    """Token-weighted mean KL over ``rows`` (hard routing), batch by batch in order."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            ids, mask = _pad(rows[start:start + batch])
            tokens = int(mask[:, 1:].sum())
            total += float(_kl(model, base, ids, mask)) * tokens
            count += tokens
    return total / count


def fit_model(base: Any, pruned: Any, parameters: Mapping[str, torch.nn.Parameter], routers: Sequence[Any],
              top_k: int, token_lists: Sequence[Sequence[int]], bos_id: int | None, settings: ModelFitSettings,
              storage_dtype: Mapping[str, torch.dtype]) -> dict[str, Any]:
    """Fit ``parameters`` of ``pruned`` (float32, in place) to ``base``'s next-token distribution on
    the documents ``token_lists``; leaves them at the chosen values. Returns those values in their
    checkpoint dtypes (``values``) and what was measured."""
    rows = windows(token_lists, settings.context_tokens, bos_id)
    train_index, held_index = split_windows(len(rows), settings.holdout_fraction, settings.seed)
    train, held = [rows[i] for i in train_index], [rows[i] for i in held_index]
    for p in pruned.parameters():
        p.requires_grad_(False)
    for p in base.parameters():
        p.requires_grad_(False)
    initial = {name: p.detach().clone() for name, p in parameters.items()}
    with Patches() as patches:
        relaxed = RelaxedTopK(routers, top_k, patches)
        held_before = _mean_kl(pruned, base, held, settings.batch_sequences)
        best, best_loss, best_step = initial, held_before, 0
        for p in parameters.values():
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(list(parameters.values()), lr=settings.learning_rate)
        generator = torch.Generator().manual_seed(settings.seed)
        steps_per_epoch = -(-len(train) // settings.batch_sequences)
        total = steps_per_epoch * settings.epochs
        step = 0
        for _epoch in range(settings.epochs):
            order = torch.randperm(len(train), generator=generator).tolist()
            for start in range(0, len(train), settings.batch_sequences):
                ids, mask = _pad([train[i] for i in order[start:start + settings.batch_sequences]])
                progress = step / max(1, total - 1)
                relaxed.tau = settings.relax_tau_start * (settings.relax_tau_end / settings.relax_tau_start) ** progress
                relaxed.active = True
                optimizer.zero_grad(set_to_none=True)
                _kl(pruned, base, ids, mask).backward()
                optimizer.step()
                relaxed.active = False
                step += 1
                if step % settings.validate_every_steps == 0 or step == total:
                    loss = _mean_kl(pruned, base, held, settings.batch_sequences)
                    if loss < best_loss:
                        best, best_loss, best_step = {n: p.detach().clone() for n, p in parameters.items()}, loss, step
    for p in parameters.values():
        p.requires_grad_(False)
    rounded = {name: value.to(storage_dtype[name]) for name, value in best.items()}
    _assign(parameters, rounded)
    held_after = _mean_kl(pruned, base, held, settings.batch_sequences)
    changed = held_after < held_before
    if not changed:
        rounded = {name: value.to(storage_dtype[name]) for name, value in initial.items()}
        _assign(parameters, rounded)
        held_after = held_before
    return {
        "values": rounded, "initial": {name: value.to(storage_dtype[name]) for name, value in initial.items()},
        "changed": changed, "steps": step, "best_step": best_step,
        "holdout_kl_before": held_before, "holdout_kl_after": held_after,
        "train_windows": len(train), "holdout_windows": len(held),
        "train_tokens": sum(len(r) - 1 for r in train), "holdout_tokens": sum(len(r) - 1 for r in held),
    }


def _assign(parameters: Mapping[str, torch.nn.Parameter], values: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in parameters.items():
            p.copy_(values[name].to(p.dtype))


def pruned_in_memory(base: Any, arch: Any, keep_by_layer: Mapping[int, Sequence[int]]) -> Any:
    """A copy of ``base`` holding only the kept experts (the base's kept rows), as the prune stage
    writes them."""
    pruned = copy.deepcopy(base)
    arch.prune_in_memory(pruned, keep_by_layer)
    return pruned
