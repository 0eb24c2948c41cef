"""QK tracing on the tiny Llama (rotary, grouped-query attention, random norm weights, skip transcoders), float64.

Oracles: the attention weights HF's eager attention returns (softmax of the scores), the query and key
computed from the attention module's own q_proj, k_proj and the rotary (cos, sin) the model hands it,
the residual streams of ``output_hidden_states``, scores recomputed with one contributor removed, and
the replacement model's target with one head's write from one key taken out of o_proj's output.
"""

import copy

import pytest
import torch

from pipeline.lm.hook_points import attention_module
from pipeline.lm.hooks import decoder_blocks
from pipeline.tracing.attribution import attribute, constant_mask, feature_readouts, logit_readouts, target_logits
from pipeline.tracing.graph_json import graph_document
from pipeline.tracing.pruning import prune
from pipeline.tracing.qk import (
    HeadSpot,
    attach_qk,
    check_qk,
    decompose_score,
    decompose_through_attention,
    qk_into_document,
    qk_target_nodes,
    residual_contributors,
    trace_qk,
    value_effects,
)
from pipeline.tracing.replacement import build_replacement, record_prompt, replacement_forward
from tests.conftest import make_tiny_llama
from tests.test_tracing import random_transcoder, with_random_norm_weights

N_LAYERS, D = 4, 32
SPOTS = [(0, 0, 9, 3), (1, 3, 14, 0), (2, 1, 7, 7), (3, 2, 14, 11), (3, 3, 12, 0)]
"""(layer, head, query, key): every layer, both key heads, the BOS key (a constant position), query == key."""


@pytest.fixture(scope="module")
def model(tokenizer):
    """Queries and keys scaled up so that patterns are far from uniform (a fresh Llama's are nearly flat)."""
    model = with_random_norm_weights(make_tiny_llama(len(tokenizer), n_layers=N_LAYERS, d_model=D).double(), seed=1)
    with torch.no_grad():
        for block in decoder_blocks(model):
            attention_module(block).q_proj.weight.mul_(12.0)
            attention_module(block).k_proj.weight.mul_(12.0)
    return model


@pytest.fixture(scope="module")
def ids(tokenizer):
    return torch.tensor(tokenizer("The cat sat on.").input_ids)


@pytest.fixture(scope="module")
def rep(model, ids):
    generator = torch.Generator().manual_seed(0)
    return build_replacement(record_prompt(model, ids), [random_transcoder(generator) for _ in range(N_LAYERS)])


@pytest.fixture(scope="module")
def constant_T(ids):
    return constant_mask(ids)


