"""Metric formulas against numbers computed by hand or independently."""

import pytest
import torch

from pipeline.evaluation.lm_loss import ce_loss_recovered, splice_metrics
from pipeline.evaluation.reconstruction import ReconstructionStats, reconstruction_report
from pipeline.sae.model import Sae, SaeConfig


def _stats(x, x_hat, active=None, d_sae=4):
    stats = ReconstructionStats(x.shape[1], d_sae)
    active = torch.full((x.shape[0],), 2.0) if active is None else active
    stats.update(x, x_hat, active, torch.tensor([True, False, True, False]))
    return stats.result()


def test_fvu_uses_the_dataset_mean_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]])
    x_hat = torch.tensor([[1.0, 3.0], [3.0, 4.0], [4.0, 9.0]])
    # squared error: 1 + 0 + 1 = 2; mean (3, 5); sum ||x - mean||^2 = (4+9) + (0+1) + (4+16) = 34
    result = _stats(x, x_hat)
    assert result.fvu == pytest.approx(2 / 34)
    assert result.explained_variance == pytest.approx(1 - 2 / 34)
    assert result.mse == pytest.approx(2 / 3)
    # the wrong denominators would give: zero mean 1+4+9+16+25+81 = 136; per-token mean 0.5+0.5+8 = 9
    assert result.fvu not in (pytest.approx(2 / 136), pytest.approx(2 / 9))


def test_fvu_is_the_same_streamed_in_batches_and_with_a_large_offset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g) + 1e4  # a large mean, as in residual streams
    x_hat = x + 0.1 * torch.randn(300, 6, generator=g)
    whole = _stats(x, x_hat, d_sae=4).fvu
    stats = ReconstructionStats(6, 4)
    for part in range(3):
        rows = slice(100 * part, 100 * (part + 1))
        stats.update(x[rows], x_hat[rows], torch.ones(100), torch.zeros(4, dtype=torch.bool))
    expected = ((x - x_hat).double() ** 2).sum() / ((x.double() - x.double().mean(0)) ** 2).sum()
    assert stats.result().fvu == pytest.approx(expected.item(), rel=1e-9)
    assert whole == pytest.approx(expected.item(), rel=1e-9)


def test_l0_and_dead_fraction():
    x = torch.randn(4, 2)
    result = _stats(x, x, active=torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert result.l0 == 3.0
    assert result.dead_fraction == 0.5


def test_pca_baseline_equals_an_independent_svd():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 8, generator=g) @ torch.randn(8, 8, generator=g) + 3.0
    stats = ReconstructionStats(8, 4)
    stats.update(x, x, torch.full((500,), 3.0), torch.ones(4, dtype=torch.bool))
    centered = (x - x.mean(0)).double()
    _, s, vh = torch.linalg.svd(centered, full_matrices=False)
    top3 = vh[:3]
    reconstruction = centered @ top3.T @ top3
    expected = ((centered - reconstruction) ** 2).sum() / (centered**2).sum()
    result = stats.result()
    assert result.pca_rank == 3
    assert result.pca_fvu == pytest.approx(expected.item(), rel=1e-8)


def test_ce_loss_recovered_formula():
    assert ce_loss_recovered(ce_clean=2.0, ce_spliced=2.5, ce_zero=6.0) == pytest.approx(0.875)
    assert ce_loss_recovered(2.0, 2.0, 6.0) == 1.0
    assert ce_loss_recovered(2.0, 6.0, 6.0) == 0.0


def test_splice_with_identity_recovers_everything_and_zero_nothing(tiny_model, tokenizer):
    ids = tokenizer(
        ["<bos>The cat sat on the mat.", "<bos>Dogs bark at cats, loudly!!"], padding=True, return_tensors="pt"
    ).input_ids[:, :20]
    ordinary = (ids != tokenizer.bos_token_id) & (ids != tokenizer.pad_token_id)
    same = splice_metrics(tiny_model, 1, lambda h: h, ids, ordinary)
    assert same.ce_loss_recovered == pytest.approx(1.0, abs=1e-6)
    assert same.delta_lm_loss == pytest.approx(0.0, abs=1e-6)
    assert same.kl_spliced == pytest.approx(0.0, abs=1e-6)
    zero = splice_metrics(tiny_model, 1, torch.zeros_like, ids, ordinary)
    assert zero.ce_loss_recovered == pytest.approx(0.0, abs=1e-6)
    assert zero.kl_zero == pytest.approx(zero.kl_spliced) and zero.kl_zero > 0
    assert same.n_tokens == int((ordinary[:, :-1] & ordinary[:, 1:]).sum())


def test_reconstruction_report_excludes_outliers_separately():
    sae = Sae(SaeConfig(d_in=4, d_sae=8, k=2)).initialize(torch.Generator().manual_seed(0)).eval()
    x = torch.randn(64, 4)
    x[5] *= 1000.0
    report = reconstruction_report(sae, [x[:32], x[32:]])
    assert report["outlier_tokens"] == 1
    assert report["n_tokens"] == 64
    assert report["l0"] <= 2.0


def test_splice_metrics_equal_an_independent_computation(tiny_model, tokenizer):
    """A non-trivial splice (h -> 0.7 h + c) against a hand-made hook and F.cross_entropy / F.kl_div."""
    import torch.nn.functional as F

    ids = tokenizer(
        ["<bos>The cat sat on the mat.", "<bos>Dogs bark at cats, loudly!!"], padding=True, return_tensors="pt"
    ).input_ids[:, :20]
    ordinary = (ids != tokenizer.bos_token_id) & (ids != tokenizer.pad_token_id)
    shift = torch.linspace(-0.3, 0.3, tiny_model.config.hidden_size)
    edit = lambda h: 0.7 * h + shift  # noqa: E731
    got = splice_metrics(tiny_model, 1, edit, ids, ordinary)

    def logits_with(function):
        """Replace block 1's output at ordinary positions only (special positions stay clean, as documented)."""
        block = tiny_model.model.layers[1]
        keep = lambda h: torch.where(ordinary.unsqueeze(-1), function(h), h)  # noqa: E731
        handle = block.register_forward_hook(
            lambda _m, _i, out: (keep(out[0]), *out[1:]) if isinstance(out, tuple) else keep(out)
        )
        try:
            with torch.no_grad():
                return tiny_model(input_ids=ids).logits
        finally:
            handle.remove()

    scored = ordinary[:, :-1] & ordinary[:, 1:]
    targets = ids[:, 1:][scored]

    def ce(logits):
        return F.cross_entropy(logits[:, :-1][scored].float(), targets).item()

    with torch.no_grad():
        clean = tiny_model(input_ids=ids).logits
    spliced, zero = logits_with(edit), logits_with(torch.zeros_like)
    log_clean = F.log_softmax(clean[:, :-1][scored].float(), -1)
    kl = F.kl_div(F.log_softmax(spliced[:, :-1][scored].float(), -1), log_clean, log_target=True, reduction="batchmean")
    assert got.ce_clean == pytest.approx(ce(clean), rel=1e-5)
    assert got.ce_spliced == pytest.approx(ce(spliced), rel=1e-5)
    assert got.ce_zero == pytest.approx(ce(zero), rel=1e-5)
    assert got.kl_spliced == pytest.approx(kl.item(), rel=1e-4, abs=1e-7)
    expected = (ce(zero) - ce(spliced)) / (ce(zero) - ce(clean))
    assert got.ce_loss_recovered == pytest.approx(expected, rel=1e-4)  # a ratio of small differences
