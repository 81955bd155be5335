"""Effective bits per weight and fallback counts, read from a GGUF's own tensor table."""

from __future__ import annotations

import numpy as np
import pytest
from fakerun import FAKE_GGUF_FALLBACKS, FAKE_GGUF_TENSORS, write_fake_gguf

from moeprune.errors import MoepruneError
from moeprune.gguf_bits import fallback_counts, read_gguf_bits
from moeprune.plan.ggml import tensor_bytes


def _record_fallbacks() -> list[dict]:
    """The fallbacks as llama-quantize's log names them (lower-case types), parsed into a record."""
    return [{"tensor": name, "requested_type": FAKE_GGUF_FALLBACKS[name].lower(), "actual_type": qtype.lower()}
            for name, _, qtype in FAKE_GGUF_TENSORS if name in FAKE_GGUF_FALLBACKS]


def test_bits_per_weight_is_tensor_bits_over_weights(tmp_path):
    rows = 7
    path = tmp_path / "x-Q4_K_M.gguf"
    write_fake_gguf(path, rows, True, np.random.default_rng(1))
    bits = read_gguf_bits(path, "gguf/x-Q4_K_M.gguf")
    # independent: ggml's block sizes (moeprune.plan.ggml) over the shapes the file was written with
    numel = {name: ncols * (1 if qtype == "F32" else rows) for name, ncols, qtype in FAKE_GGUF_TENSORS}
    want_bytes = sum(tensor_bytes(qtype, numel[name], ncols) for name, ncols, qtype in FAKE_GGUF_TENSORS)
    assert bits.weights == sum(numel.values()) == 64 + rows * (256 + 96 + 96)
    assert bits.tensor_bytes == want_bytes
    assert bits.bits_per_weight == pytest.approx(8 * want_bytes / sum(numel.values()), rel=1e-12)
    assert 4.5 < bits.bits_per_weight < 8  # Q4_K's 4.5 raised by the Q5_0 / Q8_0 fallbacks and the F32 norm
    assert bits.tensor_types == {name: qtype for name, _, qtype in FAKE_GGUF_TENSORS}
    assert fallback_counts(_record_fallbacks(), bits, "gguf/x") == {("Q4_K", "Q5_0"): 1, ("Q6_K", "Q8_0"): 1}


def test_record_that_disagrees_with_the_file_is_an_error(tmp_path):
    path = tmp_path / "x-Q8_0.gguf"
    write_fake_gguf(path, 3, False, np.random.default_rng(2))  # every matrix Q8_0: no Q5_0 in this file
    bits = read_gguf_bits(path, "gguf/x-Q8_0.gguf")
    with pytest.raises(MoepruneError, match=r"gguf/x-Q8_0.gguf: .*blk\.0\.ffn_down_exps\.weight fell back to Q5_0, "
                                            r"the GGUF stores it as Q8_0"):
        fallback_counts(_record_fallbacks(), bits, "gguf/x-Q8_0.gguf")
    missing = [{"tensor": "blk.9.nothing.weight", "requested_type": "q4_K", "actual_type": "q5_0"}]
    with pytest.raises(MoepruneError, match="blk.9.nothing.weight, a tensor the GGUF does not have"):
        fallback_counts(missing, bits, "gguf/x-Q8_0.gguf")


def test_unreadable_gguf_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(MoepruneError, match="gguf/broken.gguf: not a readable GGUF") as info:
        read_gguf_bits(path, "gguf/broken.gguf")
    assert "\n" not in str(info.value)
