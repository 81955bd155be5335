"""The one patch-and-restore scheme (moeprune.patching): every temporary change to a model (the
profiler's instrumentation, masked routing, the streamed replay's layer recorders) is undone
exactly when its block ends, also when the block raises."""

from __future__ import annotations

import pytest
import torch
from families import COMMON, FAMILIES
from tiny_gemma4 import tiny_gemma4_model

from moeprune.arch import arch_for_model
from moeprune.patching import Patches
from moeprune.profile.hooks import instrument_moe


class Boom(Exception):
    pass


def module_state(model: torch.nn.Module) -> dict[str, tuple]:
    """Per module: the identity of everything the instance holds (attributes, parameters, buffers,
    submodules) and how many hooks it has; equal states mean the very same objects are in place."""
    state = {}
    for name, module in model.named_modules(remove_duplicate=False):
        own = tuple(sorted((key, id(value)) for key, value in vars(module).items()))
        held = tuple(
            (store, tuple((key, id(value)) for key, value in getattr(module, store).items()))
            for store in ("_parameters", "_buffers", "_modules")
        )
        hooks = tuple(len(getattr(module, store)) for store in ("_forward_hooks", "_forward_pre_hooks"))
        state[name] = (own, held, hooks)
    return state


def test_every_kind_of_change_is_undone_on_an_exception():
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
    layers[0].note = "kept"
    x = torch.randn(2, 4)
    before, expected = module_state(layers), layers[1](layers[0](x))
    weight = layers[0].weight
    with pytest.raises(Boom), Patches() as patches:
        patches.replace_forward(layers[0], lambda hidden: hidden * 0)  # the class's forward until now
        patches.wrap_forward(layers[1], lambda original: lambda hidden: original(hidden) + 1)
        patches.set_attribute(layers[0], "note", "changed")  # an instance attribute
        patches.set_attribute(layers[0], "weight", torch.nn.Parameter(torch.zeros(4, 4)))  # a parameter
        patches.set_item(layers, 1, torch.nn.Identity())  # a submodule
        patches.forward_hook(layers[0], lambda _module, _inputs, output: output - 1)
        assert torch.equal(layers[0](x), torch.full((2, 4), -1.0)) and isinstance(layers[1], torch.nn.Identity)
        raise Boom
    assert module_state(layers) == before
    assert "forward" not in vars(layers[0]) and layers[0].note == "kept" and layers[0].weight is weight
    assert torch.equal(layers[1](layers[0](x)), expected)


def tiny_qwen3_moe() -> torch.nn.Module:
    """A family whose masked routing re-routes the router's logits (the adapter's default)."""
    import transformers

    family = FAMILIES["qwen3_moe"]
    config = getattr(transformers, family.config_class)(**{**COMMON, **family.kwargs, "vocab_size": 64,
                                                        "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


MODELS = {"gemma4": lambda: tiny_gemma4_model(vocab_size=64), "qwen3_moe": tiny_qwen3_moe}


@pytest.mark.parametrize("dispatched", [False, True], ids=["plain", "accelerate"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_instrumenting_and_masking_leave_the_model_as_it_was(name, dispatched):
    """Masked routing and the profiler's instrumentation, nested and ended by an exception, leave
    every module holding the very objects it held (accelerate's dispatch hooks included: its
    wrapped ``forward`` must survive, or the model stops moving inputs to its devices) and the
    model computing bit for bit what it computed before."""
    model = MODELS[name]()
    if dispatched:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map={"": "cpu"}, force_hooks=True)
    arch = arch_for_model(model)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    before = module_state(model)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        dropped = {m.layer_index: [0, 1, 2] for m in arch.moe_modules(model)}
        with pytest.raises(Boom), arch.masked_routing(model, dropped), instrument_moe(model) as recorder:
            recorder.set_token_domains(torch.zeros_like(ids))
            masked = model(input_ids=ids).logits
            assert not torch.equal(masked, expected), "the routing was masked inside the block"
            assert int(recorder.arrays()[1][:, :, :3].sum()) == 0, "no dropped expert was routed to"
            raise Boom
        after = model(input_ids=ids).logits
    assert module_state(model) == before
    assert torch.equal(after, expected)


def _patches_outside_patching() -> list[str]:
    """Places in moeprune's sources, outside moeprune/patching.py, that change a module by hand:
    a forward hook registered, a forward assigned or deleted (``x.forward = ...``,
    ``setattr(x, "forward", ...)``, ``del x.forward``)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "src" / "moeprune"
    forwards = {"forward", "_old_forward"}
    found = []
    for path in sorted(root.rglob("*.py")):
        if path == root / "patching.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[ast.AST] = []
            if isinstance(node, (ast.Assign, ast.Delete)):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            hand_made = any(isinstance(t, ast.Attribute) and t.attr in forwards for t in targets)
            if isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
                hand_made |= name.startswith("register_forward")
                hand_made |= name in ("setattr", "delattr") and any(
                    isinstance(a, ast.Constant) and a.value in forwards for a in node.args[1:2]
                )
            if hand_made:
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_every_module_swap_goes_through_patches():
    """One scheme: a swap made by hand elsewhere is one more restore path that can be forgotten."""
    assert _patches_outside_patching() == []
