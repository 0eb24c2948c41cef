"""The examples an explanation is made from and scored on, split so scoring never sees the explainer's examples.

Shape legend: C contexts, T context length, R example rows, E windows, W = 2 * radius + 1 tokens.

An example is a window of W tokens centred on one token of a context, with the
feature's activation on each token. Per feature:
  * train: the examples the explainer reads (the strongest contexts first);
  * positives: activating test examples, one per context, drawn round-robin over
    the activation bins the index sampled;
  * negatives: as many non-activating test windows as positives, half "hard"
    (examples of the feature's nearest features on which it is zero), the rest
    random windows from a shared pool on which it is zero.
Train and test share no context, so no test window overlaps a window the
explainer saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD = -1
STRONG_TRAIN_CONTEXTS = 10
"""The top examples of this many strongest contexts always go to the explainer."""


@dataclass(frozen=True)
class Windows:
    """E windows of W tokens (PAD outside the context) and the feature's activation on each token."""

    tokens_EW: np.ndarray
    acts_EW: np.ndarray
    keys_E: np.ndarray
    """Identity of each window's centre: context * T + position."""

    def __len__(self) -> int:
        return len(self.keys_E)

    def take(self, rows) -> Windows:
        rows = np.asarray(rows, dtype=np.int64)
        return Windows(self.tokens_EW[rows], self.acts_EW[rows], self.keys_E[rows])

    @staticmethod
    def concat(*parts: Windows) -> Windows:
        return Windows(
            np.concatenate([p.tokens_EW for p in parts]),
            np.concatenate([p.acts_EW for p in parts]),
            np.concatenate([p.keys_E for p in parts]),
        )


@dataclass(frozen=True)
class FeatureExamples:
    """One feature's train examples and labelled test examples."""

    feature: int
    train: Windows
    positives: Windows
    random_negatives: Windows
    hard_negatives: Windows

    def test(self) -> tuple[Windows, np.ndarray]:
        """All test windows and their labels (True = activating)."""
        windows = Windows.concat(self.positives, self.random_negatives, self.hard_negatives)
        labels = np.zeros(len(windows), dtype=bool)
        labels[: len(self.positives)] = True
        return windows, labels


@dataclass(frozen=True)
class ExampleRows:
    """The index's example rows of every feature (sorted by feature), as flat arrays.

    ``window_*`` hold each row's sparse activations: positions ``window_start + offset``
    with values, flattened; ``window_lengths`` says how many belong to each row.
    """

    feature_R: np.ndarray
    is_top_R: np.ndarray
    rank_R: np.ndarray
    bin_R: np.ndarray
    context_R: np.ndarray
    position_R: np.ndarray
    window_start_R: np.ndarray
    window_lengths_R: np.ndarray
    window_offsets: np.ndarray
    window_values: np.ndarray


class WindowMaker:
    """Cuts windows of W tokens out of the indexed contexts."""

    def __init__(self, context_ids_C: np.ndarray, tokens_CT: np.ndarray, radius: int):
        order = np.argsort(context_ids_C)
        self.context_ids = np.asarray(context_ids_C)[order]
        self.tokens_CT = np.asarray(tokens_CT)[order].astype(np.int64)
        self.radius = radius
        self.ctx_len = self.tokens_CT.shape[1]

    def windows(self, context_E, position_E, acts_EW: np.ndarray | None = None) -> Windows:
        context_E, position_E = np.asarray(context_E, np.int64), np.asarray(position_E, np.int64)
        rows = np.searchsorted(self.context_ids, context_E)
        offsets_W = np.arange(-self.radius, self.radius + 1)
        positions_EW = position_E[:, None] + offsets_W[None, :]
        inside = (positions_EW >= 0) & (positions_EW < self.ctx_len)
        tokens = self.tokens_CT[rows[:, None], positions_EW.clip(0, self.ctx_len - 1)]
        tokens_EW = np.where(inside, tokens, PAD)
        if acts_EW is None:
            acts_EW = np.zeros(tokens_EW.shape, dtype=np.float32)
        return Windows(tokens_EW, acts_EW, context_E * self.ctx_len + position_E)

    def example_windows(self, rows: ExampleRows) -> Windows:
        """The window of every example row, with the feature's activations filled in."""
        n, width = len(rows.feature_R), 2 * self.radius + 1
        acts_EW = np.zeros((n, width), dtype=np.float32)
        owner = np.repeat(np.arange(n), rows.window_lengths_R)
        absolute = np.repeat(rows.window_start_R, rows.window_lengths_R) + rows.window_offsets
        column = absolute - np.repeat(rows.position_R, rows.window_lengths_R) + self.radius
        keep = (column >= 0) & (column < width)
        acts_EW[owner[keep], column[keep]] = rows.window_values[keep]
        return self.windows(rows.context_R, rows.position_R, acts_EW)


