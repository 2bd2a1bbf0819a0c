"""A seeded sample of mutmut's mutants, the same number per core module (benchmarks/mutation.md).

    mutmut run --max-children 2 $(python benchmarks/mutation_sample.py --per-module 35)

A full run of the ~1,500 mutants takes most of a day on two cores (each mutant re-runs the tests that
reach its function, fixtures included); a seeded sample per module gives each module's score with a
stated uncertainty in under an hour. Run from a clone, after ``mutmut run`` has listed the mutants once
(interrupt it after "Running clean tests" starts).
"""

from __future__ import annotations

import argparse
import collections
import random
import subprocess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-module", type=int, default=35)
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    listing = subprocess.run(["mutmut", "results", "--all", "true"], capture_output=True, text=True, check=True)
    by_module = collections.defaultdict(list)
    for line in listing.stdout.splitlines():
        name = line.split(":")[0].strip()
        if name:
            by_module[name.split(".x")[0]].append(name)
    rng = random.Random(args.seed)
    for module in sorted(by_module):
        print(*sorted(rng.sample(by_module[module], min(args.per_module, len(by_module[module])))), sep="\n")


if __name__ == "__main__":
    main()
