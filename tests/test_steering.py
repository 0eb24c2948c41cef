"""Steering on a tiny model: no-op edits, position masks under a KV cache, hook hygiene, a planted feature."""

import pytest
import torch

from pipeline.lm.hooks import decoder_blocks, residual_after_block
from pipeline.sae.model import Sae, SaeConfig
from pipeline.steering.edit import FeatureSteer, SteeringSpec, steer
from pipeline.steering.generation import SamplingConfig, compare, sample, sweep

LAYER = 1


@pytest.fixture(scope="module")
def sae(tiny_model):
    torch.manual_seed(0)
    model_sae = Sae(SaeConfig(d_in=32, d_sae=48, architecture="relu")).initialize(torch.Generator().manual_seed(0))
    with torch.no_grad():
        model_sae.b_enc.fill_(0.05)
    return model_sae.eval()


@pytest.fixture
def ids(tokenizer):
    return [tokenizer.bos_token_id] + tokenizer("The cat sat on the", add_special_tokens=False).input_ids


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


def _active_feature(model, sae, ids):
    with torch.no_grad():
        feats = sae.encode(residual_after_block(model, torch.tensor([ids]), LAYER)[0])
    return int((feats > 0).sum(0).argmax()), feats


def test_clamping_each_position_to_its_own_value_changes_nothing(tiny_model, sae, ids):
    clean = _logits(tiny_model, ids)
    feature, feats = _active_feature(tiny_model, sae, ids)
    past = None
    for t, token in enumerate(ids):
        spec = SteeringSpec((FeatureSteer(feature, "clamp", float(feats[t, feature])),))
        with steer(tiny_model, sae, LAYER, spec), torch.no_grad():
            out = tiny_model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        torch.testing.assert_close(out.logits[0, -1], clean[t], rtol=1e-4, atol=1e-5)


def test_adding_zero_changes_nothing(tiny_model, sae, ids):
    with steer(tiny_model, sae, LAYER, SteeringSpec((FeatureSteer(3, "add", 0.0), FeatureSteer(5, "scale", 1.0)))):
        steered = _logits(tiny_model, ids)
    assert torch.equal(steered, _logits(tiny_model, ids))


def test_generated_only_leaves_prompt_logits_identical(tiny_model, sae, ids):
    spec = SteeringSpec((FeatureSteer(3, "add", 50.0, positions="generated"),), prompt_len=len(ids))
    with steer(tiny_model, sae, LAYER, spec):
        steered = _logits(tiny_model, ids)
    assert torch.equal(steered, _logits(tiny_model, ids))
    longer = ids + ids[1:3]
    with steer(tiny_model, sae, LAYER, spec):
        changed = _logits(tiny_model, longer)
    assert torch.equal(changed[: len(ids)], _logits(tiny_model, longer)[: len(ids)])
    assert not torch.allclose(changed[len(ids) :], _logits(tiny_model, longer)[len(ids) :])


def _edited_positions(model, sae, ids, run):
    edited = []

    def record(positions, delta):
        rows = delta.abs().sum(-1) > 0
        edited.extend(positions[rows].tolist())

    spec = SteeringSpec((FeatureSteer(3, "add", 1.0, positions="all"),), prompt_len=len(ids))
    with steer(model, sae, LAYER, spec, on_edit=record):
        new = run()
    return edited, new


def test_all_positions_edited_exactly_once_under_kv_cache_generation(tiny_model, sae, ids):
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.0)
    edited, new = _edited_positions(tiny_model, sae, ids, lambda: sample(tiny_model, ids, cfg, eos_id=None))
    assert sorted(edited) == list(range(len(ids) + len(new) - 1))


def test_all_positions_edited_exactly_once_under_hf_generate(tiny_model, sae, ids):
    def run():
        out = tiny_model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, pad_token_id=3)
        return out[0, len(ids) :].tolist()

    edited, new = _edited_positions(tiny_model, sae, ids, run)
    assert sorted(edited) == list(range(len(ids) + len(new) - 1))


