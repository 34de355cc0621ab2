"""Case splits: the cohort's own, else a seeded, label-stratified assignment; the cases of one
patient always share a split."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from histocsc.errors import DataError

if TYPE_CHECKING:
    from histocsc.learn.data import DataConfig


def assign_splits(
    cases: list[str],
    given: dict[str, str],
    pos_rate: dict[str, float],
    cfg: DataConfig,
    seed: int,
    patients: dict[str, str] | None = None,
) -> dict[str, str]:
    """`split_units` over patients: the cases of one patient (cohort column `patient`) always
    share a split; a case without a patient is its own unit. DataError when the cohort itself
    puts two cases of one patient into different splits."""
    groups: dict[str, list[str]] = {}
    for c in cases:
        groups.setdefault((patients or {}).get(c) or f"\0{c}", []).append(c)
    if len(groups) == len(cases):  # no shared patient: the cases are the units
        return split_units(cases, given, pos_rate, cfg, seed)
    unit_given: dict[str, str] = {}
    for unit, members in groups.items():
        named = {given[c] for c in members if given.get(c)}
        if len(named) > 1:
            raise DataError(f"patient {unit}: cases {', '.join(members)} are given different "
                            f"splits ({', '.join(sorted(named))}) in cohort.csv")
        if named:
            unit_given[unit] = named.pop()
    unit_rate = {u: float(np.mean([pos_rate.get(c, 0.0) for c in m])) for u, m in groups.items()}
    unit_split = split_units(list(groups), unit_given, unit_rate, cfg, seed)
    return {c: unit_split[u] for u, members in groups.items() for c in members}


def split_units(
    cases: list[str], given: dict[str, str], pos_rate: dict[str, float], cfg: DataConfig, seed: int
) -> dict[str, str]:
    """Keep the cohort's splits; give the other cases a seeded, label-stratified split:
    cases are ordered by positive rate and val/test picks are spread evenly along that order."""
    split = {c: given[c] for c in cases if given.get(c)}
    free = [c for c in cases if c not in split]
    if not free:
        return split
    rng = np.random.default_rng(seed)
    order = [free[i] for i in rng.permutation(len(free))]
    order.sort(key=lambda c: pos_rate.get(c, 0.0))
    n = len(order)
    n_val = int(round(n * cfg.val_fraction)) if n >= 3 else 0
    n_test = int(round(n * cfg.test_fraction)) if n >= 3 else 0
    n_val = max(n_val, 1 if cfg.val_fraction > 0 and n >= 3 else 0)
    n_test = max(n_test, 1 if cfg.test_fraction > 0 and n >= 3 else 0)
    while n_val + n_test >= n and (n_val or n_test):
        if n_test >= n_val and n_test:
            n_test -= 1
        else:
            n_val -= 1
    picks = ["val"] * n_val + ["test"] * n_test
    held = n_val + n_test
    slots: list[int] = []
    if held:
        offset = rng.uniform(0, n / held)
        slots = sorted({min(n - 1, int(offset + k * n / held)) for k in range(held)})
        spare = [i for i in range(n) if i not in slots]
        while len(slots) < held:  # collisions after rounding
            slots.append(spare.pop(int(rng.integers(len(spare)))))
    rng.shuffle(picks)
    for i, c in enumerate(order):
        split[c] = "train"
        if i in slots:
            split[c] = picks[slots.index(i)]
    return split
