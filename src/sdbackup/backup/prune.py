"""Retention: which generations to keep, and how to drop the others without losing
what the kept ones need (``sdbackup prune``).

The keep rules are the ones users know from restic and borg: the last N generations,
and the newest generation of each of the last N days, ISO weeks and months that have
one (T0 in UTC). The newest generation is always kept.

An incremental cannot simply be deleted when a kept generation after it needs its
blocks, so a dropped generation that has a kept descendant in its chain is **merged**
into its child (:func:`~sdbackup.backup.merge.merge`; a full merged into its
incremental gives a synthetic full), which stands for the child from then on. A dropped
generation with no kept descendant is removed outright (with whatever of its chain
comes after it, all dropped too). Each step is one merge or one removal, crash-safe on
its own: a crash leaves a readable chain with some of the work done (``gc`` cleans up,
running prune again finishes it). A generation is removed manifest first
(:meth:`DiskMedium.remove_generation`), so a crash in the middle of a removal never leaves a
committed generation with some of its files gone.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from sdbackup.backup.merge import merge, remove_replaced
from sdbackup.errors import UsageError
from sdbackup.media.medium import Catalog, DiskMedium, Manifest

CRASH_ENV = "SDBACKUP_TEST_CRASH_AT"
CRASH_POINTS = ("prune-uncommitted", "prune-mid-remove")
"""Test hooks (``SDBACKUP_TEST_CRASH_AT``): die as kill -9 would when a generation's
manifest is removed and the rest of it not yet, or after a whole generation is removed."""


def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Retention:
    last: int = 1
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    only_group: str | None = None  # prune only this group's generations

    def check(self) -> None:
        if self.last < 1:
            raise UsageError("--keep-last must be at least 1 (the newest generation is "
                             "always kept)")
        for name, v in (("daily", self.daily), ("weekly", self.weekly),
                        ("monthly", self.monthly)):
            if v < 0:
                raise UsageError(f"--keep-{name} must not be negative")


@dataclass
class Step:
    """One action: ``merge`` older into newer, or ``remove`` generations."""

    action: str
    gens: list[str]
    why: str

    def to_dict(self) -> dict[str, object]:
        return {"action": self.action, "generations": self.gens, "why": self.why}


@dataclass
class PrunePlan:
    keep: dict[str, str] = field(default_factory=dict)  # id -> reason
    steps: list[Step] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"keep": [{"generation": g, "why": w} for g, w in self.keep.items()],
                "steps": [s.to_dict() for s in self.steps]}


def _t0(m: Manifest) -> dt.datetime:
    return dt.datetime.fromtimestamp(m.t0_wall_ns / 1e9, tz=dt.UTC)


def choose(gens: list[Manifest], r: Retention) -> dict[str, str]:
    """The generations to keep (id -> why), from ``gens`` sorted oldest first."""
    keep: dict[str, str] = {}
    newest_first = list(reversed(gens))
    for m in newest_first[: r.last]:
        keep.setdefault(m.id, "last")
    buckets: list[tuple[str, int, Callable[[dt.datetime], object]]] = [
        ("daily", r.daily, lambda t: t.date()),
        ("weekly", r.weekly, lambda t: t.isocalendar()[:2]),
        ("monthly", r.monthly, lambda t: (t.year, t.month)),
    ]
    for name, n, key in buckets:
        seen: list[object] = []
        for m in newest_first:
            if len(seen) >= n:
                break
            k = key(_t0(m))
            if k not in seen:
                seen.append(k)
                keep.setdefault(m.id, name)
    return keep


def plan(cat: Catalog, r: Retention) -> PrunePlan:
    """What prune does to the current generations of ``cat`` (nothing written)."""
    r.check()
    p = PrunePlan()
    groups: dict[str | None, list[Manifest]] = {}
    for m in sorted(cat.current, key=lambda m: (m.t0_wall_ns, m.id)):
        if r.only_group is None or m.group == r.only_group:
            groups.setdefault(m.group, []).append(m)
    for gens in groups.values():
        keep = choose(gens, r)
        p.keep.update(keep)
        # chains, oldest generation first
        chains: dict[str, list[Manifest]] = {}
        for m in gens:
            chains.setdefault(m.chain or m.id, []).append(m)
        for chain in chains.values():
            kept_after = [any(x.id in keep for x in chain[i + 1:]) for i in range(len(chain))]
            tail: list[str] = []
            for i, m in enumerate(chain):
                if m.id in keep:
                    continue
                if kept_after[i]:
                    p.steps.append(Step("merge", [m.id, chain[i + 1].id],
                                        f"{m.id} is not kept; {chain[i + 1].id} needs its "
                                        "blocks"))
                else:
                    tail.append(m.id)
            if tail:
                p.steps.append(Step("remove", tail, "not kept, and no kept generation "
                                    "needs them"))
    return p


def prune(medium: DiskMedium, r: Retention, *, dry_run: bool = False,
          log_medium: str | os.PathLike[str] | None = None,
          on_step: Callable[[Step], None] | None = None) -> PrunePlan:
    """Apply the retention rules (see the module docstring); returns what was (or with
    ``dry_run``, would be) done."""
    with medium.chain_lock():
        p = plan(medium.catalog(), r)
        if dry_run:
            return p
        done = PrunePlan(keep=p.keep)
        # A merge's result stands for the newer generation: later steps naming that
        # generation find it through the catalog (a replaced id resolves to it).
        for step in p.steps:
            if step.action == "merge":
                cat = medium.catalog()
                older = cat.get(step.gens[0])
                newer = cat.get(step.gens[1])
                assert older is not None and newer is not None
                merge(medium, older.id, newer.id, log_medium=log_medium, locked=True)
            else:
                for gid in reversed(step.gens):  # newest first: never orphan a child
                    medium.remove_generation(
                        gid, uncommitted=lambda: _crash_point("prune-uncommitted"))
                    _crash_point("prune-mid-remove")
            done.steps.append(step)
            if on_step is not None:
                on_step(step)
        remove_replaced(medium)
        return done
