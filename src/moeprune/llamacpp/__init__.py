"""llama.cpp toolchain: pinned source, cached build, GGUF conversion, quantization, serving.

Public interface:

- ``ensure_llamacpp(recipe.llamacpp) -> LlamaCppBuild`` (fields root, bin_dir, key, record)
- ``convert_to_gguf(build, hf_dir, out_path, outtype) -> dict``
- ``quantize_gguf(build, in_path, out_path, qtype, imatrix=None) -> dict``
- ``with LlamaServer(build, gguf_path, recipe.serve, log_path) as server: server.base_url``
"""

from moeprune.llamacpp.build import BINARIES, LlamaCppBuild, LlamaCppBuildError, ensure_llamacpp
from moeprune.llamacpp.convert import GGUFCheckError, check_gguf, convert_to_gguf
from moeprune.llamacpp.quantize import compute_imatrix, parse_fallbacks, quantize_gguf
from moeprune.llamacpp.server import LlamaServer, LlamaServerError

__all__ = [
    "BINARIES",
    "GGUFCheckError",
    "LlamaCppBuild",
    "LlamaCppBuildError",
    "LlamaServer",
    "LlamaServerError",
    "check_gguf",
    "compute_imatrix",
    "convert_to_gguf",
    "ensure_llamacpp",
    "parse_fallbacks",
    "quantize_gguf",
]
