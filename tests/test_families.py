"""Every supported model family, tiny and random, built in code, in float64: hook points, steering, tracing.

Per family (2 layers, d_model 32, vocabulary 100; norm weights and biases random so a dropped or
swapped norm weight changes the numbers; soft-caps and sliding windows small enough to bite):
  * hook points against the block run by hand, with module names written here, not read from
    ``pipeline.lm.families``; resid-post against ``output_hidden_states``;
  * steering by ``add`` moves the point by exactly v * W_dec[i];
  * completeness: the replacement model's logits equal the model's own;
  * adjacency rows equal gradients taken through the Hugging Face model itself, hooked so that
    every norm's scale, every attention pattern and the final soft-cap are frozen and every MLP
    is replaced by its transcoder (a generic version of ``test_tracing_linearization``): the
    value paths (Conv1D, fused q/k/v, GQA) are HF's own code there, not ``replacement.py``'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from pipeline.features.decoder_geometry import final_norm_weight
from pipeline.lm.families import family_of
from pipeline.lm.hook_points import KINDS, HookPoint, capture, replace_mlp_out
from pipeline.lm.hooks import decoder_blocks
from pipeline.sae.model import Sae, SaeConfig
from pipeline.steering.edit import FeatureSteer, SteeringSpec, steer
from pipeline.tracing.replacement import (
    attention_pattern,
    build_replacement,
    record_prompt,
    recording_attention,
    replacement_forward,
    replacement_logits,
)
from pipeline.tracing.trace import trace
from tests.test_tracing import D, random_transcoder
from tests.test_tracing_linearization import assert_rows_are_gradients, mlp_writes

V, N_LAYERS, T = 100, 2, 10


@dataclass(frozen=True)
class Layout:
    """Where the test expects things, written independently of the family table."""

    blocks: str
    final_norm: str
    mlp_norm: str
    mlp_post_norm: str | None
    norm_kind: str
    parallel: bool = False


def _config(name: str):
    import transformers as tf

    common = dict(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=2 * D,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    gqa = dict(common, num_key_value_heads=2)
    if name == "llama":
        return tf.LlamaConfig(**gqa)
    if name == "mistral":
        return tf.MistralConfig(**gqa, sliding_window=4)
    if name == "qwen2":
        return tf.Qwen2Config(**gqa, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    if name == "qwen3":
        return tf.Qwen3Config(**gqa, head_dim=8, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    if name == "gemma2":
        return tf.Gemma2Config(
            **gqa,
            head_dim=8,
            sliding_window=4,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            query_pre_attn_scalar=8,
        )
    if name == "gemma3":
        return tf.Gemma3TextConfig(
            **gqa,
            head_dim=8,
            sliding_window=4,
            query_pre_attn_scalar=8,
            layer_types=["sliding_attention", "full_attention"],
        )
    if name == "gpt2":
        return tf.GPT2Config(
            vocab_size=V,
            n_embd=D,
            n_layer=N_LAYERS,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
    parallel = name == "gpt_neox"
    return tf.GPTNeoXConfig(**common, use_parallel_residual=parallel, attention_bias=True, rotary_pct=0.5)


_RMS = dict(
    blocks="model.layers",
    final_norm="model.norm",
    mlp_norm="post_attention_layernorm",
    mlp_post_norm=None,
    norm_kind="rms",
)
_GEMMA = dict(
    blocks="model.layers",
    final_norm="model.norm",
    mlp_norm="pre_feedforward_layernorm",
    mlp_post_norm="post_feedforward_layernorm",
    norm_kind="gemma",
)
_NEOX = dict(
    blocks="gpt_neox.layers",
    final_norm="gpt_neox.final_layer_norm",
    mlp_norm="post_attention_layernorm",
    mlp_post_norm=None,
    norm_kind="layer",
)
LAYOUTS = {
    "llama": Layout(**_RMS),
    "mistral": Layout(**_RMS),
    "qwen2": Layout(**_RMS),
    "qwen3": Layout(**_RMS),
    "gemma2": Layout(**_GEMMA),
    "gemma3": Layout(**_GEMMA),
    "gpt2": Layout("transformer.h", "transformer.ln_f", "ln_2", None, "layer"),
    "gpt_neox": Layout(**_NEOX, parallel=True),
    "gpt_neox_sequential": Layout(**_NEOX),
}
FAMILIES = list(LAYOUTS)


def randomize(model, seed: int):
    """Weights of order 1/sqrt(D), norm weights around 1 (Gemma's offset around 0), biases small and nonzero."""
    generator = torch.Generator().manual_seed(seed)
    gemma = "gemma" in model.config.model_type
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.rand(param.shape, generator=generator, dtype=param.dtype)
            if "norm" in name or "ln_" in name:
                if name.endswith("bias"):
                    param.copy_((noise - 0.5) * 0.2)
                else:
                    param.copy_(noise - 0.5 if gemma else noise + 0.5)
            elif param.ndim == 1:
                param.copy_((noise - 0.5) * 0.1)
            else:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.5 * D**-0.5)
    return model


