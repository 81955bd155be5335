"""Cost of expert-contribution profiling on a Gemma-4-26B-A4B-shaped MoE stack (CPU, random weights).

Prints, on the same tokens:
  * profiled / plain forward time, with moeprune's instrumented experts forward (target <= 1.15);
  * the same ratio for a naive hook that recomputes every expert on every token.

    python bench/profile_overhead.py [--layers 2] [--tokens 256] [--repeats 3] [--dtype bfloat16]

Times are this process's CPU time (``time.process_time``; with one thread it is the compute
spent, and it does not count time lost to other processes on a shared machine), minimum over
interleaved repeats. Wall-clock minima are printed too.
"""

from __future__ import annotations

import argparse
import time

import torch

from moeprune.profile.hooks import find_moe_layers, instrument_moe


def build_stack(num_layers: int, dtype: torch.dtype, device: str = "cpu") -> torch.nn.Module:
    """Gemma 4 26B-A4B shapes: hidden 2816, 128 experts of 704, top-8, dense MLP 2112."""
    from transformers import Gemma4TextConfig, Gemma4TextModel

    layer_types = (["sliding_attention"] * 5 + ["full_attention"]) * (num_layers // 6 + 1)
    config = Gemma4TextConfig(
        vocab_size=1024,
        hidden_size=2816,
        intermediate_size=2112,
        num_hidden_layers=num_layers,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        global_head_dim=512,
        enable_moe_block=True,
        num_experts=128,
        top_k_experts=8,
        moe_intermediate_size=704,
        hidden_size_per_layer_input=0,
        sliding_window=1024,
        layer_types=layer_types[:num_layers],
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Gemma4TextModel(config).to(dtype).eval()
    model = model.to(device)
    with torch.no_grad():
        for layer in find_moe_layers(model):  # decisive routing, like a trained router
            layer.router.proj.weight.normal_(0.0, 1.0)
    return model


class NaiveProfiler:
    """The expensive way: a hook that runs every expert on every token and weights by the router."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.layers = find_moe_layers(model)
        device = next(model.parameters()).device
        self.sums = {layer.layer_index: torch.zeros(layer.num_experts, dtype=torch.float64, device=device)
                     for layer in self.layers}
        self.handles = []

    def __enter__(self) -> NaiveProfiler:
        for layer in self.layers:
            self.handles.append(layer.experts.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, layer):
        experts = layer.experts

        def hook(_module, args, _output):
            hidden, top_k_index, top_k_weights = args
            dense_weights = torch.zeros(hidden.shape[0], experts.num_experts, dtype=top_k_weights.dtype,
                                        device=hidden.device)
            dense_weights.scatter_(1, top_k_index, top_k_weights)
            for expert in range(experts.num_experts):
                gate, up = torch.nn.functional.linear(hidden, experts.gate_up_proj[expert]).chunk(2, dim=-1)
                out = torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[expert])
                norms = torch.linalg.vector_norm(out * dense_weights[:, expert, None], dim=-1, dtype=torch.float64)
                self.sums[layer.layer_index][expert] += norms.sum()

        return hook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-repeats", type=int, default=1)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (CUDA times are wall times after synchronize).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    model = build_stack(args.layers, dtype, args.device)
    input_ids = torch.randint(0, 1024, (1, args.tokens), generator=torch.Generator().manual_seed(1)).to(args.device)
    cuda = args.device.startswith("cuda")
    attention_mask = torch.ones_like(input_ids)

    def plain() -> None:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    def profiled() -> None:
        with instrument_moe(model, num_domains=1) as recorder:
            recorder.set_token_domains(torch.zeros(args.tokens, dtype=torch.long, device=args.device))
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    def naive() -> None:
        with NaiveProfiler(model):
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    def timed(fn) -> tuple[float, float]:
        if cuda:
            torch.cuda.synchronize()
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            fn()
        if cuda:  # kernels run asynchronously: the GPU time is the wall time after synchronizing
            torch.cuda.synchronize()
            wall = time.perf_counter() - wall_start
            return wall, wall
        return time.process_time() - cpu_start, time.perf_counter() - wall_start

    timed(plain), timed(profiled)  # warm-up: allocator, kernels
    runs: dict[str, list[tuple[float, float]]] = {"plain": [], "profiled": [], "naive": []}
    for _ in range(args.repeats):
        runs["plain"].append(timed(plain))
        runs["profiled"].append(timed(profiled))
    runs["naive"] = [timed(naive) for _ in range(args.naive_repeats)]
    cpu = {name: min(t[0] for t in values) for name, values in runs.items()}
    wall = {name: min(t[1] for t in values) for name, values in runs.items()}

    print(f"stack: {args.layers} MoE layers, hidden 2816, 128 experts x 704, top-8, dense MLP 2112, "
          f"{args.dtype}, {args.tokens} tokens, {args.threads} thread(s), {args.device}, best of {args.repeats}")
    for name in ("plain", "profiled", "naive"):
        print(f"{name:9s} forward  cpu {cpu[name]:7.3f} s   wall {wall[name]:7.3f} s")
    # Each profiled run is paired with the plain run just before it: the median of those ratios is
    # the estimate least moved by a noisy neighbour.
    paired = sorted(p[0] / q[0] for p, q in zip(runs["profiled"], runs["plain"]))
    print(f"ratio profiled/plain = {cpu['profiled'] / cpu['plain']:.3f} cpu, "
          f"{wall['profiled'] / wall['plain']:.3f} wall, median paired cpu {paired[len(paired) // 2]:.3f}"
          "   (target <= 1.15)")
    print(f"ratio naive/plain    = {cpu['naive'] / cpu['plain']:.3f} cpu, {wall['naive'] / wall['plain']:.3f} wall")


if __name__ == "__main__":
    main()
