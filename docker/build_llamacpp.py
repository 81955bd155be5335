"""Build llama.cpp inside the image with the project's own recipe (moeprune.llamacpp.build).

Run by docker/Dockerfile's ``llamacpp`` stage; the same ``ensure_llamacpp`` that ``invoke
llamacpp`` runs natively, so the CMake flags, targets and cache layout cannot drift. The result
lands in ``$MOEPRUNE_CACHE_DIR/llama.cpp/<key>``, which the runtime stage copies; at run time
``ensure_llamacpp(recipe.llamacpp)`` finds it under the same key and builds nothing.
"""

from __future__ import annotations

import argparse
import json
import tarfile

from moeprune.llamacpp.build import ensure_llamacpp
from moeprune.recipe import LlamaCppSection


def _allow_extract_without_filter() -> None:
    """Python 3.11.0-3.11.3 (Debian bookworm's 3.11.2, Ubuntu 22.04's 3.11.0) predates tarfile
    extraction filters, which moeprune.llamacpp.source asks for. Here the archive is the pinned
    sdist, verified by sha256 before extraction, so extracting it without the filter is safe."""
    if hasattr(tarfile, "data_filter"):
        return
    original = tarfile.TarFile.extractall

    def extractall(self, path=".", members=None, *, numeric_owner=False, filter=None):  # noqa: A002
        return original(self, path, members, numeric_owner=numeric_owner)

    tarfile.TarFile.extractall = extractall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sdist-version", required=True)
    parser.add_argument("--sdist-sha256", required=True)
    parser.add_argument("--cuda", choices=["on", "off"], required=True,
                        help="'on' for the CUDA image: no GPU is visible during docker build, so 'auto' would say off")
    parser.add_argument("--cuda-architectures", required=True)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    _allow_extract_without_filter()
    section = LlamaCppSection(
        source="pypi-sdist",
        sdist_version=args.sdist_version,
        sdist_sha256=args.sdist_sha256,
        cuda=args.cuda,
        cuda_architectures=args.cuda_architectures,
    )
    build = ensure_llamacpp(section, jobs=args.jobs, say=lambda message: print(message, flush=True))
    print(json.dumps({"key": build.key, "bin_dir": str(build.bin_dir), "flags": build.record["flags"]}, indent=2))


if __name__ == "__main__":
    main()
