"""Attribution graphs on the tiny Llama with random skip transcoders at every layer, in float64.

Oracles: the model's own logits (completeness), ``Transcoder.pre_acts`` on the captured
``mlp-in`` (feature values), and autograd.functional.jacobian of a target with respect to a
scalar multiplier on every source's write in the frozen linear model (edges).
"""

import copy

import pytest
import torch

from pipeline.lm.hook_points import HookPoint, capture
from pipeline.sae.model import SaeConfig
from pipeline.sae.transcoder import Transcoder
from pipeline.tracing.attribution import (
    active_features,
    attribute,
    constant_mask,
    feature_readouts,
    logit_readouts,
    target_logits,
)
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


def with_random_norm_weights(model, seed: int = 0):
    """Every RMSNorm weight drawn from U(0.5, 1.5), so a dropped or swapped norm weight changes the numbers
    (a fresh Llama has them all at exactly 1)."""
    generator = torch.Generator().manual_seed(seed)
    norms = [m for name, m in model.named_modules() if name.endswith("norm") and hasattr(m, "weight")]
    assert len(norms) == 2 * model.config.num_hidden_layers + 1
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=generator, dtype=torch.float64))
    return model


@pytest.fixture(scope="module")
def model(tokenizer):
    return with_random_norm_weights(make_tiny_llama(len(tokenizer), n_layers=N_LAYERS, d_model=D).double())


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
    assert max(float(layer.mlp_norm.fix_TD.abs().max()) for layer in rep.record.layers) < 1e-5


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
    """embed and per-layer writes with source s scaled by alpha[s] (columns: features, errors at the traced
    positions, tokens); the writes at constant positions are left out (they only shift the constant)."""
    T, P = rep.record.ids_T.numel(), sources.traced_P
    n_feat = sources.features_S3.shape[0]
    writes = [torch.zeros(T, D, dtype=torch.float64) for _ in range(N_LAYERS)]
    for s, (layer, pos, f) in enumerate(sources.features_S3.tolist()):
        row = torch.zeros(T, D, dtype=torch.float64)
        row[pos] = sources.acts_S[s] * rep.transcoders[layer].W_dec[f].detach()
        writes[layer] = writes[layer] + alpha_S[s] * row
    alpha_err = torch.zeros(N_LAYERS, T, 1, dtype=torch.float64)
    alpha_err[:, P] = alpha_S[n_feat : n_feat + N_LAYERS * P.numel()].view(N_LAYERS, P.numel(), 1)
    writes = [w + alpha_err[layer] * rep.errors[layer] for layer, w in enumerate(writes)]
    embed = alpha_S[n_feat + N_LAYERS * P.numel() :, None] * rep.record.embed_TD
    return embed[None], [w[None] for w in writes]


def test_edges_equal_a_brute_force_jacobian(model, rep, graph):
    sources = active_features(rep, graph.constant_positions)
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


def test_feature_selection_is_the_greedy_over_every_batch(model, rep, graph):
    """Brute force: after each batch, the partial graph holds the logit rows and the rows visited so far
    (row-normalized, dense); influence = w ((1 - M)^-1 - 1); the next batch is the most influential unvisited."""
    n, n_feat, n_logits = graph.adjacency.shape[0], graph.n_features, graph.n_logits
    eye = torch.eye(n, dtype=torch.float64)
    weights = graph.target_weights()
    budget, batch = 12, 3
    visited: list[int] = []
    while len(visited) < budget:
        M = torch.zeros(n, n, dtype=torch.float64)
        rows = [*range(n - n_logits, n), *visited]
        M[rows] = normalized(graph.adjacency[rows])
        influence = weights @ (torch.linalg.inv(eye - M) - eye)
        ranked = [f for f in influence[:n_feat].argsort(descending=True).tolist() if f not in visited]
        visited += ranked[:batch]
    small = attribute(model, rep, graph.logit_tokens, graph.logit_probs, max_feature_nodes=budget, batch_size=batch)
    expected = graph.features[sorted(visited)]
    assert torch.equal(small.features, expected)
    assert n_feat > budget + batch  # selection really had a choice after the first batch


def test_trace_ties_it_together(model, ids, transcoders):
    graph = trace(model, ids, transcoders, target=5, batch_size=64)
    assert graph.logit_tokens.tolist() == [5] and graph.logit_error < 1e-12
    assert set(graph.timings) == {"record_s", "attribute_s", "total_s"}
    default = trace(model, ids, list(transcoders.values()), batch_size=64)
    assert default.n_logits == 10 or float(default.logit_probs.sum()) >= 0.95


