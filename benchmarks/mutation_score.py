"""Mutation score per file from mutmut's results (``make mutation``): killed / (killed + survived),
with the surviving mutants listed. Run from the repository root after ``mutmut run``.

A mutant counts as killed when the tests failed on it (exit codes 1 and 3, as mutmut counts them);
"no tests" (no test reaches the mutated function) counts as surviving here, so a file can only
score well by being tested."""

from __future__ import annotations

import glob
import json
import sys

KILLED = {1, 3}


def main(root: str = "mutants") -> int:
    rows = []
    for meta in sorted(glob.glob(f"{root}/**/*.py.meta", recursive=True)):
        with open(meta) as f:
            codes = json.load(f)["exit_code_by_key"]
        killed = sorted(k for k, c in codes.items() if c in KILLED)
        alive = sorted(k for k, c in codes.items() if c is not None and c not in KILLED)
        unchecked = sum(c is None for c in codes.values())
        rows.append((meta[len(root) + 1 : -len(".meta")], len(killed), alive, unchecked))
    if not rows:
        print(f"no mutmut results under {root}/; run `make mutation`")
        return 1
    print("| file | mutants checked | killed | score | not checked yet |\n|---|---:|---:|---:|---:|")
    for path, killed, alive, unchecked in rows:
        total = killed + len(alive)
        print(f"| {path} | {total} | {killed} | {100.0 * killed / max(1, total):.1f}% | {unchecked} |")
    for _, _, alive, _ in rows:
        for name in alive:
            print(f"surviving: {name}  (mutmut show {name})")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
