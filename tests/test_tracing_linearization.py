"""The adjacency against gradients taken through the Hugging Face model itself, frozen by hooks, in float64.

An oracle that shares no code with ``replacement_forward``: the real Llama runs with every
RMSNorm's scale held at its value on the prompt (norm output = weight * x * s), every q_proj
and k_proj returning its recorded output (so rotary and softmax give the prompt's attention
pattern and only the value path stays live), and every MLP replaced by its transcoder's skip
and decoder bias plus the features and error it wrote on the prompt, each source scaled by
its own alpha. A column of the adjacency is then d target / d alpha_source at alpha = 1.
BOS (position 0) is a constant: its features and errors are written in full, without alpha.
"""

import pytest
import torch

from pipeline.tracing.trace import trace
from tests.conftest import make_tiny_llama
from tests.test_tracing import N_LAYERS, D, random_transcoder, with_random_norm_weights


@pytest.fixture(scope="module")
def setup(tokenizer):
    model = with_random_norm_weights(make_tiny_llama(len(tokenizer), n_layers=N_LAYERS, d_model=D).double(), 2)
    generator = torch.Generator().manual_seed(2)
    transcoders = [random_transcoder(generator) for _ in range(N_LAYERS)]
    ids = torch.tensor([tokenizer.bos_token_id, *tokenizer("The cat sat.").input_ids])
    graph = trace(model, ids, transcoders, batch_size=64, special_ids=tokenizer.all_special_ids)
    return model, transcoders, ids, graph


def clean_record(model, ids) -> dict:
    """One forward without hooks changing anything: each norm's input, each q/k projection's output,
    each MLP's input and output."""
    seen, handles = {}, []

    def keep(key, pick):
        return lambda _m, inputs, output: seen.__setitem__(key, pick(inputs, output).detach())

    for layer, block in enumerate(model.model.layers):
        for name in ("input_layernorm", "post_attention_layernorm"):
            handles.append(getattr(block, name).register_forward_hook(keep((name, layer), lambda i, o: i[0])))
        for name in ("q_proj", "k_proj"):
            handles.append(getattr(block.self_attn, name).register_forward_hook(keep((name, layer), lambda i, o: o)))
        handles.append(block.mlp.register_forward_hook(keep(("mlp_in", layer), lambda i, o: i[0])))
        handles.append(block.mlp.register_forward_hook(keep(("mlp_out", layer), lambda i, o: o)))
    handles.append(model.model.norm.register_forward_hook(keep(("norm", -1), lambda i, o: i[0])))
    try:
        with torch.no_grad():
            model(input_ids=ids[None])
    finally:
        for handle in handles:
            handle.remove()
    return seen


def frozen_norm(x_recorded):
    def hook(module, inputs, _output):
        scale = torch.rsqrt(x_recorded.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        return module.weight * inputs[0] * scale

    return hook


def assert_rows_are_gradients(graph, transcoders, logits, mlp_ins, alpha_S, n_late: int) -> torch.Tensor:
    """Adjacency rows of the top 3 logits (demeaned) and of ``n_late`` features past layer 0 equal the gradients
    of those targets, computed through the hooked model, with respect to every source's scale ``alpha_S``;
    returns the features past layer 0."""
    n_sources = alpha_S.numel()
    targets = [(n_sources + k, logits[-1, v] - logits[-1].mean()) for k, v in enumerate(graph.logit_tokens[:3])]
    late = (graph.features[:, 0] >= 1).nonzero().flatten()
    for row in late[torch.linspace(0, late.numel() - 1, n_late).long()].tolist():
        layer, pos, latent = graph.features[row].tolist()
        targets.append((row, mlp_ins[layer][pos] @ transcoders[layer].W_enc_FD[latent].detach()))
    for row, value in targets:
        (gradient,) = torch.autograd.grad(value, alpha_S, retain_graph=True)
        torch.testing.assert_close(graph.adjacency[row, :n_sources], gradient, rtol=1e-9, atol=1e-12)
        assert gradient.abs().max() > 1e-6
    return late


def mlp_writes(graph, tc, layer: int, seen: dict, alpha_S: torch.Tensor, keys=("mlp_in", "mlp_out")):
    """What MLP ``layer`` writes in the frozen model, as a function of the sources' alphas (``seen`` holds the
    MLP's recorded input and output under ``(keys[0], layer)`` and ``(keys[1], layer)``)."""
    x_TD = seen[(keys[0], layer)][0]
    acts_TF = tc.encode(x_TD).detach()
    error_TD = seen[(keys[1], layer)][0] - (acts_TF @ tc.W_dec + tc.b_dec + x_TD @ tc.W_skip.T).detach()
    constant_T1 = graph.constant_positions[:, None].double()
    scale_TF = constant_T1.expand_as(acts_TF).clone()
    here = (graph.features[:, 0] == layer).nonzero().flatten()
    scale_TF = scale_TF.index_put((graph.features[here, 1], graph.features[here, 2]), alpha_S[here])
    traced = graph.error_positions
    start = graph.n_features + layer * traced.numel()
    error_scale_T1 = constant_T1.clone().index_put((traced,), alpha_S[start : start + traced.numel(), None])
    return (scale_TF * acts_TF) @ tc.W_dec.detach() + error_scale_T1 * error_TD


def frozen_forward(model, transcoders, ids, graph, seen, alpha_S):
    """(logits [T, V], MLP inputs per layer [T, D]) of the hooked model with source s scaled by alpha_S[s]."""
    mlp_ins, handles = {}, []
    first_token = graph.n_features + graph.n_errors

    def replace_mlp(layer, tc):
        def hook(_module, inputs, _output):
            mlp_ins[layer] = inputs[0][0]
            skip = inputs[0] @ tc.W_skip.detach().T + tc.b_dec.detach()
            return skip + mlp_writes(graph, tc, layer, seen, alpha_S)[None]

        return hook

    for layer, (block, tc) in enumerate(zip(model.model.layers, transcoders, strict=True)):
        for name in ("input_layernorm", "post_attention_layernorm"):
            handles.append(getattr(block, name).register_forward_hook(frozen_norm(seen[(name, layer)])))
        for name in ("q_proj", "k_proj"):
            recorded = seen[(name, layer)]
            handles.append(getattr(block.self_attn, name).register_forward_hook(lambda *_, r=recorded: r))
        handles.append(block.mlp.register_forward_hook(replace_mlp(layer, tc)))
    handles.append(model.model.norm.register_forward_hook(frozen_norm(seen[("norm", -1)])))
    scale_T1 = alpha_S[first_token : first_token + graph.n_pos, None]
    handles.append(model.model.embed_tokens.register_forward_hook(lambda _m, _i, out: out * scale_T1))
    try:
        logits = model(input_ids=ids[None]).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    return logits, mlp_ins


def test_adjacency_columns_are_gradients_through_the_hooked_model(setup):
    model, transcoders, ids, graph = setup
    seen = clean_record(model, ids)
    n_sources = graph.adjacency.shape[0] - graph.n_logits
    alpha_S = torch.ones(n_sources, dtype=torch.float64, requires_grad=True)
    logits, mlp_ins = frozen_forward(model, transcoders, ids, graph, seen, alpha_S)
    with torch.no_grad():
        real = model(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(logits.detach(), real, rtol=0, atol=1e-6)  # HF norms round in float32
    assert_rows_are_gradients(graph, transcoders, logits, mlp_ins, alpha_S, n_late=4)
    assert graph.constant_positions[0] and not (graph.features[:, 1] == 0).any()
