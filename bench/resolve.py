"""Benchmark the resolver: a seeded 200 plugins x 20 versions catalogue, plus an adversarial chain.

Usage: ``python bench/resolve.py [--runs N] [--seed S] [--json]``. Goal: p50 < 20 ms for 200x20.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from osk_daemon.versioning import Range, Version
from osk_daemon.versioning.resolver import Declares, ResolutionFailed, resolve

Catalogue = dict[str, dict[Version, Declares]]


@dataclass(frozen=True)
class Req:
    name: str
    range: Range
    optional: bool = False
    service: bool = False


@dataclass(frozen=True)
class Rel:
    requires: Sequence[Req] = ()
    provides: Mapping[str, Version] = field(default_factory=dict)


def realistic(
    seed: int, plugins: int = 200, versions: int = 20
) -> tuple[Catalogue, dict[str, Range]]:
    """Plugins depend only on lower-numbered ones (no cycles), with ^, ~, >= and x ranges."""
    rng = random.Random(seed)
    all_versions: dict[str, list[Version]] = {}
    for i in range(plugins):
        vs: set[Version] = set()
        major = rng.randint(0, 3)
        while len(vs) < versions:
            vs.add(Version(major + rng.randint(0, 2), rng.randint(0, 6), rng.randint(0, 9)))
        all_versions[f"p{i:03d}"] = sorted(vs)
    catalogue: Catalogue = {}
    for i in range(plugins):
        name = f"p{i:03d}"
        catalogue[name] = {}
        for v in all_versions[name]:
            needs = []
            for dep in rng.sample(range(i), k=min(i, rng.randint(0, 4))):
                target = f"p{dep:03d}"
                base = rng.choice(all_versions[target])
                style = rng.random()
                if style < 0.5:
                    text = f"^{base.major}.{base.minor}"
                elif style < 0.7:
                    text = f"~{base.major}.{base.minor}.{base.patch}"
                elif style < 0.9:
                    text = f">={base.major}.{base.minor}.0"
                else:
                    text = f"{base.major}.x"
                needs.append(Req(target, Range.parse(text), optional=rng.random() < 0.1))
            catalogue[name][v] = Rel(tuple(needs))
    roots = {f"p{i:03d}": Range.parse("*") for i in rng.sample(range(plugins), 30)}
    return catalogue, roots


def adversarial(depth: int = 15, width: int = 20) -> tuple[Catalogue, dict[str, Range]]:
    """Every newer version pushes the next plugin up; only the oldest chain works."""
    catalogue: Catalogue = {}
    for i in range(depth):
        catalogue[f"c{i}"] = {}
        for j in range(width):
            needs: tuple[Req, ...]
            if i + 1 < depth:
                needs = (Req(f"c{i + 1}", Range.parse(f">={j}.0.0")),)
            else:
                needs = (Req("missing", Range.parse("^1")),) if j else ()
            catalogue[f"c{i}"][Version(j, 0, 0)] = Rel(needs)
    catalogue["missing"] = {Version(0, 1, 0): Rel()}
    return catalogue, {"c0": Range.parse("*")}


def measure(fn: Callable[[], object], runs: int) -> dict[str, float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {
        "p50_ms": statistics.median(times),
        "p99_ms": times[min(len(times) - 1, round(0.99 * (len(times) - 1)))],
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    outcomes: dict[str, str] = {}
    for label, (cat, roots) in {
        "realistic 200x20": realistic(args.seed),
        "adversarial chain 15x20": adversarial(),
    }.items():

        def run(cat: Catalogue = cat, roots: dict[str, Range] = roots) -> object:
            try:
                return len(resolve(cat, roots).versions)
            except ResolutionFailed as exc:
                return exc.conflict.type.value

        outcomes[label] = str(run())
        results[label] = measure(run, args.runs)
    if args.json:
        print(json.dumps({k: {**v, "outcome": outcomes[k]} for k, v in results.items()}))
        return
    print(f"{'case':<26} {'p50 ms':>9} {'p99 ms':>9} {'runs':>5}  outcome")
    for label, r in results.items():
        print(
            f"{label:<26} {r['p50_ms']:>9.2f} {r['p99_ms']:>9.2f} {r['runs']:>5}  {outcomes[label]}"
        )


if __name__ == "__main__":
    main()
