"""What graph features fire on: top_input_tokens against a brute-force loop over every token."""

from __future__ import annotations

import torch
from conftest import TEXTS

from pipeline.lm.hook_points import HookPoint, capture
from pipeline.sae.transcoder_format import transcoder_from_saelens
from pipeline.tracing.feature_labels import top_input_tokens


def random_transcoder(seed: int, d_model: int = 32, d_sae: int = 24):
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "W_enc": torch.randn(d_model, d_sae, generator=generator),
        "b_enc": torch.randn(d_sae, generator=generator) - 1.0,
        "W_dec": torch.randn(d_sae, d_model, generator=generator),
        "b_dec": torch.zeros(d_model),
    }
    return transcoder_from_saelens(tensors, {"architecture": "transcoder", "activation_fn": "relu", "d_in": d_model,
                                             "d_sae": d_sae})  # fmt: skip


def test_top_input_tokens_match_a_loop_over_every_token(tiny_model, tokenizer):
    rows = [[tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False).input_ids][:16] for t in TEXTS[:6]]
    tokens_CT = torch.tensor([r + [tokenizer.eos_token_id] * (16 - len(r)) for r in rows])
    ordinary_CT = tokens_CT != tokenizer.bos_token_id
    tcs = {1: random_transcoder(1), 2: random_transcoder(2)}
    wanted = {1: [0, 5, 9], 2: [3, 23]}
    found = top_input_tokens(tiny_model, tcs, wanted, tokens_CT, ordinary_CT, top_n=3, batch_contexts=4)
    for layer, latents in wanted.items():
        best: dict[int, list[tuple[float, int, int]]] = {latent: [] for latent in latents}
        order = 0
        for c in range(tokens_CT.shape[0]):
            x_TD = capture(tiny_model, tokens_CT[c : c + 1], [HookPoint(layer, "mlp-in")])[HookPoint(layer, "mlp-in")][
                0
            ]
            for t in range(tokens_CT.shape[1]):
                if not ordinary_CT[c, t]:
                    continue
                with torch.no_grad():
                    acts = tcs[layer].encode(x_TD[t : t + 1].float())[0]
                for latent in latents:
                    best[latent].append((-float(acts[latent]), order, int(tokens_CT[c, t])))
                order += 1
        for latent in latents:
            distinct: list[int] = []
            for negative, _, token in sorted(best[latent]):
                if -negative > 0 and token not in distinct and len(distinct) < 3:
                    distinct.append(token)
            assert found[(layer, latent)] == distinct, (layer, latent)
    assert any(found.values())  # some latent fires, so the comparison is not vacuous
    assert top_input_tokens(tiny_model, tcs, wanted, tokens_CT[:0], ordinary_CT[:0]) == {
        (1, 0): [], (1, 5): [], (1, 9): [], (2, 3): [], (2, 23): []
    }  # fmt: skip


def test_two_sided_labels_quote_tokens_as_the_viewer_shows_them():
    from pipeline.tracing.feature_labels import two_sided_label

    assert two_sided_label('fires on "a"', [" Paris", "\n"]) == 'fires on "a" → promotes " Paris", "⏎"'
    assert two_sided_label('fires after "x"', []) == 'fires after "x" → promotes no token clearly'


def test_explanations_become_short_reads_phrases():
    from pipeline.explain.token_explainer import NO_PATTERN
    from pipeline.tracing.feature_labels import explanation_phrase

    row = {"explainer": "tokens", "text": "fires on ...", "token_kind": "token", "tokens": [" a", " b", " c", " d"]}
    assert explanation_phrase(row) == 'fires on " a", " b", " c", ...'
    assert explanation_phrase({**row, "token_kind": "previous", "tokens": ["x"]}) == 'fires after "x"'
    assert explanation_phrase({**row, "text": NO_PATTERN, "tokens": []}) is None
    assert explanation_phrase({"explainer": "llm", "text": "French cities"}) == "French cities"
    pairs = {**row, "token_kind": "bigram", "tokens": ["ab", "cd"], "text": 'fires on "b" after "a"; "d" after "c"'}
    assert explanation_phrase(pairs, shown=1) == 'fires on "b" after "a", ...'
    assert explanation_phrase(pairs) == 'fires on "b" after "a"; "d" after "c"'


def test_standardized_promoted_equals_the_index_ranking():
    from pipeline.features.decoder_geometry import logit_effect_rankings, standardized_promoted

    generator = torch.Generator().manual_seed(0)
    W_dec = torch.randn(40, 16, generator=generator, dtype=torch.float32)
    W_U = torch.randn(200, 16, generator=generator, dtype=torch.float32)
    W_U[5] = W_dec.mean(0) * 8  # a token every direction pushes: raw rankings would all start with it
    gamma = torch.rand(16, generator=generator) + 0.5
    _, standardized = logit_effect_rankings(W_dec, W_U, gamma, top_n=4)
    rows = [0, 7, 39]
    assert torch.equal(standardized_promoted(W_dec, rows, W_U, gamma, top_n=4), standardized["promoted_ids"][rows])


def test_moments_by_covariance_equal_the_pass_over_every_effect():
    from pipeline.features.decoder_geometry import token_effect_moments, token_effect_moments_by_covariance

    generator = torch.Generator().manual_seed(1)
    direction = torch.randn(64, 12, generator=generator, dtype=torch.float32) + 0.3
    W_U = torch.randn(90, 12, generator=generator, dtype=torch.float32)
    for fast, eager in zip(token_effect_moments_by_covariance(direction, W_U), token_effect_moments(direction, W_U, 16),
                           strict=True):  # fmt: skip
        torch.testing.assert_close(fast, eager, rtol=1e-5, atol=1e-5)


def test_label_items_read_both_sides_of_both_forms():
    from pipeline.tracing.feature_labels import label_items, two_sided_label

    label = two_sided_label('fires on " France", "Paris", ...', [" capital", "\n"])
    assert label_items(label) == ([" France", "Paris"], [" capital", "⏎"])
    assert label_items('fires on "b" after "a" → promotes "c"') == (["b", "a"], ["c"])
    assert label_items('French cities → promotes "x"') == (["French cities "], ["x"])
    assert label_items("the · Paris → city") == (["the ", " Paris "], [" city"])
