"""Neuron-disjoint, label-stratified, seeded train/val/test splits and k-fold assignments by presynaptic neuron.

A synapse-level split lets a model (or a connectivity feature) recognise the presynaptic neuron instead of the
synapse type; splitting by presynaptic root removes that leak. On proofread MICrONS axons a few neurons own most
synapses and inhibitory neurons are few, so a split that only honours synapse shares can hand train 42% of the
neurons. Here each class is split on its own so that, per class, *both* the neuron shares and the synapse shares
of every split lie close to the target fractions: small classes by exhaustive search, larger ones by a seeded
heavy-first greedy start refined by moves and swaps that minimise the largest deviation. When nothing within
``tolerance`` exists (or none is found), a one-line :class:`DataError` names the class and the shares.

Usage::

    split = assign_splits(frame, fractions=(0.7, 0.15, 0.15), seed=0)  # int8 per row: 0 train, 1 val, 2 test
    report = split_report(frame, split, (0.7, 0.15, 0.15))           # per class x split: neurons, synapses, shares

    folds = assign_folds(frame, k=5, seed=0)                          # int8 fold id per row, 0..4
    for f in range(5):
        split = fold_split(folds, f, 5)                               # test = fold f, val = fold f+1, train = rest
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from synhpc.errors import ConfigError, DataError

SPLIT_NAMES = ("train", "val", "test")
SPLITS = {name: code for code, name in enumerate(SPLIT_NAMES)}  # the split codes shards and manifests store
CLASS_NAMES = {1: "excitatory", 0: "inhibitory"}
DEFAULT_TOLERANCE = 0.05
REPORT_COLUMNS = ["class", "split", "target", "neurons", "synapses", "neuron_share", "synapse_share", "deviation"]
# Above this many assignments (splits ** neurons) exhaustive search gives way to the local search.
_EXACT_LIMIT = 200_000
_EPS = 1e-9  # shares are ratios of integers: 3/12 - 0.2 must count as within 0.05


def assign_splits(
    frame: pd.DataFrame, fractions: Sequence[float], seed: int, *, tolerance: float = DEFAULT_TOLERANCE
) -> np.ndarray:
    """Split code per row (int8; 0 train, 1 val, 2 test): every presynaptic neuron in one split, every split holding
    both classes, and per class each split's share of neurons and of synapses within ``tolerance`` of ``fractions``.

    ``frame`` needs ``pre_root_id`` and ``label`` (1 excitatory, 0 inhibitory; one label per neuron). The result
    depends on the set of neurons, their synapse counts and ``seed``, not on row order. Raises :class:`DataError`
    when a class has fewer neurons than splits or no split within ``tolerance`` exists (or is found).

    Usage::

        frame["split"] = assign_splits(frame, (0.7, 0.15, 0.15), seed=0, tolerance=0.05)
    """
    targets = _targets(fractions, "split.fractions")
    codes, labels, sizes = _neurons(frame)
    neuron_split = _assign(labels, sizes, targets, seed, tolerance, "split")
    return neuron_split[codes]


def assign_folds(frame: pd.DataFrame, k: int, seed: int, *, tolerance: float = DEFAULT_TOLERANCE) -> np.ndarray:
    """Fold id per row (int8, 0..k-1) for k-fold cross-validation by presynaptic neuron: per class, each fold holds
    1/k of the neurons and 1/k of the synapses within ``tolerance``, and every fold holds both classes.

    Usage::

        folds = assign_folds(frame, 5, seed=0)
        frame["split"] = fold_split(folds, fold=2, k=5)
    """
    _check_k(k)
    codes, labels, sizes = _neurons(frame)
    neuron_fold = _assign(labels, sizes, np.full(k, 1.0 / k), seed, tolerance, f"{k}-fold split")
    return neuron_fold[codes]


def fold_split(folds: np.ndarray, fold: int, k: int) -> np.ndarray:
    """Split codes (int8) for cross-validation fold ``fold``: test = fold ``fold``, val = fold ``(fold + 1) % k``,
    train = the other k - 2 folds. Each fold is then its own neuron-disjoint train/val/test split.

    Usage::

        split = fold_split(assign_folds(frame, 5, seed=0), 0, 5)
    """
    _check_k(k)
    if not 0 <= fold < k:
        raise ConfigError(f"split.fold must lie in 0..{k - 1} for split.folds={k}, got {fold}")
    folds = np.asarray(folds)
    split = np.zeros(len(folds), dtype=np.int8)
    split[folds == (fold + 1) % k] = 1
    split[folds == fold] = 2
    return split


def split_report(
    frame: pd.DataFrame, codes: np.ndarray, fractions: Sequence[float], names: Sequence[str] | None = None
) -> pd.DataFrame:
    """One row per (class, split): target fraction, neurons, synapses, their shares of the class, and ``deviation``
    (the larger of the two shares' distances from the target). ``codes`` are split codes (or fold ids) per row;
    ``names`` label them (train/val/test for three fractions, else "0".."k-1").

    Usage::

        split_report(frame, frame["split"].to_numpy(), cfg.split.fractions)
        split_report(frame, folds, [1 / 5] * 5)   # a k-fold assignment
    """
    targets = np.asarray(fractions, dtype=np.float64)
    if names is None:
        names = SPLIT_NAMES if len(targets) == 3 else [str(i) for i in range(len(targets))]
    roots, labels = _root_and_label(frame)
    codes = np.asarray(codes).astype(np.int64)
    rows = []
    for value in (1, 0):
        cls = labels == value
        n_total = len(np.unique(roots[cls]))
        w_total = int(cls.sum())
        for s, name in enumerate(names):
            here = cls & (codes == s)
            neurons = len(np.unique(roots[here]))
            synapses = int(here.sum())
            n_share = neurons / n_total if n_total else 0.0
            w_share = synapses / w_total if w_total else 0.0
            dev = max(abs(n_share - targets[s]), abs(w_share - targets[s]))
            rows.append([CLASS_NAMES[value], name, float(targets[s]), neurons, synapses, n_share, w_share, dev])
    return pd.DataFrame(rows, columns=REPORT_COLUMNS)


def check_splits(pre_root_id: np.ndarray, label: np.ndarray, split: np.ndarray) -> None:
    """Raise if a presynaptic neuron sits in two splits or a split lacks a class."""
    pairs = pd.DataFrame({"root": pre_root_id, "split": split}).drop_duplicates()
    shared = pairs["root"].duplicated()
    if shared.any():
        raise DataError(f"presynaptic neuron {int(pairs['root'][shared].iloc[0])} appears in two splits")
    for s, name in enumerate(SPLIT_NAMES):
        present = set(np.unique(label[split == s]).tolist())
        for value, cls in ((1, "excitatory"), (0, "inhibitory")):
            if value not in present:
                raise DataError(f"split {name} has no {cls} synapses")


# ----------------------------------------------------------------------------------------------- the assignment


def _targets(fractions: Sequence[float], key: str) -> np.ndarray:
    targets = np.asarray(fractions, dtype=np.float64)
    if targets.ndim != 1 or len(targets) < 2 or targets.min() <= 0 or abs(targets.sum() - 1.0) > 1e-6:
        raise ConfigError(f"{key} must be positive numbers that sum to 1, got {list(fractions)}")
    return targets


def _check_k(k: int) -> None:
    # Two folds cannot give train, val and test each a fold of their own.
    if int(k) != k or k < 3:
        raise ConfigError(f"split.folds must be an integer >= 3 (test, val and train each need a fold), got {k}")


def _root_and_label(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    for column in ("pre_root_id", "label"):
        if column not in frame:
            raise DataError(f"the synapse frame has no '{column}' column")
    return frame["pre_root_id"].to_numpy(), frame["label"].to_numpy()


def _neurons(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(neuron index per row, label per neuron, synapses per neuron), neurons ordered by root id."""
    roots, labels = _root_and_label(frame)
    codes, uniques = pd.factorize(roots, sort=True)
    sizes = np.bincount(codes, minlength=len(uniques))
    exc = np.bincount(codes, weights=(labels == 1), minlength=len(uniques))
    known = np.bincount(codes, weights=np.isin(labels, (0, 1)), minlength=len(uniques))
    bad = np.flatnonzero((known != sizes) | ((exc != 0) & (exc != sizes)))
    if len(bad):
        raise DataError(f"presynaptic neuron {int(uniques[bad[0]])} has synapses labelled other than all 1 or all 0")
    return codes, (exc == sizes).astype(np.int8), sizes


@dataclass
class _Result:
    assignment: np.ndarray  # split per neuron of the class
    deviation: float  # largest |share - target| over splits and (neurons, synapses)
    exact: bool  # True when the search was exhaustive (so "no split exists" is proven)


def _assign(
    labels: np.ndarray, sizes: np.ndarray, targets: np.ndarray, seed: int, tolerance: float, what: str
) -> np.ndarray:
    if not 0.0 < tolerance < 1.0:
        raise ConfigError(f"split.tolerance must lie in (0, 1), got {tolerance}")
    for value in (1, 0):
        count = int((labels == value).sum())
        if count < len(targets):
            raise DataError(
                f"class {CLASS_NAMES[value]} has {count} presynaptic neuron(s); "
                f"a neuron-disjoint {what} needs at least {len(targets)}"
            )
    out = np.zeros(len(sizes), dtype=np.int8)
    for value in (1, 0):
        name = CLASS_NAMES[value]
        members = np.flatnonzero(labels == value)
        # One stream per class, so adding or dropping a neuron of one class never reshuffles the other.
        rng = np.random.default_rng([seed, value, len(targets)])
        found = _split_class(sizes[members].astype(np.float64), targets, rng)
        if found.deviation > tolerance + _EPS:
            raise DataError(_no_split_message(name, sizes[members], found, targets, tolerance, what))
        out[members] = found.assignment
    return out


def _no_split_message(name: str, sizes: np.ndarray, found: _Result, targets: np.ndarray, tol: float, what: str) -> str:
    n_share = np.bincount(found.assignment, minlength=len(targets)) / len(sizes)
    w_share = np.bincount(found.assignment, weights=sizes, minlength=len(targets)) / sizes.sum()
    fmt = lambda v: "/".join(f"{x:.2f}" for x in v)  # noqa: E731
    # Proven when the search was exhaustive, when one neuron alone overshoots every split's band, or when no whole
    # numbers of neurons fit every split's band.
    n = len(sizes)
    low = np.maximum(np.ceil((targets - tol) * n - _EPS * n), 1)
    high = np.floor((targets + tol) * n + _EPS * n)
    counts_fit = bool((low <= high).all() and low.sum() <= n <= high.sum())
    proven = found.exact or sizes.max() / sizes.sum() > targets.max() + tol or not counts_fit
    lead = "no" if proven else "the search found no"
    tail = "exists" if proven else "(none may exist)"
    return (
        f"class {name}: {lead} neuron-disjoint {what} within {tol:g} of the target fractions {fmt(targets)} {tail}; "
        f"best: neuron shares {fmt(n_share)}, synapse shares {fmt(w_share)} (split.tolerance)"
    )


def _score(n: np.ndarray, w: np.ndarray, targets: np.ndarray, n_total: float, w_total: float) -> tuple[float, float]:
    dn = np.abs(n / n_total - targets)
    dw = np.abs(w / w_total - targets)
    return float(max(dn.max(), dw.max())), float((dn * dn).sum() + (dw * dw).sum())


def _better(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Lexicographic: a smaller largest deviation, or the same one with a smaller sum of squares."""
    return a[0] < b[0] - 1e-12 or (a[0] <= b[0] + 1e-12 and a[1] < b[1] - 1e-15)


def _split_class(sizes: np.ndarray, targets: np.ndarray, rng: np.random.Generator) -> _Result:
    n_splits = len(targets)
    if len(sizes) * np.log(n_splits) <= np.log(_EXACT_LIMIT):
        return _exhaustive(sizes, targets, rng)
    # A few seeded restarts: the local search stops in a local optimum; restarts rarely change the best deviation
    # but make a miss on hard tables much less likely.
    restarts = 6 if len(sizes) < 200 else 3
    best: _Result | None = None
    best_score = (np.inf, np.inf)
    for _ in range(restarts):
        assignment = _refine(sizes, _greedy(sizes, targets, rng), targets)
        n = np.bincount(assignment, minlength=n_splits)
        w = np.bincount(assignment, weights=sizes, minlength=n_splits)
        score = _score(n, w, targets, len(sizes), sizes.sum())
        if _better(score, best_score):
            best, best_score = _Result(assignment, score[0], exact=False), score
    assert best is not None
    return best


def _exhaustive(sizes: np.ndarray, targets: np.ndarray, rng: np.random.Generator) -> _Result:
    """Every assignment of the class's neurons to splits; a seeded choice among the best ones."""
    n_splits, n = len(targets), len(sizes)
    code = np.arange(n_splits**n, dtype=np.int64)
    digits = np.empty((n, len(code)), dtype=np.int8)
    for i in range(n):
        digits[i] = code % n_splits
        code //= n_splits
    worst = np.zeros(digits.shape[1])
    squares = np.zeros(digits.shape[1])
    empty = np.zeros(digits.shape[1], dtype=bool)
    for s in range(n_splits):
        member = digits == s
        count = member.sum(axis=0)
        dn = np.abs(count / n - targets[s])
        dw = np.abs(sizes @ member / sizes.sum() - targets[s])
        worst = np.maximum(worst, np.maximum(dn, dw))
        squares += dn * dn + dw * dw
        empty |= count == 0
    worst[empty] = np.inf
    best = worst.min()
    tied = np.flatnonzero(worst <= best + 1e-12)
    tied = tied[squares[tied] <= squares[tied].min() + 1e-15]
    pick = int(tied[rng.integers(len(tied))])
    return _Result(digits[:, pick].astype(np.int64), float(best), exact=True)


def _quota(n: int, targets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Neurons per split: largest remainders (ties broken at random), at least one each."""
    raw = targets * n
    quota = np.floor(raw).astype(np.int64)
    order = np.lexsort((rng.random(len(targets)), -(raw - quota)))
    quota[order[: n - quota.sum()]] += 1
    while quota.min() < 1:
        quota[np.argmax(quota)] -= 1
        quota[np.argmin(quota)] += 1
    return quota


def _greedy(sizes: np.ndarray, targets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Heavy neurons first (largest first), then the rest in seeded random order; each goes to the split with the
    largest relative synapse deficit among those still below their neuron quota."""
    n_splits, total = len(targets), sizes.sum()
    quota = _quota(len(sizes), targets, rng)
    # A neuron is heavy when misplacing it alone would use up half the tolerance of the smallest split's band;
    # such neurons decide what is reachable, so they must not wait for a random turn.
    heavy_cut = 0.025 * total
    jitter = rng.random(len(sizes))
    heavy = np.flatnonzero(sizes >= heavy_cut)
    heavy = heavy[np.lexsort((jitter[heavy], -sizes[heavy]))]
    light = np.flatnonzero(sizes < heavy_cut)
    light = light[rng.permutation(len(light))]
    want = targets * total
    filled = np.zeros(n_splits)
    count = np.zeros(n_splits, dtype=np.int64)
    assignment = np.empty(len(sizes), dtype=np.int64)
    for i in np.concatenate([heavy, light]):
        deficit = np.where(count < quota, (want - filled) / want, -np.inf)
        s = int(np.argmax(deficit))
        assignment[i] = s
        filled[s] += sizes[i]
        count[s] += 1
    return assignment


def _refine(sizes: np.ndarray, assignment: np.ndarray, targets: np.ndarray, max_rounds: int = 5000) -> np.ndarray:
    """Steepest descent on (largest deviation, sum of squared deviations) over single moves between two splits and
    swaps of one neuron each way. Swaps keep neuron counts and fix synapse shares; moves fix neuron counts.

    For a swap between splits a and b the best synapse transfer is d* = (e_a - e_b) / 2 (e = surplus over
    target); for each neuron of a only the two neurons of b whose size is closest to (size - d*) can be best, so
    a round costs O(n log n), not O(n^2)."""
    assignment = assignment.copy()
    n_splits, n_total, w_total = len(targets), float(len(sizes)), float(sizes.sum())
    n = np.bincount(assignment, minlength=n_splits).astype(np.float64)
    w = np.bincount(assignment, weights=sizes, minlength=n_splits)
    for _ in range(max_rounds):
        current = _score(n, w, targets, n_total, w_total)
        dn = np.abs(n / n_total - targets)
        dw = np.abs(w / w_total - targets)
        dev = np.maximum(dn, dw)
        sq = dn * dn + dw * dw
        best_score, best_change = current, None
        for a in range(n_splits):
            for b in range(a + 1, n_splits):
                others = [s for s in range(n_splits) if s not in (a, b)]
                fixed_max = float(dev[others].max()) if others else 0.0
                fixed_sq = float(sq[others].sum())
                in_a, in_b = np.flatnonzero(assignment == a), np.flatnonzero(assignment == b)
                cand = _candidates(sizes, in_a, in_b, n, w, targets * w_total, a, b)
                if cand is None:
                    continue
                i, j, moved, delta = cand  # neurons (or -1), net neurons and synapses a -> b
                na, nb = (n[a] - moved) / n_total, (n[b] + moved) / n_total
                wa, wb = (w[a] - delta) / w_total, (w[b] + delta) / w_total
                terms = np.abs(np.stack([na - targets[a], nb - targets[b], wa - targets[a], wb - targets[b]]))
                new_max = np.maximum(terms.max(axis=0), fixed_max)
                new_sq = (terms * terms).sum(axis=0) + fixed_sq
                k = int(np.lexsort((new_sq, new_max))[0])
                score = (float(new_max[k]), float(new_sq[k]))
                if _better(score, best_score):
                    best_score, best_change = score, (a, b, int(i[k]), int(j[k]), float(moved[k]), float(delta[k]))
        if best_change is None:
            break
        a, b, i, j, moved, delta = best_change
        if i >= 0:
            assignment[i] = b
        if j >= 0:
            assignment[j] = a
        n[a] -= moved
        n[b] += moved
        w[a] -= delta
        w[b] += delta
    return assignment


def _candidates(
    sizes: np.ndarray,
    in_a: np.ndarray,
    in_b: np.ndarray,
    n: np.ndarray,
    w: np.ndarray,
    want: np.ndarray,
    a: int,
    b: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Candidate changes between splits a and b: (neuron leaving a or -1, neuron leaving b or -1, net neurons
    a -> b, net synapses a -> b). A split never drops below one neuron."""
    parts_i, parts_j, parts_m, parts_d = [], [], [], []
    if n[a] > 1:  # move one neuron a -> b
        parts_i.append(in_a)
        parts_j.append(np.full(len(in_a), -1))
        parts_m.append(np.ones(len(in_a)))
        parts_d.append(sizes[in_a])
    if n[b] > 1:  # move one neuron b -> a
        parts_i.append(np.full(len(in_b), -1))
        parts_j.append(in_b)
        parts_m.append(-np.ones(len(in_b)))
        parts_d.append(-sizes[in_b])
    if len(in_a) and len(in_b):  # swap, aimed at the ideal transfer
        ideal = ((w[a] - want[a]) - (w[b] - want[b])) / 2.0
        order = np.argsort(sizes[in_b], kind="stable")
        sorted_b = sizes[in_b][order]
        pos = np.searchsorted(sorted_b, sizes[in_a] - ideal)
        for p in (np.clip(pos - 1, 0, len(sorted_b) - 1), np.clip(pos, 0, len(sorted_b) - 1)):
            j = in_b[order[p]]
            parts_i.append(in_a)
            parts_j.append(j)
            parts_m.append(np.zeros(len(in_a)))
            parts_d.append(sizes[in_a] - sizes[j])
    if not parts_i:
        return None
    return np.concatenate(parts_i), np.concatenate(parts_j), np.concatenate(parts_m), np.concatenate(parts_d)


# --------------------------------------------------------------------------------------------- other row filters


def cap_per_neuron(pre_root_id: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Keep-mask holding at most ``cap`` random synapses of each presynaptic neuron (a few neurons own most
    synapses; uncapped, they dominate both training and the metrics)."""
    rng = np.random.default_rng([seed, 1])
    order = rng.permutation(len(pre_root_id))
    rank = pd.Series(pre_root_id[order]).groupby(pre_root_id[order]).cumcount().to_numpy()
    keep = np.zeros(len(pre_root_id), dtype=bool)
    keep[order[rank < cap]] = True
    return keep


def spatial_conflicts(positions_nm: np.ndarray, split: np.ndarray, block_nm: float) -> np.ndarray:
    """Drop-mask: in each cubic block holding synapses of several splits, those not of the block's largest split
    (ties go to train, then val), so nearby synapses never straddle splits."""
    blocks = np.floor(np.asarray(positions_nm) / block_nm).astype(np.int64)
    frame = pd.DataFrame({"bx": blocks[:, 0], "by": blocks[:, 1], "bz": blocks[:, 2], "split": split})
    counts = frame.groupby(["bx", "by", "bz", "split"]).size().rename("n").reset_index()
    counts = counts.sort_values(["bx", "by", "bz", "n", "split"], ascending=[True, True, True, False, True])
    winner = counts.drop_duplicates(["bx", "by", "bz"]).set_index(["bx", "by", "bz"])["split"]
    keep_split = winner.reindex(pd.MultiIndex.from_frame(frame[["bx", "by", "bz"]])).to_numpy()
    return keep_split != split


def balance_classes(label: np.ndarray, split: np.ndarray, seed: int) -> np.ndarray:
    """Keep-mask with, in every split, as many synapses of the majority class as the minority has."""
    rng = np.random.default_rng([seed, 2])
    keep = np.zeros(len(label), dtype=bool)
    for s in np.unique(split):
        idx = [np.flatnonzero((split == s) & (label == c)) for c in (0, 1)]
        n = min(len(i) for i in idx)
        for i in idx:
            keep[rng.choice(i, n, replace=False)] = True
    return keep