@pytest.fixture(scope="module")
def captured(model, ids):
    """Per layer, the attention module's input and the (cos, sin) the model passed it."""
    seen, handles = {}, []
    for layer, block in enumerate(decoder_blocks(model)):

        def grab(_m, args, kwargs, layer=layer):
            seen[layer] = (kwargs["hidden_states"][0], kwargs["position_embeddings"])

        handles.append(attention_module(block).register_forward_pre_hook(grab, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=ids[None])
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def oracle_score(model, captured, layer, head, q_pos, k_pos, h_q=None, h_k=None):
    """scaling * q . k from the module's projections and the model's rotary on (given) attention inputs."""
    attn = attention_module(decoder_blocks(model)[layer])
    h_TD, (cos, sin) = captured[layer]
    h_q = h_TD[q_pos] if h_q is None else h_q
    h_k = h_TD[k_pos] if h_k is None else h_k
    d, kv = attn.head_dim, head // (model.config.num_attention_heads // model.config.num_key_value_heads)
    with torch.no_grad():
        q = _rotate(attn.q_proj(h_q)[head * d : (head + 1) * d], cos[0, q_pos], sin[0, q_pos])
        k = _rotate(attn.k_proj(h_k)[kv * d : (kv + 1) * d], cos[0, k_pos], sin[0, k_pos])
    return float(q @ k) * attn.scaling


def test_pairs_sum_to_the_score_the_model_computes(model, ids, rep, constant_T, captured):
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        attentions = eager(input_ids=ids[None], output_attentions=True).attentions
    for layer, head, q_pos, k_pos in SPOTS:
        dec = decompose_score(model, rep, HeadSpot(layer, head, q_pos, k_pos, 0.0, 0.0), constant_T)
        expected = oracle_score(model, captured, layer, head, q_pos, k_pos)
        assert dec.score == pytest.approx(expected, rel=1e-10, abs=1e-10)
        assert dec.model_score == pytest.approx(expected, rel=1e-10, abs=1e-10)
        assert dec.q_marginal.sum() == pytest.approx(expected, rel=1e-10, abs=1e-10)
        # the eager softmax: score differences between keys are log-pattern differences (HF's eager
        # attention takes its softmax in float32, hence the tolerance)
        other = 1 if k_pos != 1 else 2
        other_score = decompose_score(model, rep, HeadSpot(layer, head, q_pos, other, 0.0, 0.0), constant_T).score
        log_p = attentions[layer][0, head, q_pos].log()
        assert dec.score - other_score == pytest.approx(float(log_p[k_pos] - log_p[other]), abs=1e-5)
        assert abs(dec.score - other_score) > 1e-3  # the patterns are not flat: the check has teeth


@pytest.mark.parametrize("batch_size", [64, 24])
def test_through_attention_pairs_sum_to_the_score(model, rep, constant_T, captured, batch_size):
    for layer, head, q_pos, k_pos in SPOTS:
        spot = HeadSpot(layer, head, q_pos, k_pos, 0.0, 0.0)
        dec = decompose_through_attention(model, rep, spot, constant_T, batch_size)
        expected = oracle_score(model, captured, layer, head, q_pos, k_pos)
        assert dec.score == pytest.approx(expected, rel=1e-10, abs=1e-10)
        assert float(dec.pairs_QK.sum()) == pytest.approx(expected, rel=1e-10, abs=1e-10)
        kinds = [c.kind for c in dec.q_contributors]
        assert set(kinds) <= {"feature", "error", "embedding", "constant", "bias"}
        assert kinds.count("bias") == kinds.count("constant") == 1
        assert all(c.pos <= k_pos for c in dec.k_contributors)
        if layer > 0:  # attribution reaches nodes at other positions through earlier attention
            assert any(c.kind == "feature" and c.pos < q_pos for c in dec.q_contributors)


def _attention_input(model, rep, layer, drop=None):
    """h [T, D] entering attention ``layer`` in the replacement model, with node ``drop`` (a Contributor) removed."""
    embed = rep.record.embed_TD.clone()
    writes = [rep.feature_writes(lower) + rep.errors[lower] for lower in range(N_LAYERS)]
    if drop is not None and drop.kind == "embedding":
        embed[drop.pos] = 0
    elif drop is not None and drop.kind == "error":
        writes[drop.layer][drop.pos] -= rep.errors[drop.layer][drop.pos]
    elif drop is not None:
        act = rep.acts[drop.layer][drop.pos, drop.index]
        writes[drop.layer][drop.pos] -= act * rep.transcoders[drop.layer].W_dec[drop.index]
    seen = {}
    v_proj = attention_module(decoder_blocks(model)[layer]).v_proj
    handle = v_proj.register_forward_pre_hook(lambda _m, inputs: seen.__setitem__("h", inputs[0][0]))
    try:
        with torch.no_grad():
            replacement_forward(model, rep, embed[None], [w[None] for w in writes], layer)
    finally:
        handle.remove()
    return seen["h"]


def test_through_attention_pairs_equal_removing_nodes(model, rep, constant_T, captured):
    spot = HeadSpot(3, 1, 14, 9, 0.0, 0.0)
    dec = decompose_through_attention(model, rep, spot, constant_T)
    h_full = _attention_input(model, rep, spot.layer)
    torch.testing.assert_close(h_full, captured[spot.layer][0], rtol=0, atol=1e-12)

    def score(h_q, h_k):
        return oracle_score(model, captured, spot.layer, spot.head, spot.query_pos, spot.key_pos, h_q, h_k)

    full = score(h_full[spot.query_pos], h_full[spot.key_pos])
    k_index = {c: j for j, c in enumerate(dec.k_contributors)}
    nodes = [c for c in dec.k_contributors if c.kind not in ("bias", "constant")]
    picked = [nodes[0], nodes[5], *[c for c in nodes if c.kind == "error"][:2]]
    features = [c for c in nodes if c.kind == "feature"]
    picked += [c for c in features if c.pos == 3][:2] + features[-2:]
    removed = {c: _attention_input(model, rep, spot.layer, c) for c in picked}
    for i, c_q in enumerate(dec.q_contributors):
        if c_q not in removed:
            continue
        h_q = removed[c_q][spot.query_pos]
        assert float(dec.q_marginal[i]) == pytest.approx(full - score(h_q, h_full[spot.key_pos]), rel=1e-8, abs=1e-12)
        for c_k in picked:
            h_k = removed[c_k][spot.key_pos]
            pair = full - score(h_q, h_full[spot.key_pos]) - score(h_full[spot.query_pos], h_k) + score(h_q, h_k)
            assert float(dec.pairs_QK[i, k_index[c_k]]) == pytest.approx(pair, rel=1e-7, abs=1e-12)
    assert abs(float(dec.q_marginal[[c in removed for c in dec.q_contributors]].abs().max())) > 1e-4


def test_contributors_sum_to_the_residual_stream(model, ids, rep, constant_T):
    with torch.no_grad():
        hidden = model(input_ids=ids[None], output_hidden_states=True).hidden_states
    for layer in range(N_LAYERS):
        for pos in (0, 5, 14):
            found, rows_ND = residual_contributors(rep, layer, pos, bool(constant_T[pos]))
            torch.testing.assert_close(rows_ND.sum(0), hidden[layer][0, pos], rtol=0, atol=1e-12)
            kinds = {c.kind for c in found}
            assert ("mlp" in kinds) == (bool(constant_T[pos]) and layer > 0)
            assert ("feature" in kinds) == (not constant_T[pos] and layer > 0)
            assert len({c.node_id for c in found}) == len(found)


def _brute_force(model, rep, captured, spot, q_drop, k_drop):
    """The score with the residual vectors q_drop / k_drop (None: the bias contributor, fix_p included)
    removed before the frozen norm, recomputed with the module's own projections."""
    layer, rec = spot.layer, rep.record.layers[spot.layer]
    w = decoder_blocks(model)[layer].input_layernorm.weight

    def normed(pos, drop):
        x = rec.resid_pre_TD[pos] - (0 if drop is None else drop[0])
        fix = 0 if drop is not None and drop[1] else rec.attn_norm.fix_TD[pos]
        return w * x * rec.attn_norm.scale_T1[pos] + fix

    h_q, h_k = normed(spot.query_pos, q_drop), normed(spot.key_pos, k_drop)
    return oracle_score(model, captured, layer, spot.head, spot.query_pos, spot.key_pos, h_q, h_k)


def test_pairs_and_marginals_equal_removing_contributors(model, rep, constant_T, captured):
    spot = HeadSpot(3, 2, 14, 11, 0.0, 0.0)
    dec = decompose_score(model, rep, spot, constant_T)
    _, q_rows = residual_contributors(rep, spot.layer, spot.query_pos, False)
    _, k_rows = residual_contributors(rep, spot.layer, spot.key_pos, False)
    full = _brute_force(model, rep, captured, spot, None, None)
    kinds_seen = set()
    for i in [0, 1, 2, 3, len(q_rows) - 2, len(q_rows) - 1]:
        for j in [0, 3, len(k_rows) - 3, len(k_rows) - 1]:
            q_drop = (q_rows[i], dec.q_contributors[i].kind == "bias")
            k_drop = (k_rows[j], dec.k_contributors[j].kind == "bias")
            without_q = _brute_force(model, rep, captured, spot, q_drop, None)
            without_k = _brute_force(model, rep, captured, spot, None, k_drop)
            without_both = _brute_force(model, rep, captured, spot, q_drop, k_drop)
            pair = full - without_q - without_k + without_both
            assert float(dec.pairs_QK[i, j]) == pytest.approx(pair, rel=1e-8, abs=1e-11)
            assert float(dec.q_marginal[i]) == pytest.approx(full - without_q, rel=1e-8, abs=1e-11)
            assert float(dec.k_marginal[j]) == pytest.approx(full - without_k, rel=1e-8, abs=1e-11)
            kinds_seen |= {dec.q_contributors[i].kind, dec.k_contributors[j].kind}
    assert {"embedding", "attention", "error", "skip", "feature", "bias"} <= kinds_seen


def _target(model, rep, readout, hook_layer=None, remove=None):
    """The target in the replacement model, optionally with ``remove`` [D] taken out of o_proj's output at the
    target's position in layer ``hook_layer``."""
    writes = [rep.feature_writes(layer) + rep.errors[layer] for layer in range(N_LAYERS)]
    layer, pos = int(readout.layer_R[0]), int(readout.pos_R[0])
    handle = None
    if remove is not None:
        o_proj = attention_module(decoder_blocks(model)[hook_layer]).o_proj

        def edit(_m, _i, out):
            out = out.clone()
            out[:, pos] -= remove
            return out

        handle = o_proj.register_forward_hook(edit)
    try:
        with torch.no_grad():
            stop = None if layer == N_LAYERS else layer
            out = replacement_forward(model, rep, rep.record.embed_TD[None], writes, stop)
    finally:
        if handle is not None:
            handle.remove()
    read = out.final_BTD if stop is None else out.mlp_in[layer]
    return float(read[0, pos] @ readout.vector_RD[0])


def _head_write(model, rep, layer, head, q_pos, k_pos):
    attn = attention_module(decoder_blocks(model)[layer])
    rec, d = rep.record.layers[layer], attn.head_dim
    norm = rec.attn_norm
    h = decoder_blocks(model)[layer].input_layernorm.weight * rec.resid_pre_TD * norm.scale_T1 + norm.fix_TD
    kv = head // (model.config.num_attention_heads // model.config.num_key_value_heads)
    with torch.no_grad():
        v = attn.v_proj(h[k_pos])[kv * d : (kv + 1) * d]
        return attn.o_proj.weight[:, head * d : (head + 1) * d] @ (rec.pattern_HTT[head, q_pos, k_pos] * v)


@pytest.mark.parametrize("which", ["feature", "logit"])
def test_value_effects_equal_removing_one_heads_write(model, rep, which):
    if which == "feature":
        acts = rep.acts[2][9]
        readout = feature_readouts(rep, torch.tensor([[2, 9, int(acts.argmax())]]))[0]
    else:
        readout = logit_readouts(model, rep, torch.tensor([int(rep.record.logits_TV[-1].argmax())]))[0]
    effects = value_effects(model, rep, readout)
    pos, base = int(readout.pos_R[0]), _target(model, rep, readout)
    assert effects.shape[0] == (3 if which == "feature" else N_LAYERS)
    assert not effects[:, :, pos + 1 :].any()
    for layer in range(effects.shape[0]):
        for head, key in ((0, 0), (3, pos), (1, pos - 2)):
            write = _head_write(model, rep, layer, head, pos, key)
            removed = base - _target(model, rep, readout, layer, write)
            assert float(effects[layer, head, key]) == pytest.approx(removed, rel=1e-7, abs=1e-13)
    assert effects.abs().max() > 1e-6


def test_document_form(model, ids, rep, tokenizer):
    tokens, probs = target_logits(rep.record.logits_TV[-1])
    graph = attribute(model, rep, tokens, probs, batch_size=64)
    pruned = prune(graph.adjacency, graph.target_weights(), graph.n_features, graph.n_errors, 0.8, 0.98)
    document = graph_document(graph, pruned, lambda t: tokenizer.decode([t]), "g", "tiny", "p", 0.8, 0.98)
    targets = qk_target_nodes(graph, pruned, 2)
    assert targets[1] == graph.adjacency.shape[0] - graph.n_logits
    assert targets[0] < graph.n_features and pruned.node_mask_N[targets[0]]
    every = qk_target_nodes(graph, pruned, graph.adjacency.shape[0])
    features = [i for i in every if i < graph.n_features]
    assert len(features) >= 3
    # a dense strongest feature goes after every other: the next strongest becomes the first target
    assert qk_target_nodes(graph, pruned, 3, dense=frozenset({targets[0]})) == [features[1], targets[1], features[2]]
    traced = trace_qk(model, rep, graph, targets, heads_per_target=2)
    attach_qk(document, traced, graph, rep, top=5)
    carrying = [node for node in document["nodes"] if "qk_tracing_results" in node]
    assert {node["feature_type"] for node in carrying} == {"cross layer transcoder", "logit"}
    ids_known = {node["node_id"] for node in document["nodes"]} | set(document["qk_only_nodes"])
    first = {entry["target"]: entry for entry in reversed(document["saescope"]["qk_tracing"])}
    for node in carrying:
        results = node["qk_tracing_results"]
        assert results == first[node["node_id"]]["qk_tracing_results"]
        n_pairs = len(results["top_q_marginal_contributors"]) * len(results["top_k_marginal_contributors"])
        assert len(results["pair_wise_contributors"]) == min(5, n_pairs)
        for q_id, k_id, value in results["pair_wise_contributors"]:
            assert q_id in ids_known and k_id in ids_known and isinstance(value, float)
        for key in ("top_q_marginal_contributors", "top_k_marginal_contributors"):
            assert all(row[0] in ids_known for row in results[key])
            values = [abs(row[1]) for row in results[key]]
            assert values == sorted(values, reverse=True)
    entries = document["saescope"]["qk_tracing"]
    assert len(entries) == 4
    for entry in entries:
        assert entry["score"] == pytest.approx(entry["model_score"], rel=1e-10, abs=1e-12)
        assert entry["key_pos"] <= entry["query_pos"]
    assert all(node["node_id"] not in {n["node_id"] for n in document["nodes"]} for node in
               document["qk_only_nodes"].values())  # fmt: skip


def test_a_model_outside_the_families_is_refused(tokenizer):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                       num_attention_heads=2, word_embed_proj_dim=16)  # fmt: skip
    opt = OPTForCausalLM(config).eval()
    with pytest.raises(ValueError, match="QK tracing supports the families.*got 'opt'"):
        check_qk(opt)
    document = {"nodes": [], "saescope": {}}  # a trace of another family: the graph is kept, QK says why not
    qk_into_document(document, opt, {}, None, None, n_targets=2)
    assert "got 'opt'" in document["saescope"]["qk_skipped"] and "qk_only_nodes" not in document


