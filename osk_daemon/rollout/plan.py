"""What a rollout is asked to do, and the phases it goes through to do it.

A rollout moves one plugin from its *stable* version to a *canary* version (the words are
roles, not judgements: in a rolling update the canary is simply the new version). Every
strategy is a list of ``Phase`` targets — how many instances of each role, and what
share of traffic each role gets — and the engine walks them in order:

- ``rolling``: one phase, stable N -> 0 and canary 0 -> N, bounded by ``max_surge``
  (extra instances at once) and ``max_unavailable`` (instances short of N); traffic goes
  to whatever instances are ready (no weights).
- ``blue-green``: canary N at 0% traffic; then one cut-over to 100%; then stable 0.
- ``canary``: for each weight step w < 100, canary ceil(N*w/100) at w%, held for
  ``analysis_window`` and judged; then the canary takes over (N at 100%, stable 0).
- ``ab``: canary ceil(N*split/100) at split%, kept beside the stable version until the
  operator promotes (the canary takes over) or aborts.

Rolling back is one more phase: stable N at 100% and canary 0 (for ``rolling`` under the
same surge bounds, roles swapped). Pure data: nothing here reads the clock or does I/O.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

__all__ = ["Phase", "Role", "RolloutSpec", "Strategy", "phases_of", "rollback_phase"]


class Strategy(enum.StrEnum):
    ROLLING = "rolling"
    BLUE_GREEN = "blue-green"
    CANARY = "canary"
    AB = "ab"


class Role(enum.StrEnum):
    STABLE = "stable"
    CANARY = "canary"


@dataclass(frozen=True)
class RolloutSpec:
    """One rollout of ``plugin`` from ``stable`` to ``canary`` (version strings)."""

    plugin: str
    stable: str
    canary: str
    strategy: Strategy = Strategy.ROLLING
    instances: int = 1
    max_surge: int = 1
    max_unavailable: int = 0
    steps: tuple[int, ...] = (5, 25, 50, 100)
    analysis_window: float = 10.0
    ab_split: int = 50
    progress_deadline: float = 120.0

    def __post_init__(self) -> None:
        """Raises ValueError naming the bad field."""
        if self.instances < 1:
            raise ValueError(f"instances must be >= 1, got {self.instances}")
        if self.max_surge < 0 or self.max_unavailable < 0:
            raise ValueError("max_surge and max_unavailable must be >= 0")
        if self.max_surge == 0 and self.max_unavailable == 0:
            raise ValueError("max_surge and max_unavailable cannot both be 0: nothing could move")
        if self.max_unavailable >= self.instances and self.max_surge == 0:
            raise ValueError("max_unavailable must leave at least one instance serving")
        if not self.steps or any(not 0 < w <= 100 for w in self.steps):
            raise ValueError(f"steps must be percentages in 1..100, got {list(self.steps)}")
        if list(self.steps) != sorted(set(self.steps)):
            raise ValueError(f"steps must increase, got {list(self.steps)}")
        if not 0 < self.ab_split < 100:
            raise ValueError(f"ab_split must be in 1..99, got {self.ab_split}")
        if self.analysis_window <= 0 or self.progress_deadline <= 0:
            raise ValueError("analysis_window and progress_deadline must be > 0")
        if self.stable == self.canary and self.strategy is not Strategy.ROLLING:
            # traffic is split by version: one version cannot be split from itself
            # (a rolling swap of the same version with another config is fine)
            raise ValueError(f"{self.plugin} already runs {self.stable}")


@dataclass(frozen=True)
class Phase:
    """A target: instance counts per role and, unless ``weights`` is None, traffic shares
    (percent of stable, percent of canary)."""

    stable: int
    canary: int
    weights: tuple[int, int] | None
    analyse: bool = False  # hold for the analysis window, then judge
    hold: bool = False  # stay here until promote or abort (A/B)
    rolling: bool = False  # interleave starts and stops under the surge bounds

    def count(self, role: Role) -> int:
        return self.stable if role is Role.STABLE else self.canary

    def describe(self) -> str:
        share = (
            "traffic by ready instances"
            if self.weights is None
            else f"{self.weights[0]}% / {self.weights[1]}%"
        )
        return f"stable {self.stable}, canary {self.canary}, {share}"


def _share(n: int, percent: int) -> int:
    return max(1, math.ceil(n * percent / 100))


def phases_of(spec: RolloutSpec) -> list[Phase]:
    """The phases of ``spec``'s strategy, in order (the last one completes the rollout,
    except for A/B, whose one phase holds)."""
    n = spec.instances
    takeover = Phase(0, n, (0, 100))
    if spec.strategy is Strategy.ROLLING:
        return [Phase(0, n, None, rolling=True)]
    if spec.strategy is Strategy.BLUE_GREEN:
        return [Phase(n, n, (100, 0)), takeover]
    if spec.strategy is Strategy.CANARY:
        steps = [Phase(n, _share(n, w), (100 - w, w), analyse=True) for w in spec.steps if w < 100]
        return [*steps, takeover]
    split = spec.ab_split
    return [Phase(n, _share(n, split), (100 - split, split), hold=True)]


def takeover_phase(spec: RolloutSpec) -> Phase:
    """Where ``promote`` jumps to: the canary alone, at full strength."""
    return (
        phases_of(spec)[-1]
        if spec.strategy is not Strategy.AB
        else Phase(0, spec.instances, (0, 100))
    )


def rollback_phase(spec: RolloutSpec) -> Phase:
    """Back to the stable version alone (rolling: under the same surge bounds)."""
    if spec.strategy is Strategy.ROLLING:
        return Phase(spec.instances, 0, None, rolling=True)
    return Phase(spec.instances, 0, (100, 0))