def split_feature(rows: ExampleRows, lo: int, hi: int, n_train: int, n_test: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows) among rows[lo:hi] of one feature; see the module docstring.

    Contexts are assigned whole: the strongest top contexts go to train, the others
    alternate in a fixed hash order, with the test share capped so the explainer
    keeps up to ``n_train`` examples.
    """
    index = np.arange(lo, hi)
    context, is_top, rank = rows.context_R[index], rows.is_top_R[index], rows.rank_R[index]
    strong = set(context[is_top & (rank < STRONG_TRAIN_CONTEXTS)].tolist())
    others = dict.fromkeys(context.tolist())
    others = sorted((c for c in others if c not in strong), key=lambda c: _mix(c, int(rows.feature_R[lo])))
    train_share = min(len(others) // 2, max(0, n_train - len(strong)))
    test_contexts = set(others[: min(n_test, len(others) - train_share)])
    # One test row per test context, round-robin over bins: order by (rank, kind, bin).
    order = index[np.lexsort((rows.bin_R[index], is_top, rank))]
    test, seen = [], set()
    for row in order:
        c = int(rows.context_R[row])
        if c in test_contexts and c not in seen:
            seen.add(c)
            test.append(row)
    train_order = index[np.lexsort((rank, ~is_top))]
    train = _unique_keys(rows, [r for r in train_order if int(rows.context_R[r]) not in test_contexts])[:n_train]
    return np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)


def _unique_keys(rows: ExampleRows, candidates: list[int]) -> list[int]:
    """Drop rows repeating an earlier row's (context, position)."""
    kept, seen = [], set()
    for row in candidates:
        key = (int(rows.context_R[row]), int(rows.position_R[row]))
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


def _mix(context: int, feature: int) -> int:
    """A fixed pseudo-random order of contexts, different per feature (64-bit multiplicative hash)."""
    return ((context * 0x9E3779B97F4A7C15) ^ (feature * 0xC2B2AE3D27D4EB4F)) & 0xFFFFFFFFFFFFFFFF


def feature_bounds(feature_R: np.ndarray) -> dict[int, tuple[int, int]]:
    """Row range [lo, hi) of each feature in rows sorted by feature."""
    features, starts = np.unique(feature_R, return_index=True)
    ends = np.append(starts[1:], len(feature_R))
    return {int(f): (int(s), int(e)) for f, s, e in zip(features, starts, ends, strict=True)}


class ExampleSource:
    """Assembles any feature's ``FeatureExamples`` from the index's rows and negatives.

    ``pool_*``: the shared random windows and, as (slot, feature) pairs, which features
    fire on each; ``hard_*``: per feature, windows of its neighbours on which it is zero.
    """

    def __init__(
        self,
        rows: ExampleRows,
        maker: WindowMaker,
        pool_context: np.ndarray,
        pool_position: np.ndarray,
        firing_slot: np.ndarray,
        firing_feature: np.ndarray,
        hard_feature: np.ndarray,
        hard_context: np.ndarray,
        hard_position: np.ndarray,
    ):
        self.rows, self.maker = rows, maker
        self.examples = maker.example_windows(rows)
        self.bounds = feature_bounds(rows.feature_R)
        self.pool = maker.windows(pool_context, pool_position)
        order = np.argsort(firing_feature, kind="stable")
        self.firing_slots, self.firing_bounds = firing_slot[order], feature_bounds(firing_feature[order])
        order = np.argsort(hard_feature, kind="stable")
        self.hard = maker.windows(hard_context[order], hard_position[order])
        self.hard_bounds = feature_bounds(hard_feature[order])

    def features(self) -> list[int]:
        """Features with at least one example (the live ones)."""
        return sorted(self.bounds)

    def for_feature(self, feature: int, n_train: int, n_test: int) -> FeatureExamples:
        lo, hi = self.bounds.get(feature, (0, 0))
        train, test = split_feature(self.rows, lo, hi, n_train, n_test) if hi > lo else ([], [])
        positives = self.examples.take(test)
        start, stop = self.hard_bounds.get(feature, (0, 0))
        hard = self.hard.take(np.arange(start, min(stop, start + len(positives) // 2)))
        return FeatureExamples(
            feature=feature,
            train=self.examples.take(train),
            positives=positives,
            random_negatives=self.pool.take(self._quiet_slots(feature, len(positives) - len(hard))),
            hard_negatives=hard,
        )

    def _quiet_slots(self, feature: int, n: int) -> np.ndarray:
        """``n`` pool windows on which the feature is zero, from a per-feature starting point."""
        lo, hi = self.firing_bounds.get(feature, (0, 0))
        quiet = np.setdiff1d(np.arange(len(self.pool)), self.firing_slots[lo:hi])
        if len(quiet) == 0:
            return quiet
        start = _mix(feature, 1) % len(quiet)
        return np.roll(quiet, -start)[:n]
