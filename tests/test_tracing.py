"""Attribution graphs on the tiny Llama with random skip transcoders at every layer, in float64.

Oracles: the model's own logits (completeness), ``Transcoder.pre_acts`` on the captured
``mlp-in`` (feature values), and autograd.functional.jacobian of a target with respect to a
scalar multiplier on every source's write in the frozen linear model (edges).
"""

import pytest
import torch

from pipeline.lm.hook_points import HookPoint, capture
from pipeline.sae.model import SaeConfig
from pipeline.sae.transcoder import Transcoder
from pipeline.tracing.attribution import active_features, attribute, feature_readouts, logit_readouts, target_logits
from pipeline.tracing.pruning import influence_from_rows, normalized
from pipeline.tracing.replacement import build_replacement, record_prompt, replacement_forward, replacement_logits
from pipeline.tracing.trace import trace
from tests.conftest import make_tiny_llama

N_LAYERS, D, F, K = 4, 32, 16, 4


def random_transcoder(generator: torch.Generator) -> Transcoder:
    """Pre-activations of order 1 on mlp-in (rms ~1); writes of the order of the tiny model's mlp-out (~1e-3)."""
    tc = Transcoder(SaeConfig(D, F, "topk", k=K)).double()
    with torch.no_grad():
        for param, scale in ((tc.W_enc_FD, D**-0.5), (tc.b_enc, 0.1), (tc.W_dec, 1e-3), (tc.b_dec, 1e-4)):
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64) * scale)
        tc.W_skip.copy_(torch.randn(D, D, generator=generator, dtype=torch.float64) * 1e-3 * D**-0.5)
    return tc


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_tiny_llama(len(tokenizer), n_layers=N_LAYERS, d_model=D).double()


@pytest.fixture(scope="module")
def transcoders():
    generator = torch.Generator().manual_seed(0)
    return {layer: random_transcoder(generator) for layer in range(N_LAYERS)}


@pytest.fixture(scope="module")
def ids(tokenizer):
    return torch.tensor(tokenizer("The cat sat on.").input_ids)


@pytest.fixture(scope="module")
def rep(model, ids, transcoders):
    return build_replacement(record_prompt(model, ids), transcoders)


@pytest.fixture(scope="module")
def graph(model, rep):
    tokens, probs = target_logits(rep.record.logits_TV[-1])
    return attribute(model, rep, tokens, probs, batch_size=16)


def target_rows(graph) -> torch.Tensor:
    n = graph.adjacency.shape[0]
    return torch.cat([torch.arange(graph.n_features), torch.arange(n - graph.n_logits, n)])


def test_replacement_logits_equal_the_models(model, ids, rep):
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(replacement_logits(model, rep), logits, rtol=0, atol=1e-12)
    # the error nodes carry what the transcoders miss: without them the logits move
    no_error = [rep.feature_writes(layer) for layer in range(N_LAYERS)]
    with torch.no_grad():
        final = replacement_forward(model, rep, rep.record.embed_TD[None], no_error).final_BTD
    assert (model.lm_head(final)[0] - logits).abs().max() > 1e-4
    # the norm rounding terms only absorb HF's float32 RMSNorm (~1e-7 relative), nothing else
    assert max(float(layer.fix_post_TD.abs().max()) for layer in rep.record.layers) < 1e-5