def test_only_the_hooked_block_output_changes(tiny_model, sae, ids):
    blocks = decoder_blocks(tiny_model)

    def outputs(spec=None, deltas=None):
        seen = []
        handles = [
            b.register_forward_hook(lambda _m, _i, o: seen.append(o[0] if isinstance(o, tuple) else o)) for b in blocks
        ]
        try:
            if spec is None:
                _logits(tiny_model, ids)
            else:
                with steer(tiny_model, sae, LAYER, spec, on_edit=lambda _p, d: deltas.append(d)):
                    _logits(tiny_model, ids)
        finally:
            for h in handles:
                h.remove()
        return seen

    deltas = []
    clean = outputs()
    steered = outputs(SteeringSpec((FeatureSteer(7, "add", 3.0),)), deltas)
    for layer in range(LAYER):
        assert torch.equal(clean[layer], steered[layer])
    # The hook list sees the block's own output before the steering hook edits it.
    assert torch.equal(clean[LAYER], steered[LAYER])
    torch.testing.assert_close(deltas[0][0], 3.0 * sae.W_dec[7].expand(len(ids), -1).detach())
    assert not torch.allclose(clean[LAYER + 1], steered[LAYER + 1])


def test_hooks_are_removed_even_when_generation_raises(tiny_model, sae, ids):
    block = decoder_blocks(tiny_model)[LAYER]
    before = (len(block._forward_hooks), len(block._forward_pre_hooks))
    with pytest.raises(RuntimeError, match="boom"):
        with steer(tiny_model, sae, LAYER, SteeringSpec((FeatureSteer(1, "add", 1.0),))):
            raise RuntimeError("boom")
    assert (len(block._forward_hooks), len(block._forward_pre_hooks)) == before


def test_bad_specs_are_clear_errors(tiny_model, sae):
    with pytest.raises(ValueError, match=r"feature 48 out of range: this SAE has 48 features \(0-47\)"):
        with steer(tiny_model, sae, LAYER, SteeringSpec((FeatureSteer(48, "add", 1.0),))):
            pass
    with pytest.raises(ValueError, match="unknown steering mode 'pin'"):
        FeatureSteer(1, "pin", 1.0)


def planted(tokenizer):
    """A model whose blocks are identities (residual = embedding) with a feature planted on one token."""
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(len(tokenizer), seed=3)
    with torch.no_grad():
        for block in decoder_blocks(model):
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    return model


