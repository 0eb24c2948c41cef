"""Streaming feature statistics equal a brute-force oracle on a small random problem."""

import pytest
import torch

from pipeline.features.statistics import CodeBatch, FeatureAccumulator, per_context_peaks, sort_by_keys


def random_codes(n_contexts=40, ctx_len=12, n_features=15, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = n_contexts * ctx_len
    idx = torch.stack([torch.randperm(n_features, generator=g)[:k] for _ in range(n)])
    acts = torch.rand(n, k, generator=g).mul(10).round().div(2)  # many ties and some zeros
    context = torch.arange(n) // ctx_len
    position = torch.arange(n) % ctx_len
    return acts, idx, context, position


def brute_force_top(acts, idx, context, position, n_features, top_k):
    """Per feature: per-context peak (earliest position on ties), then K best (smaller context on ties)."""
    result = {}
    for f in range(n_features):
        peaks = {}
        for n in range(acts.shape[0]):
            for j in range(acts.shape[1]):
                v = acts[n, j].item()
                if idx[n, j].item() != f or v <= 0:
                    continue
                c, p = context[n].item(), position[n].item()
                if c not in peaks or v > peaks[c][0] or (v == peaks[c][0] and p < peaks[c][1]):
                    peaks[c] = (v, p)
        ranked = sorted(((v, c, p) for c, (v, p) in peaks.items()), key=lambda t: (-t[0], t[1]))
        result[f] = ranked[:top_k]
    return result


@pytest.mark.parametrize("batch_contexts", [1, 7, 40])
def test_streaming_equals_brute_force(batch_contexts):
    acts, idx, context, position = random_codes()
    ctx_len = 12
    acc = FeatureAccumulator(n_features=15, top_k=4)
    for start in range(0, 40, batch_contexts):
        rows = slice(start * ctx_len, (start + batch_contexts) * ctx_len)
        batch = CodeBatch.from_codes(acts[rows], idx[rows], context[rows], position[rows])
        acc.update(batch, n_tokens=acts[rows].shape[0])
    expected = brute_force_top(acts, idx, context, position, 15, 4)
    for f in range(15):
        got = [
            (acc.top_value_FK[f, j].item(), acc.top_context_FK[f, j].item(), acc.top_position_FK[f, j].item())
            for j in range(4)
            if acc.top_context_FK[f, j] >= 0
        ]
        assert got == expected[f], f
    dense = torch.zeros(acts.shape[0], 15).scatter_add(1, idx, acts)
    assert torch.equal(acc.count_F, (dense > 0).sum(0))
    torch.testing.assert_close(acc.sum_F, dense.double().sum(0))
    torch.testing.assert_close(acc.max_F, dense.max(0).values)
    assert acc.n_tokens == 480
    torch.testing.assert_close(acc.density_F(), (dense > 0).double().mean(0))


def test_dead_features_keep_empty_slots():
    acc = FeatureAccumulator(n_features=3, top_k=2)
    batch = CodeBatch(torch.tensor([0, 0]), torch.tensor([0, 0]), torch.tensor([1, 2]), torch.tensor([1.0, 3.0]))
    acc.update(batch, n_tokens=4)
    assert acc.count_F.tolist() == [2, 0, 0]
    assert acc.top_context_FK[0].tolist() == [0, -1] and acc.top_position_FK[0, 0] == 2
    assert acc.mean_F().tolist() == [2.0, 0.0, 0.0]


def test_per_context_peaks_and_lexsort():
    batch = CodeBatch(
        torch.tensor([1, 1, 1, 2]),
        torch.tensor([5, 5, 6, 5]),
        torch.tensor([3, 1, 0, 2]),
        torch.tensor([2.0, 2.0, 1.0, 4.0]),
    )
    peaks = per_context_peaks(batch)
    assert sorted(zip(peaks.feature.tolist(), peaks.context.tolist(), peaks.position.tolist(), strict=True)) == [
        (1, 5, 1),
        (1, 6, 0),
        (2, 5, 2),
    ]
    order = sort_by_keys(torch.tensor([2, 1, 2, 1]), torch.tensor([0, 1, 0, 0]))
    assert order.tolist() == [3, 1, 0, 2]