def build(name: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(name)).double().eval()
    model.requires_grad_(False)
    return randomize(model, seed=FAMILIES.index(name))


def dotted(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, build(request.param)


@pytest.fixture(scope="module")
def ids():
    return torch.cat([torch.tensor([1]), torch.randint(4, V, (T - 1,), generator=torch.Generator().manual_seed(5))])


def test_the_table_finds_blocks_and_final_norm(family_model):
    name, model = family_model
    layout = LAYOUTS[name]
    assert decoder_blocks(model) is dotted(model, layout.blocks)
    family = family_of(model)
    assert dotted(model.base_model, family.final_norm) is dotted(model, layout.final_norm)
    assert family.parallel(model.config) == layout.parallel
    final = dotted(model, layout.final_norm)
    gain = 1 + final.weight if layout.norm_kind == "gemma" else final.weight
    torch.testing.assert_close(final_norm_weight(model), gain, rtol=0, atol=0)  # what logit effects multiply by


def test_hook_points_equal_the_block_run_by_hand(family_model, ids):
    name, model = family_model
    layout = LAYOUTS[name]
    acts = capture(model, ids[None], [HookPoint(layer, kind) for layer in (0, 1) for kind in KINDS])
    with torch.no_grad():
        hidden = model(input_ids=ids[None], output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts[HookPoint(0, "resid-post")], hidden[1], rtol=0, atol=1e-12)
    block, resid_0 = dotted(model, layout.blocks)[1], acts[HookPoint(0, "resid-post")]
    attn_out, mlp_in, mlp_out = (acts[HookPoint(1, kind)] for kind in ("attn-out", "mlp-in", "mlp-out"))
    with torch.no_grad():
        normed = getattr(block, layout.mlp_norm)(resid_0 if layout.parallel else resid_0 + attn_out)
        torch.testing.assert_close(mlp_in, normed, rtol=0, atol=1e-12)
        out = block.mlp(mlp_in)
        out = getattr(block, layout.mlp_post_norm)(out) if layout.mlp_post_norm else out
    torch.testing.assert_close(mlp_out, out, rtol=0, atol=1e-12)
    torch.testing.assert_close(acts[HookPoint(1, "resid-post")], resid_0 + attn_out + mlp_out, rtol=0, atol=1e-12)
    assert attn_out.abs().max() > 1e-3 and mlp_out.abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_steering_adds_exactly_the_feature_direction(family_model, ids, kind):
    _, model = family_model
    sae = Sae(SaeConfig(D, 8, "topk", k=2)).double()
    point = HookPoint(1, kind)
    before = capture(model, ids[None], [point])[point]
    with steer(model, sae, point, SteeringSpec((FeatureSteer(3, "add", 2.5),))):
        after = capture(model, ids[None], [point])[point]
    torch.testing.assert_close(after - before, (2.5 * sae.W_dec[3]).expand_as(before), rtol=0, atol=1e-12)


def test_mlp_replacement_sees_mlp_in_and_replaces_mlp_out(family_model, ids):
    """What transcoder splices and feature interventions hook: (mlp-in, mlp-out) in, the new mlp-out back."""
    _, model = family_model
    points = [HookPoint(1, kind) for kind in ("mlp-in", "mlp-out", "resid-post")]
    clean = capture(model, ids[None], points)
    seen = {}

    def shift(x_BTD, out_BTD):
        seen.update(x=x_BTD, out=out_BTD)
        return out_BTD + 1.0

    with replace_mlp_out(model, 1, shift):
        moved = capture(model, ids[None], points)
    torch.testing.assert_close(seen["x"], clean[points[0]], rtol=0, atol=0)
    torch.testing.assert_close(seen["out"], clean[points[1]], rtol=0, atol=0)
    torch.testing.assert_close(moved[points[2]], clean[points[2]] + 1.0, rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def traced(family_model, ids):
    name, model = family_model
    generator = torch.Generator().manual_seed(FAMILIES.index(name))
    transcoders = [random_transcoder(generator) for _ in range(N_LAYERS)]
    rep = build_replacement(record_prompt(model, ids), transcoders)
    graph = trace(model, ids, transcoders, batch_size=64, special_ids=(1,))
    return model, transcoders, rep, graph


def test_replacement_logits_equal_the_models(traced, ids):
    model, _, rep, graph = traced
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    replaced = replacement_logits(model, rep)
    torch.testing.assert_close(replaced, rep.record.logits_TV, rtol=0, atol=1e-10)
    # Gemma 2 runs eager attention, whose softmax is float32 even in a float64 model: the recording is float64
    torch.testing.assert_close(replaced, logits, rtol=0, atol=1e-5)
    assert graph.logit_error < 1e-10
    no_error = [rep.feature_writes(layer) for layer in range(N_LAYERS)]
    with torch.no_grad():
        final = replacement_forward(model, rep, rep.record.embed_TD[None], no_error).final_BTD
    assert (model.get_output_embeddings()(final)[0] - logits).abs().max() > 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trace_on_cuda_equals_the_cpu(traced, ids):
    import copy

    model, transcoders, _, graph = traced
    cuda_tcs = [copy.deepcopy(tc).cuda() for tc in transcoders]
    gpu = trace(copy.deepcopy(model).cuda(), ids.cuda(), cuda_tcs, batch_size=64, special_ids=(1,))
    torch.testing.assert_close(gpu.adjacency, graph.adjacency, rtol=1e-9, atol=1e-12)
    assert gpu.logit_error < 1e-10


def test_the_recomputed_pattern_is_the_recorded_one(family_model, ids):
    """``attention_pattern`` (used to look inside attention) on the rotary families with separate q/k."""
    name, model = family_model
    if LAYOUTS[name].norm_kind == "layer":
        pytest.skip("GPT-2 and GPT-NeoX attention have fused projections")
    record = record_prompt(model, ids)
    seen = {}
    attn = decoder_blocks(model)[0].self_attn
    handle = attn.register_forward_pre_hook(
        lambda _m, a, kw: seen.update(h=kw["hidden_states"][0], cs=kw["position_embeddings"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(input_ids=ids[None])
    finally:
        handle.remove()
    with torch.no_grad():
        pattern = attention_pattern(attn, seen["h"], seen["cs"])
    torch.testing.assert_close(pattern, record.layers[0].pattern_HTT, rtol=0, atol=1e-12)


# ---- the oracle: the HF model, hooked ------------------------------------------------------------------


def _norms(model, layout: Layout) -> list:
    names = {"rms": ("input_layernorm", "post_attention_layernorm"), "layer": ("ln_1", "ln_2")}
    if layout.norm_kind == "gemma":
        names = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm")
    elif layout.blocks == "gpt_neox.layers":
        names = ("input_layernorm", "post_attention_layernorm")
    else:
        names = names[layout.norm_kind]
    blocks = dotted(model, layout.blocks)
    return [getattr(block, n) for block in blocks for n in names] + [dotted(model, layout.final_norm)]


def _linear_norm(kind: str, module, x_rec):
    """The norm with its division frozen at the recorded input (LayerNorm keeps its centering live)."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if kind == "layer":
        s = torch.rsqrt(x_rec.var(-1, keepdim=True, unbiased=False) + eps)
        return lambda x: (x - x.mean(-1, keepdim=True)) * s * module.weight + module.bias
    s = torch.rsqrt(x_rec.pow(2).mean(-1, keepdim=True) + eps)
    gain = 1 + module.weight if kind == "gemma" else module.weight
    return lambda x: x * s * gain


def _clean(model, ids, layout: Layout, norms) -> dict:
    seen, handles = {}, []
    for i, norm in enumerate(norms):
        handles.append(norm.register_forward_hook(lambda _m, inp, _o, i=i: seen.__setitem__(("norm", i), inp[0])))
    for layer, block in enumerate(dotted(model, layout.blocks)):
        out_module = getattr(block, layout.mlp_post_norm) if layout.mlp_post_norm else block.mlp
        handles.append(block.mlp.register_forward_hook(lambda _m, i, _o, L=layer: seen.__setitem__(("in", L), i[0])))
        handles.append(out_module.register_forward_hook(lambda _m, _i, o, L=layer: seen.__setitem__(("out", L), o)))
    handles.append(model.get_output_embeddings().register_forward_hook(lambda _m, _i, o: seen.__setitem__("z", o)))
    try:  # float64 attention: Gemma 2's own (eager) softmax is float32 even in a float64 model
        with torch.no_grad(), recording_attention(model):
            seen["logits"] = model(input_ids=ids[None]).logits
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _frozen_attention(patterns):
    def attend(module, query, key, value, attention_mask, **_kwargs):
        pattern = patterns[module.layer_idx]
        value = value.repeat_interleave(pattern.shape[0] // value.shape[1], 1)
        return (pattern @ value).transpose(1, 2).contiguous(), pattern

    return attend


def _writes(graph, tc, layer, seen, alpha_S):
    return mlp_writes(graph, tc, layer, seen, alpha_S, keys=("in", "out"))


def _hooked_forward(model, layout, transcoders, ids, graph, rep, seen, norms, alpha_S):
    """Logits and MLP inputs of the HF model with everything nonlinear frozen and source s scaled by alpha_S[s]."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("test_frozen", _frozen_attention([layer.pattern_HTT for layer in rep.record.layers]))
    AttentionMaskInterface.register("test_frozen", sdpa_mask)
    mlp_ins, handles = {}, []
    for i, norm in enumerate(norms):
        linear = _linear_norm(layout.norm_kind, norm, seen[("norm", i)])
        handles.append(norm.register_forward_hook(lambda _m, inp, _o, f=linear: f(inp[0])))
    for layer, (block, tc) in enumerate(zip(dotted(model, layout.blocks), transcoders, strict=True)):
        out_module = getattr(block, layout.mlp_post_norm) if layout.mlp_post_norm else block.mlp

        def replace(_m, _i, _o, layer=layer, tc=tc):
            x = mlp_ins[layer]
            return x @ tc.W_skip.detach().T + tc.b_dec.detach() + _writes(graph, tc, layer, seen, alpha_S)[None]

        handles.append(block.mlp.register_forward_pre_hook(lambda _m, i, L=layer: mlp_ins.__setitem__(L, i[0])))
        handles.append(out_module.register_forward_hook(replace))
    first = graph.n_features + graph.n_errors
    scale_T1 = alpha_S[first : first + graph.n_pos, None]
    block_0 = dotted(model, layout.blocks)[0]

    def scale_embeddings(_m, args, kwargs):
        if args:
            return (args[0] * scale_T1, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * scale_T1}

    handles.append(block_0.register_forward_pre_hook(scale_embeddings, with_kwargs=True))
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        factor = seen["logits"] / seen["z"]
        handles.append(model.get_output_embeddings().register_forward_hook(lambda _m, _i, o: o * factor))
        model.config.final_logit_softcapping = None
    previous = model.config._attn_implementation
    model.set_attn_implementation("test_frozen")
    try:
        logits = model(input_ids=ids[None]).logits[0]
    finally:
        model.set_attn_implementation(previous)
        model.config.final_logit_softcapping = softcap
        for handle in handles:
            handle.remove()
    return logits, {layer: x[0] for layer, x in mlp_ins.items()}


def test_adjacency_rows_are_gradients_through_the_hooked_model(family_model, traced, ids):
    name, _ = family_model
    model, transcoders, rep, graph = traced
    layout = LAYOUTS[name]
    norms = _norms(model, layout)
    seen = _clean(model, ids, layout, norms)
    n_sources = graph.adjacency.shape[0] - graph.n_logits
    alpha_S = torch.ones(n_sources, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        logits, mlp_ins = _hooked_forward(model, layout, transcoders, ids, graph, rep, seen, norms, alpha_S)
        torch.testing.assert_close(logits.detach(), rep.record.logits_TV, rtol=0, atol=1e-5)  # HF RMSNorm: float32
        late = assert_rows_are_gradients(graph, transcoders, logits, mlp_ins, alpha_S, n_late=3)
    assert late.numel() > 0


def test_an_unknown_family_gets_one_clear_error(ids):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=V,
        hidden_size=D,
        ffn_dim=2 * D,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        word_embed_proj_dim=D,
        max_position_embeddings=64,
    )
    model = OPTForCausalLM(config).eval()
    with pytest.raises(ValueError, match="model type 'opt'.*supported are llama"):
        record_prompt(model, ids)
    with pytest.raises(ValueError, match="model type 'opt'"):
        capture(model, ids[None], [HookPoint(0, "mlp-out")])
    assert capture(model, ids[None], [HookPoint(0, "resid-post")])[HookPoint(0, "resid-post")].shape == (1, T, D)


def test_recording_leaves_the_attention_implementation_as_it_was(family_model, ids):
    _, model = family_model
    before = model.config._attn_implementation
    with recording_attention(model):
        assert model.config._attn_implementation != before
    assert model.config._attn_implementation == before


EIGHT = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gpt2", "gpt_neox"]
"""One tiny model per family for the command-line run (GPT-NeoX with its parallel residual)."""


@pytest.mark.parametrize("name", EIGHT)
def test_cache_train_trace_from_the_command_line(name, tmp_path, tokenizer, capsys):
    """A tiny model saved to disk: cache mlp-in and mlp-out at every layer, train transcoders, trace a prompt
    (QK tracing of two targets included)."""
    from jobs.cli import main
    from storage.graph_groups import read_graph_json
    from tests.conftest import synthetic_corpus

    model_dir, run, corpus = tmp_path / name, tmp_path / "run", tmp_path / "corpus.txt"
    model = build(name)
    model.resize_token_embeddings(len(tokenizer))
    model.float().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus.write_text(synthetic_corpus(1500), encoding="utf-8")
    steps = [
        ["cache", "--run", run, "--model", model_dir, "--dataset", corpus, "--tokens", "4096", "--ctx-len", "32",
         "--batch-size", "16", "--dtype", "float32", "--model-dtype", "float32", "--device", "cpu",
         "--hooks", "mlp-in,mlp-out", "--layers", "all"],
        ["train", "--run", run, "--transcoder", "--layers", "all", "--name", "tc", "--d-sae", "64", "--k", "4",
         "--batch-size", "256", "--tokens", "2048", "--lm-eval-contexts", "4", "--device", "cpu"],
        ["trace", "--run", run, "--prompt", "The cat sat on the mat", "--name", "cat"],
    ]  # fmt: skip
    for step in steps:
        assert main([str(arg) for arg in step]) == 0, capsys.readouterr()
    doc = read_graph_json(run, "cat")
    assert doc["saescope"]["layers"] == list(range(N_LAYERS))
    assert doc["saescope"]["logit_error"] < 1e-3
    assert {node["feature_type"] for node in doc["nodes"]} >= {"embedding", "logit"}
    assert "qk_skipped" not in doc["saescope"] and doc["saescope"]["qk_tracing"]  # QK tracing ran for the family
    for entry in doc["saescope"]["qk_tracing"]:  # float32 model: its own q . k to float32 precision
        assert entry["score"] == pytest.approx(entry["model_score"], rel=1e-4, abs=1e-4)


def test_cache_refuses_an_unknown_family_before_writing(tmp_path, tokenizer, capsys):
    from transformers import OPTConfig, OPTForCausalLM

    from jobs.cli import main
    from tests.conftest import synthetic_corpus

    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=D,
        ffn_dim=2 * D,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        word_embed_proj_dim=D,
        max_position_embeddings=64,
    )
    model_dir, run, corpus = tmp_path / "opt", tmp_path / "run", tmp_path / "corpus.txt"
    OPTForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus.write_text(synthetic_corpus(500), encoding="utf-8")
    args = [
        "cache",
        "--run",
        run,
        "--model",
        model_dir,
        "--dataset",
        corpus,
        "--tokens",
        "1024",
        "--ctx-len",
        "32",
        "--dtype",
        "float32",
        "--model-dtype",
        "float32",
        "--device",
        "cpu",
        "--hooks",
        "mlp-in,mlp-out",
    ]
    assert main([str(arg) for arg in args]) == 2
    err = capsys.readouterr().err
    assert "model type 'opt'" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not run.exists()


# ---- QK tracing: the pre-softmax score of every family, decomposed --------------------------------------

QK_SPOTS = [(0, 0, 5, 3, 4), (1, 3, 9, 9, 7), (1, 1, 6, 4, 5), (1, 2, 3, 0, 2)]
"""(layer, head, query, key, other key): both layers, both key heads, BOS (a constant position) as key, query ==
key; every key within the sliding window of 4."""


def test_qk_pairs_sum_to_the_score_the_model_computes(traced):
    """Pair contributions (plus the stated bias and constant terms) sum to the pre-softmax score (Gemma 2: before
    its soft-cap) of the model's own queries and keys; score differences between keys are the recorded pattern's
    log-ratios (through the soft-cap where there is one)."""
    from pipeline.tracing.qk import HeadSpot, decompose_score, decompose_through_attention

    model, _, rep, _ = traced
    cap = getattr(model.config, "attn_logit_softcapping", None)

    def capped(score):
        return cap * math.tanh(score / cap) if cap else score

    spread = 0.0
    for layer, head, q_pos, k_pos, other in QK_SPOTS:
        scores = {}
        for key in (k_pos, other):
            spot = HeadSpot(layer, head, q_pos, key, 0.0, 0.0)
            plain, through = decompose_score(model, rep, spot), decompose_through_attention(model, rep, spot)
            for dec in (plain, through):
                assert dec.score == pytest.approx(dec.model_score, rel=1e-10, abs=1e-10)
                assert float(dec.pairs_QK.sum()) == pytest.approx(dec.model_score, rel=1e-10, abs=1e-10)
                assert float(dec.q_marginal.sum()) == pytest.approx(dec.model_score, rel=1e-10, abs=1e-10)
            assert {"bias", "constant"} <= {c.kind for c in through.q_contributors}
            scores[key] = plain.model_score
        log_p = rep.record.layers[layer].pattern_HTT[head, q_pos].log()
        expected = float(log_p[k_pos] - log_p[other])
        assert capped(scores[k_pos]) - capped(scores[other]) == pytest.approx(expected, rel=1e-8, abs=1e-10)
        spread = max(spread, abs(expected))
    assert spread > 1e-3  # the patterns are not flat: the log-ratio check has teeth


def _read_without(model, rep, readout, layer=None, head=None, key=None):
    """The target in the replacement model, with the pattern weight of (``head``, target position, ``key``) of
    attention ``layer`` set to zero (every head and key when ``head`` is None)."""
    import dataclasses

    from pipeline.tracing.replacement import replacement_forward

    target, pos = int(readout.layer_R[0]), int(readout.pos_R[0])
    if layer is not None:
        pattern = rep.record.layers[layer].pattern_HTT.clone()
        pattern[slice(None) if head is None else head, pos, slice(None) if key is None else key] = 0
        layers = list(rep.record.layers)
        layers[layer] = dataclasses.replace(layers[layer], pattern_HTT=pattern)
        rep = dataclasses.replace(rep, record=dataclasses.replace(rep.record, layers=tuple(layers)))
    writes = [rep.feature_writes(lower) + rep.errors[lower] for lower in range(N_LAYERS)]
    stop = None if target == N_LAYERS else target
    with torch.no_grad():
        out = replacement_forward(model, rep, rep.record.embed_TD[None], writes, stop)
    read = out.final_BTD if stop is None else out.mlp_in[target]
    return float(read[0, pos] @ readout.vector_RD[0])


@pytest.mark.parametrize("which", ["feature", "logit"])
def test_value_effects_equal_removing_one_heads_pattern_weight(traced, which):
    """What ranks the heads QK tracing decomposes: the target's change through one head from one key."""
    from pipeline.tracing.attribution import feature_readouts, logit_readouts
    from pipeline.tracing.qk import value_effects

    model, _, rep, _ = traced
    if which == "feature":
        latent = int(rep.acts[1][7].abs().argmax())
        readout = feature_readouts(rep, torch.tensor([[1, 7, latent]]))[0]
    else:
        readout = logit_readouts(model, rep, torch.tensor([int(rep.record.logits_TV[-1].argmax())]))[0]
    effects = value_effects(model, rep, readout)
    pos, base = int(readout.pos_R[0]), _read_without(model, rep, readout)
    assert effects.shape[0] == (2 if which == "feature" else N_LAYERS)
    for layer in range(effects.shape[0]):
        for head, key in ((0, 0), (3, pos), (1, pos - 2)):
            removed = base - _read_without(model, rep, readout, layer, head, key)
            assert float(effects[layer, head, key]) == pytest.approx(removed, rel=1e-7, abs=1e-12)
        every = base - _read_without(model, rep, readout, layer)
        assert float(effects[layer].sum()) == pytest.approx(every, rel=1e-7, abs=1e-12)
    assert effects.abs().max() > 1e-6