def test_clamping_a_planted_feature_makes_the_model_produce_it(tokenizer):
    model = planted(tokenizer)
    prompt = [tokenizer.bos_token_id] + tokenizer("the dog", add_special_tokens=False).input_ids
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.0)
    default = sample(model, prompt, cfg, eos_id=None)
    target = next(t for t in range(4, len(tokenizer)) if t not in default)
    direction = model.model.embed_tokens.weight[target].detach()
    sae = Sae(SaeConfig(d_in=32, d_sae=8, architecture="relu")).initialize(torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.W_dec[0] = direction / direction.norm()
        sae.W_enc_FD[0] = direction / direction.norm()
        sae.b_enc.fill_(-1e3)  # every other feature off
        sae.b_enc[0] = 0.0
    spec = SteeringSpec((FeatureSteer(0, "clamp", 40.0 * float(direction.norm())),))
    result = compare(model, sae.eval(), LAYER, spec, prompt, cfg, eos_id=None)
    assert result.steered.token_ids.count(target) >= 4
    assert result.steered.mean_activation(0) > 2 * result.default.mean_activation(0)
    assert result.default.kl > 0 and all(lp <= 0 for lp in result.steered.logprob_other)


def _clean_hidden(model, ids):
    """The unedited residual after block LAYER, from output_hidden_states (independent of the hook code)."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[LAYER + 1][0]


def _captured_delta(model, sae, ids, spec):
    seen = []
    with steer(model, sae, LAYER, spec, on_edit=lambda positions, delta: seen.append(delta[0].clone())):
        _logits(model, ids)
    return seen[0]


def test_clamp_scale_and_several_features_edit_exactly_by_hand(tiny_model, sae, ids):
    h = _clean_hidden(tiny_model, ids)
    f = sae.encode(h).detach()
    a, b = 3, 7
    spec = SteeringSpec((FeatureSteer(a, "clamp", 2.5), FeatureSteer(b, "scale", 3.0)))
    expected = (2.5 - f[:, a]).unsqueeze(1) * sae.W_dec[a] + ((3.0 - 1.0) * f[:, b]).unsqueeze(1) * sae.W_dec[b]
    torch.testing.assert_close(_captured_delta(tiny_model, sae, ids, spec), expected.detach(), rtol=1e-4, atol=1e-5)
    added = _captured_delta(tiny_model, sae, ids, SteeringSpec((FeatureSteer(a, "add", -1.5),)))
    torch.testing.assert_close(added, (-1.5 * sae.W_dec[a]).expand_as(h).detach(), rtol=1e-5, atol=1e-6)


def test_prompt_positions_only(tiny_model, sae, ids):
    spec = SteeringSpec((FeatureSteer(3, "add", 2.0, positions="prompt"),), prompt_len=3)
    delta = _captured_delta(tiny_model, sae, ids, spec)
    assert delta[:3].abs().sum() > 0 and delta[3:].abs().sum() == 0


def _hand_logprobs(model, ids, added_D):
    """log p(next token) [T, V] of the planted (identity-block) model with ``added_D`` added to its residual.

    The oracle for scoring: no hooks, no steering code; the blocks add nothing, so the
    final residual is the embedding plus the edit.
    """
    with torch.no_grad():
        hidden_TD = model.model.embed_tokens(torch.tensor(ids)).float() + added_D
        return torch.log_softmax(model.lm_head(model.model.norm(hidden_TD)).float(), dim=-1)


def test_logprob_self_and_other_match_a_hand_forward_under_each_condition(tokenizer):
    model = planted(tokenizer)
    torch.manual_seed(0)
    sae = Sae(SaeConfig(d_in=32, d_sae=8, architecture="relu")).initialize(torch.Generator().manual_seed(2)).eval()
    direction = model.model.embed_tokens.weight[tokenizer.convert_tokens_to_ids("z")].detach()
    with torch.no_grad():
        sae.W_dec[0] = direction / direction.norm()  # adding it pushes the model towards "z"
    alpha = 3.0 * float(direction.norm())
    spec = SteeringSpec((FeatureSteer(0, "add", alpha),))
    prompt = [tokenizer.bos_token_id] + tokenizer("the dog", add_special_tokens=False).input_ids
    result = compare(model, sae, LAYER, spec, prompt, SamplingConfig(max_new_tokens=6, temperature=0.0), eos_id=None)
    added = {"default": torch.zeros(32), "steered": alpha * sae.W_dec[0].detach().float()}
    for name, report in (("default", result.default), ("steered", result.steered)):
        ids = prompt + report.token_ids
        span, targets = slice(len(prompt) - 1, len(ids) - 1), torch.tensor(report.token_ids)
        under = {c: _hand_logprobs(model, ids, a)[span].gather(1, targets[:, None])[:, 0] for c, a in added.items()}
        other = "default" if name == "steered" else "steered"
        torch.testing.assert_close(torch.tensor(report.logprob_self), under[name], rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.tensor(report.logprob_other), under[other], rtol=0, atol=1e-4)
    assert result.steered.token_ids != result.default.token_ids  # the edit is strong enough to matter
    steered = result.steered
    assert sum(steered.logprob_self) / len(steered.logprob_self) > sum(steered.logprob_other) / len(
        steered.logprob_other
    )


def test_mean_relative_values_through_the_cli(indexed_copy, capsys):
    """`--value 2xmean` and `--sweep 0,1xmean,2xmean` resolve against the index's mean activation."""
    import json

    from jobs.cli import main
    from storage.index_queries import open_sae_index

    with open_sae_index(indexed_copy / "saes" / "default") as index:
        _max, mean = index.typical_activations([1])[1]
    base = ["steer", "--run", str(indexed_copy), "--feature", "1", "--prompt", "The cat", "--max-new-tokens", "3",
            "--temperature", "0", "--device", "cpu", "--json"]  # fmt: skip
    assert main([*base, "--value", "2xmean"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert single["steers"][0]["value"] == pytest.approx(2 * mean) and mean > 0
    assert main([*base, "--sweep", "0,1xmean,2xmean"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["value"] for r in rows] == ["0", "1xmean", "2xmean"]
    assert [r["steers"][0]["value"] for r in rows] == pytest.approx([0.0, mean, 2 * mean])


def test_a_sweep_equals_one_compare_per_strength_with_one_default(tiny_model, sae, ids):
    cfg = SamplingConfig(max_new_tokens=5, temperature=0.7, seed=3)
    specs = [SteeringSpec((FeatureSteer(1, "add", value),)) for value in (0.0, 2.0, 6.0)]
    swept = sweep(tiny_model, sae, LAYER, specs, ids, cfg, eos_id=None)
    alone = [compare(tiny_model, sae, LAYER, spec, ids, cfg, eos_id=None) for spec in specs]
    assert [r.steered.token_ids for r in swept] == [r.steered.token_ids for r in alone]
    assert all(r.default.token_ids == alone[0].default.token_ids for r in swept)
    assert [r.default.kl for r in swept] == pytest.approx([r.default.kl for r in alone])
    assert swept[0].steered.token_ids == swept[0].default.token_ids  # adding zero steers nothing
