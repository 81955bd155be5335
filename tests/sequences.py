"""Random token sequences in the form the replay takes (what profile's generation writes)."""

from __future__ import annotations

DOMAINS = ["math", "creative"]


def random_sequences(lengths: list[int], vocab_size: int, seed: int = 1) -> list[dict]:
    """One sequence per length, domains alternating over :data:`DOMAINS`, token ids in [3, vocab_size)
    (0-2 are the specials), drawn from ``seed``: the same call gives the same sequences."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "id": f"s{i}",
            "domain": DOMAINS[i % len(DOMAINS)],
            "input_ids": torch.randint(3, vocab_size, (n,), generator=generator).tolist(),
            "prompt_len": 1,
        }
        for i, n in enumerate(lengths)
    ]
