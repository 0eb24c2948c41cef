"""Top examples of one transcoder latent, computed live, against a brute-force loop over contexts and tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import TEXTS

from pipeline.features.transcoder_examples import latent_examples, layer_codes
from pipeline.sae.transcoder_format import transcoder_from_saelens

LAYER = 2
D_SAE = 24


def random_transcoder(arch: str, d_model: int = 32):
    generator = torch.Generator().manual_seed(1)
    tensors = {
        "W_enc": torch.randn(d_model, D_SAE, generator=generator),
        "b_enc": torch.randn(D_SAE, generator=generator) - 1.0,
        "W_dec": torch.randn(D_SAE, d_model, generator=generator),
        "b_dec": torch.zeros(d_model),
    }
    cfg = {"architecture": "transcoder", "activation_fn": arch, "d_in": d_model, "d_sae": D_SAE, "k": 3}
    return transcoder_from_saelens(tensors, cfg)


def contexts(tokenizer, n: int = 7, ctx_len: int = 20) -> torch.Tensor:
    rows = []
    for text in TEXTS[:n]:
        ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False).input_ids]
        rows.append(ids[:ctx_len])
    return torch.tensor(rows)


def brute_force(model, tc, tokens_CT, ordinary_CT, latent, top_n, window):
    """One full forward per context; each token's code from the weights by hand; Python loops for the rest."""
    mlp_in = {}
    norm = model.model.layers[LAYER].post_attention_layernorm
    handle = norm.register_forward_hook(lambda _m, _i, out: mlp_in.__setitem__("x", out))
    per_context = []
    try:
        with torch.no_grad():
            for row in tokens_CT:
                model(row.unsqueeze(0))
                pre_TF = mlp_in["x"][0].float() @ tc.W_enc + tc.b_enc
                if tc.cfg.architecture == "topk":
                    kth = pre_TF.topk(tc.cfg.k, dim=1).values[:, -1:]
                    pre_TF = torch.where(pre_TF >= kth, pre_TF, torch.zeros(()))
                per_context.append(torch.relu(pre_TF[:, latent]).tolist())
    finally:
        handle.remove()
    values, peaks = [], []
    for c, acts in enumerate(per_context):
        acts = [a if ordinary_CT[c, t] else 0.0 for t, a in enumerate(acts)]
        per_context[c] = acts
        values += [a for t, a in enumerate(acts) if ordinary_CT[c, t]]
        best = max(acts)
        if best > 0:
            peaks.append((-best, c, acts.index(best)))
    peaks.sort()
    windows = [(c, t, per_context[c][max(0, t - window) : t + window + 1]) for _, c, t in peaks[:top_n]]
    active = [v for v in values if v > 0]
    return len(values), active, windows


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_latent_examples_match_brute_force(tokenizer, tiny_model, arch):
    tc = random_transcoder(arch)
    tokens_CT = contexts(tokenizer)
    ordinary_CT = tokens_CT != tokenizer.bos_token_id
    codes = layer_codes(tiny_model, tc, tokens_CT, LAYER, ordinary_CT, batch_contexts=3)
    checked = 0
    for latent in range(D_SAE):
        got = latent_examples(codes, latent, top_n=4, window=3)
        n_tokens, active, windows = brute_force(tiny_model, tc, tokens_CT, ordinary_CT, latent, 4, 3)
        assert got.n_tokens == n_tokens == int(ordinary_CT.sum())
        assert got.n_active == len(active)
        assert got.density == pytest.approx(len(active) / n_tokens)
        assert got.max_act == pytest.approx(max(active, default=0.0), abs=1e-4)
        assert got.mean_act == pytest.approx(sum(active) / len(active) if active else 0.0, abs=1e-4)
        assert [(e.context, e.peak) for e in got.examples] == [(c, t) for c, t, _ in windows]
        for example, (_, peak, acts) in zip(got.examples, windows, strict=True):
            assert example.acts == pytest.approx(acts, abs=1e-4)
            assert example.acts[peak - example.start] == pytest.approx(example.activation)
        checked += bool(got.examples)
    assert checked >= D_SAE // 3  # most latents fire somewhere: the comparison is not all empty lists


def test_special_positions_have_no_codes_and_progress_is_reported(tokenizer, tiny_model):
    tc = random_transcoder("relu")
    tokens_CT = contexts(tokenizer)
    ordinary_CT = tokens_CT != tokenizer.bos_token_id
    done = []
    codes = layer_codes(tiny_model, tc, tokens_CT, LAYER, ordinary_CT, batch_contexts=3, on_batch=done.append)
    assert done == [3, 6, 7]
    positions = codes.token_M % tokens_CT.shape[1]
    assert (positions != 0).all()  # position 0 holds BOS in every context
    with pytest.raises(ValueError, match="batch_contexts must be positive"):
        layer_codes(tiny_model, tc, tokens_CT, LAYER, ordinary_CT, batch_contexts=0)


def test_interval_examples_slice_the_active_values_into_equal_counts():
    from pipeline.features.transcoder_examples import LayerCodes, interval_examples

    # 2 contexts x 6 positions; latent 4 is active at 7 tokens with values 1..7 (latent 5 is noise).
    token_M = torch.tensor([0, 2, 3, 5, 6, 9, 11, 1])
    value_M = torch.tensor([3.0, 1.0, 7.0, 2.0, 5.0, 4.0, 6.0, 9.0])
    latent_M = torch.tensor([4, 4, 4, 4, 4, 4, 4, 5])
    codes = LayerCodes(token_M, latent_M, value_M, torch.ones(2, 6, dtype=torch.bool))
    bins = interval_examples(codes, 4, n_bins=3, per_bin=2, window=1)
    # sorted: 1@2 2@5 3@0 | 4@9 5@6 | 6@11 7@3  (tensor_split gives 3, 2, 2)
    assert [(b.low, b.high, b.n_tokens) for b in bins] == [(0.0, 3.0, 3), (3.0, 5.0, 2), (5.0, 7.0, 2)]
    assert [[(e.context, e.peak, e.activation) for e in b.examples] for b in bins] == [
        [(0, 2, 1.0), (0, 0, 3.0)],
        [(1, 3, 4.0), (1, 0, 5.0)],
        [(1, 5, 6.0), (0, 3, 7.0)],
    ]
    first = bins[0].examples[0]
    assert (first.start, first.acts) == (1, [0.0, 1.0, 7.0])  # one token either side of position 2
    assert interval_examples(codes, 3) == []  # never active
    assert len(interval_examples(codes, 5, n_bins=5)) == 1  # fewer active tokens than bins