def _node_keys(graph) -> list[tuple]:
    """One key per node, in adjacency order, that names the node independently of the layout."""
    keys = [("feature", *f) for f in graph.features.tolist()]
    keys += [("error", *graph.error_node(k)) for k in range(graph.n_errors)]
    keys += [("token", pos) for pos in range(graph.n_pos)]
    return keys + [("logit", t) for t in graph.logit_tokens.tolist()]


def test_bos_and_special_positions_are_constants_not_nodes(model, tokenizer, transcoders):
    """BOS at 0 and an EOS inside the prompt: no feature or error node there, their writes folded into the
    constants (completeness exact), every other edge the same as with nodes at every position."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = torch.tensor([bos, *tokenizer("A cat").input_ids, eos, *tokenizer(" sat.").input_ids])
    constant_T = constant_mask(ids, tokenizer.all_special_ids)
    assert constant_T.nonzero().flatten().tolist() == [0, 6]
    rep = build_replacement(record_prompt(model, ids), transcoders)
    tokens, probs = target_logits(rep.record.logits_TV[-1])
    new = attribute(model, rep, tokens, probs, batch_size=16, constant_T=constant_T)
    old = attribute(model, rep, tokens, probs, batch_size=16, constant_T=torch.zeros_like(constant_T))
    assert not constant_T[new.features[:, 1]].any() and constant_T[old.features[:, 1]].any()
    assert not any(constant_T[new.error_node(k)[1]] for k in range(new.n_errors))
    assert new.n_errors == N_LAYERS * (ids.numel() - 2) and old.n_errors == N_LAYERS * ids.numel()
    assert new.n_pos == ids.numel()  # an embedding node at every position, BOS included (as circuit-tracer)
    old_index = {key: i for i, key in enumerate(_node_keys(old))}
    idx = torch.tensor([old_index[key] for key in _node_keys(new)])
    torch.testing.assert_close(new.adjacency, old.adjacency[idx][:, idx], rtol=0, atol=1e-13)
    # the nodes at constant positions did write something, and it is now in the constants
    dropped = torch.ones(old.adjacency.shape[0], dtype=torch.bool)
    dropped[idx] = False
    assert old.adjacency[idx][:, dropped].abs().max() > 1e-6
    rows = target_rows(new)
    torch.testing.assert_close(new.adjacency[rows].sum(1) + new.constants[rows], new.values[rows], rtol=0, atol=1e-12)
    torch.testing.assert_close(new.values, old.values[idx], rtol=0, atol=1e-12)
    assert (new.constants[rows] - old.constants[idx][rows]).abs().max() > 1e-6


def test_every_tensor_attribution_makes_is_on_the_models_device(model, rep, graph):
    """With the default device set to 'meta', a tensor made without ``device=`` cannot meet the model's tensors:
    the run that `trace --device cuda` does, checked on the CPU. The graph comes back on the CPU, unchanged."""
    with torch.device("meta"):
        again = attribute(model, rep, graph.logit_tokens, graph.logit_probs, batch_size=16)
        small = attribute(model, rep, graph.logit_tokens, graph.logit_probs, max_feature_nodes=5, batch_size=3)
        targeted = target_logits(rep.record.logits_TV[-1], target=5)[0]
    assert again.adjacency.device.type == "cpu" and small.adjacency.device.type == "cpu"
    assert targeted.device == rep.record.logits_TV.device
    torch.testing.assert_close(again.adjacency, graph.adjacency, rtol=0, atol=0)
    assert small.n_features == 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trace_on_cuda_equals_the_cpu(model, ids, transcoders):
    cpu = trace(model, ids, transcoders, batch_size=16)
    cuda_tcs = {layer: copy.deepcopy(tc).cuda() for layer, tc in transcoders.items()}
    gpu = trace(copy.deepcopy(model).cuda(), ids.cuda(), cuda_tcs, batch_size=16)
    assert gpu.adjacency.device.type == "cpu"
    torch.testing.assert_close(gpu.adjacency, cpu.adjacency, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gpu.constants, cpu.constants, rtol=1e-9, atol=1e-12)


def test_bad_inputs_say_what_is_wrong(model, ids, transcoders):
    with pytest.raises(ValueError, match="one transcoder per layer"):
        trace(model, ids, [transcoders[0]])
    with pytest.raises(ValueError, match="1-d tensor"):
        trace(model, ids[None], transcoders)
    with pytest.raises(ValueError, match="out of range"):
        trace(model, ids, transcoders, target=10_000)
