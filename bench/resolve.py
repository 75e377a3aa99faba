"""Benchmark the resolver: a seeded, realistic 200 plugins x 20 versions catalogue, plus two
adversarial ones (random conflicting ranges; a chain that only works at its oldest versions).

Usage: ``python bench/resolve.py [--runs N] [--seed S] [--catalogues K] [--json]``. The
random cases go round K seeded catalogues (seeds S..S+K-1), so p50/p99 describe the family,
not one lucky or unlucky draw. Goal: p50 < 20 ms for the realistic 200x20 case.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import Mapping, Sequence
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
    """A layered ecosystem that grew over time, the way real plugin catalogues do.

    - Each plugin has a release history on a shared clock, from its birth (core plugins are
      older) until now: mostly patches, some minors, a major now and then (0.x plugins too,
      where ``^0.3`` is narrow).
    - Dependencies point to plugins lower in the layering (lower numbers, biased towards
      the core), so there are no cycles; the set of dependencies drifts slowly.
    - A release asks for what was current when it shipped: ``^`` (most), ``~``, ``>=`` or
      ``x`` (a habit per dependency) on the latest version of the dependency at that time.
      Ranges carry over to the next release; a range the dependency has outgrown (a new
      major) is usually refreshed, one that still fits seldom is. So some plugins lag a
      major behind and real conflicts occur (one needs core ^3, another ^2), but rarely.
    - 10% of edges are optional; the config asks for 30 plugins, mostly by ``*``, one in ten
      by ``^major`` of its newest release (more than that and two roots often need different
      eras of a core plugin: a real conflict, but not the common case).
    """
    rng = random.Random(seed)
    history: dict[str, list[tuple[float, Version]]] = {}
    for i in range(plugins):
        major = rng.choice((0, 1, 1, 1, 1, 1, 1, 2, 2, 3))
        minor, patch = (1 if major == 0 else 0), 0
        born = 30.0 * i / plugins + rng.uniform(0.0, 10.0)
        clock = sorted(rng.uniform(born, 60.0) for _ in range(versions))
        releases = []
        for at in clock:
            releases.append((at, Version(major, minor, patch)))
            roll = rng.random()
            if roll < 0.02:
                major, minor, patch = major + 1, 0, 0
            elif roll < 0.15:
                minor, patch = minor + 1, 0
            else:
                patch += 1
        history[f"p{i:03d}"] = releases

    def latest(name: str, at: float) -> Version:
        released = [v for t, v in history[name] if t <= at]
        return released[-1] if released else history[name][0][1]

    def ask(name: str, at: float, style: float, optional: bool) -> Req:
        base = latest(name, at)
        if style < 0.75:
            text = f"^{base.major}.{base.minor}"
        elif style < 0.83:
            text = f"~{base.major}.{base.minor}.{base.patch}"
        elif style < 0.95:
            text = f">={base.major}.{base.minor}.0"
        else:
            text = f"{base.major}.x"
        return Req(name, Range.parse(text), optional)

    habits: dict[tuple[str, str], tuple[float, bool]] = {}  # (plugin, dep): style, optional

    def adopt(plugin: str, dep: str, at: float) -> Req:
        style, optional = habits.setdefault((plugin, dep), (rng.random(), rng.random() < 0.1))
        return ask(dep, at, style, optional)

    catalogue: Catalogue = {}
    for i in range(plugins):
        name = f"p{i:03d}"
        catalogue[name] = {}
        lower = [f"p{int(i * rng.random() ** 1.5):03d}" for _ in range(min(i, rng.randint(0, 4)))]
        first = history[name][0][0]
        needs = {dep: adopt(name, dep, first) for dep in dict.fromkeys(lower)}
        for at, version in history[name]:
            for dep, old in list(needs.items()):
                broke = not old.range.contains(latest(dep, at))
                if rng.random() < (0.9 if broke else 0.2):
                    needs[dep] = adopt(name, dep, at)
            if i and rng.random() < 0.05:
                dep = f"p{rng.randrange(i):03d}"
                needs.setdefault(dep, adopt(name, dep, at))
            catalogue[name][version] = Rel(tuple(needs.values()))
    roots: dict[str, Range] = {}
    for i in rng.sample(range(plugins), 30):
        name = f"p{i:03d}"
        newest = history[name][-1][1]
        roots[name] = Range.parse("*" if rng.random() < 0.9 else f"^{newest.major}")
    return catalogue, roots


def random_ranges(
    seed: int, plugins: int = 200, versions: int = 20
) -> tuple[Catalogue, dict[str, Range]]:
    """Adversarial: every release picks fresh dependencies and ranges on a random old version.

    Plugins depend only on lower-numbered ones (no cycles), but each version's ranges are
    drawn uniformly from the target's whole history (``~1.2.3`` on a years-old patch), with
    no relation to the previous release: conflicts everywhere, unlike any real catalogue.
    Kept to measure how the search copes with heavy backtracking.
    """
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


Case = tuple[Catalogue, dict[str, Range]]


def outcome(case: Case) -> str:
    """How many plugins were resolved, or the conflict type."""
    try:
        return str(len(resolve(*case).versions))
    except ResolutionFailed as exc:
        return exc.conflict.type.value


def measure(cases: Sequence[Case], runs: int) -> dict[str, float]:
    """Time ``runs`` resolutions, going round ``cases``; p50 and p99 over all of them."""
    times = []
    for i in range(runs):
        case = cases[i % len(cases)]
        start = time.perf_counter()
        outcome(case)
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
    parser.add_argument("--catalogues", type=int, default=10, help="seeds per random case")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    seeds = range(args.seed, args.seed + args.catalogues)
    n = args.catalogues
    suites: dict[str, list[Case]] = {
        f"realistic 200x20 ({n} seeds)": [realistic(s) for s in seeds],
        f"adversarial random ({n} seeds)": [random_ranges(s) for s in seeds],
        "adversarial chain 15x20": [adversarial()],
    }
    results: dict[str, dict[str, float]] = {}
    outcomes: dict[str, str] = {}
    # the catalogues are built: keep them out of the collector, or one gen-2 collection
    # over the bench's own heap (~0.6 s) lands inside a timed resolution
    gc.collect()
    gc.freeze()
    for label, cases in suites.items():
        counts = Counter("resolved" if o.isdigit() else o for o in map(outcome, cases))
        outcomes[label] = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        results[label] = measure(cases, args.runs)
    if args.json:
        print(json.dumps({k: {**v, "outcome": outcomes[k]} for k, v in results.items()}))
        return
    print(f"{'case':<32} {'p50 ms':>9} {'p99 ms':>9} {'runs':>5}  outcomes")
    for label, r in results.items():
        print(
            f"{label:<32} {r['p50_ms']:>9.2f} {r['p99_ms']:>9.2f} {r['runs']:>5}  {outcomes[label]}"
        )


if __name__ == "__main__":
    main()