def test_feature_values_are_the_transcoders_pre_activations(model, ids, transcoders, graph):
    mlp_in = capture(model, ids[None], [HookPoint(layer, "mlp-in") for layer in range(N_LAYERS)])
    with torch.no_grad():
        expected = torch.stack(
            [transcoders[L].pre_acts(mlp_in[HookPoint(L, "mlp-in")][0])[p, f] for L, p, f in graph.features.tolist()]
        )
    torch.testing.assert_close(graph.values[: graph.n_features], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(graph.activations, expected, rtol=0, atol=1e-12)
    assert graph.n_features == graph.n_active_features > 0


def test_logit_values_are_logit_minus_mean(model, ids, graph):
    with torch.no_grad():
        last = model(input_ids=ids[None]).logits[0, -1]
    expected = last[graph.logit_tokens] - last.mean()
    torch.testing.assert_close(graph.values[-graph.n_logits :], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(graph.logit_probs, last.softmax(-1)[graph.logit_tokens], rtol=0, atol=1e-12)


def test_each_target_is_the_sum_of_its_incoming_edges_plus_constants(graph):
    """Feature rows: pre-activation = sum of direct effects + b_enc + the bias-only replacement value."""
    rows = target_rows(graph)
    reconstructed = graph.adjacency[rows].sum(1) + graph.constants[rows]
    torch.testing.assert_close(reconstructed, graph.values[rows], rtol=0, atol=1e-12)
    n_sources = graph.adjacency.shape[0] - graph.n_logits
    assert not graph.adjacency[graph.n_features : n_sources].any()
    assert not graph.adjacency[:, n_sources:].any()


def _source_writes(rep, sources, alpha_S):
    """embed and per-layer writes with source s scaled by alpha[s] (columns: features, errors, tokens)."""
    T = rep.record.ids_T.numel()
    n_feat = sources.features_S3.shape[0]
    writes = [torch.zeros(T, D, dtype=torch.float64) for _ in range(N_LAYERS)]
    for s, (layer, pos, f) in enumerate(sources.features_S3.tolist()):
        row = torch.zeros(T, D, dtype=torch.float64)
        row[pos] = sources.acts_S[s] * rep.transcoders[layer].W_dec[f].detach()
        writes[layer] = writes[layer] + alpha_S[s] * row
    alpha_err = alpha_S[n_feat : n_feat + N_LAYERS * T].view(N_LAYERS, T, 1)
    writes = [w + alpha_err[layer] * rep.errors[layer] for layer, w in enumerate(writes)]
    embed = alpha_S[n_feat + N_LAYERS * T :, None] * rep.record.embed_TD
    return embed[None], [w[None] for w in writes]


def test_edges_equal_a_brute_force_jacobian(model, rep, graph):
    sources = active_features(rep)
    n_sources = graph.adjacency.shape[0] - graph.n_logits
    logit_read, _ = logit_readouts(model, rep, graph.logit_tokens[:2])
    feature_read, _ = feature_readouts(rep, graph.features[-3:])

    def target(alpha_S, readout, k):
        embed, writes = _source_writes(rep, sources, alpha_S)
        out = replacement_forward(model, rep, embed, writes)
        point = out.final_BTD if int(readout.layer_R[k]) == N_LAYERS else out.mlp_in[int(readout.layer_R[k])]
        return point[0, int(readout.pos_R[k])] @ readout.vector_RD[k]

    ones = torch.ones(n_sources, dtype=torch.float64)
    cases = [(logit_read, k, n_sources + k) for k in range(2)]
    cases += [(feature_read, k, graph.n_features - 3 + k) for k in range(3)]
    for readout, k, row in cases:
        jacobian = torch.autograd.functional.jacobian(lambda a, r=readout, k=k: target(a, r, k), ones)
        torch.testing.assert_close(graph.adjacency[row, :n_sources], jacobian, rtol=1e-9, atol=1e-12)


def test_batch_size_does_not_change_edges(model, rep, graph):
    other = attribute(model, rep, graph.logit_tokens, graph.logit_probs, batch_size=5)
    torch.testing.assert_close(other.adjacency, graph.adjacency, rtol=0, atol=1e-12)
    assert other.n_backward_passes > graph.n_backward_passes


def test_max_feature_nodes_keeps_the_most_influential(model, rep, graph):
    small = attribute(model, rep, graph.logit_tokens, graph.logit_probs, max_feature_nodes=12, batch_size=6)
    assert small.n_features == 12 and small.n_active_features == graph.n_active_features
    full_index = {tuple(f): i for i, f in enumerate(graph.features.tolist())}
    kept = [full_index[tuple(f)] for f in small.features.tolist()]
    # the first batch is the top 6 by influence through the logit rows alone
    n_src = graph.adjacency.shape[0] - graph.n_logits
    logit_rows = graph.adjacency[n_src:, :n_src]
    n = graph.adjacency.shape[0]
    first = influence_from_rows(normalized(graph.adjacency[n_src:]), torch.arange(n_src, n), graph.logit_probs)
    assert set(first[: graph.n_features].topk(6).indices.tolist()) <= set(kept)
    # edges do not depend on which features were kept
    columns = torch.tensor(kept + list(range(graph.n_features, n_src)))
    torch.testing.assert_close(small.adjacency[-graph.n_logits :, : -graph.n_logits], logit_rows[:, columns])
    torch.testing.assert_close(small.adjacency[:12, : -graph.n_logits], graph.adjacency[kept][:, columns])


def test_trace_ties_it_together(model, ids, transcoders):
    graph = trace(model, ids, transcoders, target=5, batch_size=64)
    assert graph.logit_tokens.tolist() == [5] and graph.logit_error < 1e-12
    assert set(graph.timings) == {"record_s", "attribute_s", "total_s"}
    default = trace(model, ids, list(transcoders.values()), batch_size=64)
    assert default.n_logits == 10 or float(default.logit_probs.sum()) >= 0.95


def test_bad_inputs_say_what_is_wrong(model, ids, transcoders):
    with pytest.raises(ValueError, match="one transcoder per layer"):
        trace(model, ids, [transcoders[0]])
    with pytest.raises(ValueError, match="1-d tensor"):
        trace(model, ids[None], transcoders)
    with pytest.raises(ValueError, match="out of range"):
        trace(model, ids, transcoders, target=10_000)