def test_a_cross_layer_transcoders_writes_are_summed_over_its_outputs(model, ids, captured):
    from pipeline.sae.cross_layer import CltConfig
    from tests.test_cross_layer import random_clt

    clt = random_clt(CltConfig(N_LAYERS, D, 12, "topk", k=3, skip=True), dec_scale=1e-2)
    clt_rep = build_replacement(record_prompt(model, ids), clt)
    with torch.no_grad():
        hidden = model(input_ids=ids[None], output_hidden_states=True).hidden_states
    _, rows_ND = residual_contributors(clt_rep, 3, 12, False)
    torch.testing.assert_close(rows_ND.sum(0), hidden[3][0, 12], rtol=0, atol=1e-12)
    for layer, head, q_pos, k_pos in SPOTS[2:]:
        expected = oracle_score(model, captured, layer, head, q_pos, k_pos)
        for decompose in (decompose_score, decompose_through_attention):
            dec = decompose(model, clt_rep, HeadSpot(layer, head, q_pos, k_pos, 0.0, 0.0))
            assert dec.score == pytest.approx(expected, rel=1e-10, abs=1e-10)
            # features of layer 0 reach layer 2's query through their writes into MLP outputs 0 and 1
            assert any(c.kind == "feature" and c.layer == 0 for c in dec.q_contributors)
