"""Compare two run directories file by file: which outputs differ, byte for byte.

    python bench/compare_runs.py RUN_A RUN_B [--checkout-a DIR --checkout-b DIR]

Prints one line per file (same / differs / only in A / only in B) and a summary. Logs, the lock
file and the hash cache are left out (they hold timings and code hashes, not artifacts). With
``--checkout-a/-b``, each run's checkout path and its recorded code version (git commit, dirty
flag, the card's "Made with" line, lm-eval's git_hash) are masked before comparing, and a file
equal after masking is reported as "same apart from code version/checkout path"; manifest.json
is then compared without those files' hashes and sizes (and the totals they change).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

SKIPPED = ("logs/", "run.lock.json", ".hashcache.json")
_MASKS = [
    (re.compile(rb'"git_(commit|dirty|hash)": ("[^"]*"|null|true|false)'), rb'"git_\1": MASKED'),
    (re.compile(rb"Made with moeprune [^ ]+( \(git [0-9a-f]+(, modified)?\))? from"), b"Made with moeprune MASKED from"),
    (re.compile(rb'"code_version": "[^"]*"'), b'"code_version": MASKED'),
]


def files(root: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.startswith(SKIPPED):
            found[rel] = path
    return found


def masked(data: bytes, checkout: str | None) -> bytes:
    if checkout:
        data = data.replace(checkout.rstrip("/").encode(), b"CHECKOUT")
    for pattern, replacement in _MASKS:
        data = pattern.sub(replacement, data)
    return data


def manifests_agree(data_a: bytes, data_b: bytes, masked_equal: set[str]) -> bool:
    """Manifests equal except the code version, the entries of files equal after masking (matched
    by path suffix: card/README.md is README.md in the model repo) and the totals they change."""
    import json

    ma, mb = json.loads(data_a), json.loads(data_b)
    for manifest in (ma, mb):
        manifest.pop("code", None)
        manifest.pop("totals", None)
        manifest["files"] = [
            {**entry, "sha256": None, "size_bytes": None}
            if any(rel.endswith(entry["path"]) or entry["path"].endswith(rel) for rel in masked_equal) else entry
            for entry in manifest["files"]
        ]
    return ma == mb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--checkout-a")
    parser.add_argument("--checkout-b")
    args = parser.parse_args()
    a, b = files(args.run_a), files(args.run_b)
    counts: dict[str, int] = {}
    masked_equal: set[str] = set()
    # manifest.json last: it lists the hashes of the others.
    for rel in sorted(set(a) | set(b), key=lambda name: (name == "manifest.json", name)):
        if rel not in b:
            state = "only in A"
        elif rel not in a:
            state = "only in B"
        else:
            data_a, data_b = a[rel].read_bytes(), b[rel].read_bytes()
            if hashlib.sha256(data_a).digest() == hashlib.sha256(data_b).digest():
                state = "same"
            elif args.checkout_a and masked(data_a, args.checkout_a) == masked(data_b, args.checkout_b):
                state = "same apart from code version/checkout path"
                masked_equal.add(rel)
            elif rel == "manifest.json" and manifests_agree(data_a, data_b, masked_equal):
                state = "same apart from the hashes of the files above"
            else:
                state = "DIFFERS"
        counts[state] = counts.get(state, 0) + 1
        print(f"{state:45s} {rel}")
    print("summary: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    return 1 if counts.get("DIFFERS") or counts.get("only in A") or counts.get("only in B") else 0


if __name__ == "__main__":
    sys.exit(main())
