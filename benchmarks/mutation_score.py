"""Mutation score per file from mutmut's results (``make mutation``): killed / (killed + survived),
with the surviving mutants listed. Run from the repository root after ``mutmut run``.

``--recheck`` runs every surviving mutant again against all of its method's test files
(``tests/test_<method>*.py``) instead of the tests mutmut attributed to the mutated function
(mutmut 3's attribution misses some calls, e.g. methods called from ``nn.Module.__init__``).

A mutant counts as killed when the tests failed on it (exit codes 1 and 3, as mutmut counts them);
"no tests" (no test reaches the mutated function) counts as surviving here, so a file can only
score well by being tested."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

KILLED = {1, 3}


def killed_on_recheck(name: str, source: str, root: str) -> bool:
    """Run mutant ``name`` against every test file of its method; True when a test fails."""
    stem = os.path.splitext(os.path.basename(source))[0]
    tests = sorted(glob.glob(os.path.join(root, "tests", f"test_{stem}*.py")))
    env = {**os.environ, "MUTANT_UNDER_TEST": name, "PYTHONPATH": "src", "HF_HUB_OFFLINE": "1"}
    args = [
        sys.executable,
        "-m",
        "pytest",
        "-x",
        "-q",
        "-p",
        "no:cacheprovider",
        *(t[len(root) + 1 :] for t in tests),
    ]
    done = subprocess.run(args, cwd=root, env=env, capture_output=True, timeout=600)
    return done.returncode != 0


def main(root: str = "mutants", recheck: bool = False) -> int:
    rows = []
    for meta in sorted(glob.glob(f"{root}/**/*.py.meta", recursive=True)):
        with open(meta) as f:
            codes = json.load(f)["exit_code_by_key"]
        killed = sorted(k for k, c in codes.items() if c in KILLED)
        alive = sorted(k for k, c in codes.items() if c is not None and c not in KILLED)
        unchecked = sum(c is None for c in codes.values())
        source = meta[len(root) + 1 : -len(".meta")]
        if recheck:
            again = [k for k in alive if killed_on_recheck(k, source, root)]
            killed += again
            alive = [k for k in alive if k not in again]
        rows.append((source, len(killed), alive, unchecked))
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
    sys.exit(main(recheck="--recheck" in sys.argv[1:]))
