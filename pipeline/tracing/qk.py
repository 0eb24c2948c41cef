"""QK tracing: why a head attended from a target's position to a key position, in graph nodes.

Shape legend: T positions, D d_model, H heads, d head_dim, N contributors at one position.

The replacement model (``replacement``) freezes attention patterns, so a graph shows what a
head moved between positions but not why it attended there. The pre-softmax score of head h
of layer L at (query p, key k) is bilinear in the residual streams x_p and x_k entering L:

    score = scaling * [R_p (W_q^h n_p(x_p) + b_q^h)] . [R_k (W_k^h' n_k(x_k) + b_k^h')]

with n_p(x) = w * x * s_p + fix_p the input norm, its 1/rms s_p frozen as the replacement model
freezes it (``fix_p`` the recorded rounding term), R_p the rotary rotation of position p
(rotate-half; linear given p), and h' the key head that query head h reads (grouped-query
attention). The residual x_p entering L is a sum of contributors written at p:

  * the token embedding at p (node ``E_{token}_{p}``);
  * per layer l < L, at a position with graph nodes: each active transcoder feature's decoder
    write (node ``{l}_{latent}_{p}``; a cross-layer transcoder's feature of source l counts its
    writes into every output layer below L), the error node (``{l}_-1_{p}``), and the linear skip
    of a skip transcoder (side node ``{l}_skip_{p}``);
  * per layer l < L, at a constant position (BOS, special tokens: no graph nodes there, see
    ``attribution``), the whole MLP output (side node ``{l}_mlp_{p}``);
  * per layer l < L, attention layer l's output at p as one contributor (side node
    ``{l}_attn_{p}``). It is itself a sum of value paths from earlier positions; this module does
    not decompose it further (its own QK and OV are another head's story);
  * one bias contributor per (layer L, position, side) (side node ``{L}_bias_{p}``): the decoder
    biases b_dec of the layers below L, the norm's rounding term fix_p and the projection bias.

Projected through w * s_p, W_q^h (W_k^h') and R_p, the contributors give N_q query vectors and
N_k key vectors that sum to the head's query and key, so the pair matrix
pairs[i, j] = scaling * Q_i . K_j sums over all pairs to the score exactly: no term is left over,
because the biases are contributors. The query-side marginal of i is its row sum, the key-side
marginal of j its column sum.

Which heads. For a target node (a feature at layer L and position p, or a logit at the last
position p), every (layer l <= L, head h, key k <= p) with query p (l < n_layers for a logit) is
ranked by |value effect|: how much the target changes in the frozen replacement model because
head h moves information from k to p,

    effect = P[h, p, k] * v_proj(n(x_k))^h' . (W_O^h)^T g_l

with g_l the gradient of the target with respect to the residual stream right after attention l
at p: one backward pass through ``replacement_forward`` to the write after MLP l, chained back
through the frozen post-attention norm and the transcoder's skip (the only path through MLP l
that is not frozen); for a feature target and l = L, g_L is its encoder row through that norm.
Over heads and keys the effects sum to g_l . (attention output - o_proj bias). The strongest
effects (either sign) are decomposed.

Llama-style attention only (``check_llama``): other families raise a ValueError.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.lm.hook_points import attention_module
from pipeline.lm.hooks import decoder_blocks
from pipeline.tracing.attribution import Graph, Readouts, feature_readouts, logit_readouts
from pipeline.tracing.graph_json import EMBEDDING, ERROR, FEATURE, cantor, node_entry
from pipeline.tracing.pruning import Pruned
from pipeline.tracing.replacement import Replacement, build_replacement, record_prompt, replacement_forward

LLAMA_TYPES = ("llama",)
"""``config.model_type`` values whose attention QK tracing models (rotate-half rotary, no q/k norms)."""
SIDE_KINDS = {
    "attention": "attention output",
    "mlp": "mlp output",
    "skip": "transcoder skip",
    "bias": "bias",
}
"""Contributor kinds that are not graph nodes, and their ``feature_type`` in ``qk_only_nodes``."""


def check_llama(model: nn.Module) -> None:
    """ValueError unless the model is a Llama-style decoder whose queries and keys this module can decompose."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    rotary = getattr(getattr(model, "base_model", None), "rotary_emb", None)
    if model_type not in LLAMA_TYPES or rotary is None:
        raise ValueError(
            f"QK tracing supports Llama-style attention only (model_type {', '.join(LLAMA_TYPES)}), "
            f"got {model_type!r}: trace with --qk-targets 0"
        )
    attn = attention_module(decoder_blocks(model)[0])
    needed = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
    missing = [name for name in needed if not hasattr(attn, name)]
    if missing or hasattr(attn, "q_norm"):
        problem = f"lacks {', '.join(missing)}" if missing else "uses q/k norms"
        raise ValueError(f"QK tracing supports Llama-style attention only: {type(attn).__name__} {problem}")


@dataclass(frozen=True)
class Contributor:
    """One term of the residual stream at a position (see the module docstring for the kinds)."""

    kind: str
    """feature, error, embedding, attention, mlp, skip or bias."""
    layer: int
    """The layer that wrote it; for a bias, the head's layer; -1 for an embedding."""
    pos: int
    index: int = -1
    """The latent of a feature, the token id of an embedding."""

    @property
    def node_id(self) -> str:
        """The graph's node id (``graph_json``) or a side node's id."""
        if self.kind == "feature":
            return f"{self.layer}_{self.index}_{self.pos}"
        if self.kind == "error":
            return f"{self.layer}_-1_{self.pos}"
        if self.kind == "embedding":
            return f"E_{self.index}_{self.pos}"
        short = {"attention": "attn", "mlp": "mlp", "skip": "skip", "bias": "bias"}[self.kind]
        return f"{self.layer}_{short}_{self.pos}"


@dataclass(frozen=True)
class HeadSpot:
    """One head at one (query, key) position pair, and what it moves into the target."""

    layer: int
    head: int
    query_pos: int
    key_pos: int
    pattern: float
    """The frozen attention weight P[head, query, key]."""
    value_effect: float
    """The target's change through this head's value path from the key (module docstring)."""


@dataclass(frozen=True)
class QkDecomposition:
    """A head's pre-softmax score at (query, key) as pairs of contributors."""

    spot: HeadSpot
    q_contributors: tuple[Contributor, ...]
    k_contributors: tuple[Contributor, ...]
    pairs_QK: torch.Tensor
    """[N_q, N_k] float64: scaling * Q_i . K_j; sums to the score."""
    model_score: float
    """The score from the module's own q_proj, k_proj and rotary on the recorded attention input."""

    @property
    def score(self) -> float:
        return float(self.pairs_QK.sum())

    @property
    def q_marginal(self) -> torch.Tensor:
        return self.pairs_QK.sum(1)

    @property
    def k_marginal(self) -> torch.Tensor:
        return self.pairs_QK.sum(0)


def _add_feature_writes(rep: Replacement, layer: int, pos: int, found: list, rows: list) -> None:
    """The active features of every source layer below ``layer`` at ``pos``, each with its write summed
    over the outputs it reaches below ``layer``."""
    D = rep.record.embed_TD.shape[1]
    for source in range(layer):
        outputs = [out for out in rep.output_layers(source) if out < layer]
        latents = rep.acts[source][pos].nonzero().flatten()
        if not outputs or latents.numel() == 0:
            continue
        decoder_nX = rep.decoder_rows(source)[latents].double()
        start = rep.output_layers(source).start
        write_nD = sum(decoder_nX[:, (out - start) * D : (out - start + 1) * D] for out in outputs)
        rows.append(rep.acts[source][pos, latents].double()[:, None] * write_nD)
        found.extend(Contributor("feature", source, pos, latent) for latent in latents.tolist())


def residual_contributors(
    rep: Replacement, layer: int, pos: int, constant: bool
) -> tuple[tuple[Contributor, ...], torch.Tensor]:
    """The contributors of the residual stream entering ``layer`` at ``pos`` and their vectors [N, D]
    (float64, summing to the recorded residual); the last one is the bias (decoder biases only here)."""
    record = rep.record
    found = [Contributor("embedding", -1, pos, int(record.ids_T[pos]))]
    rows = [record.embed_TD[pos].double()[None]]
    bias_D = torch.zeros_like(rows[0][0])
    for lower in range(layer):
        rec, tc = record.layers[lower], rep.transcoders[lower]
        found.append(Contributor("attention", lower, pos))
        rows.append((rec.resid_mid_TD[pos] - rec.resid_pre_TD[pos]).double()[None])
        if constant:
            found.append(Contributor("mlp", lower, pos))
            rows.append(rec.mlp_out_TD[pos].double()[None])
            continue
        found.append(Contributor("error", lower, pos))
        rows.append(rep.errors[lower][pos].double()[None])
        W_skip = getattr(tc, "W_skip", None)
        if W_skip is not None:
            found.append(Contributor("skip", lower, pos))
            rows.append((rec.mlp_in_TD[pos].double() @ W_skip.detach().double().T)[None])
        bias_D = bias_D + tc.b_dec.detach().double()
    if not constant:
        _add_feature_writes(rep, layer, pos, found, rows)
    found.append(Contributor("bias", layer, pos))
    rows.append(bias_D[None])
    return tuple(found), torch.cat(rows)


def rotary(model: nn.Module, n_pos: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [T, d] of positions 0..n_pos-1 from the model's own rotary embedding."""
    positions = torch.arange(n_pos, device=like.device)[None]
    cos, sin = model.base_model.rotary_emb(like[None, :n_pos], positions)
    return cos[0], sin[0]


def _rotate(x_Nd: torch.Tensor, cos_d: torch.Tensor, sin_d: torch.Tensor) -> torch.Tensor:
    half = x_Nd.shape[-1] // 2
    rotated = torch.cat((-x_Nd[..., half:], x_Nd[..., :half]), dim=-1)
    return x_Nd * cos_d.double() + rotated * sin_d.double()


def _head_rows(proj: nn.Linear, head: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This head's rows of a projection [d, D] and its bias [d] (zeros without one), float64."""
    weight = proj.weight.detach()[head * d : (head + 1) * d].double()
    bias = proj.bias.detach()[head * d : (head + 1) * d].double() if proj.bias is not None else weight.new_zeros(d)
    return weight, bias


def _side_vectors(block, rep, layer, pos, constant, proj, head, cos_sin) -> tuple[tuple[Contributor, ...], Tensor]:
    """[N, d]: each contributor through the frozen input norm, the head's projection and the rotary of ``pos``."""
    rec, attn = rep.record.layers[layer], attention_module(block)
    found, rows_ND = residual_contributors(rep, layer, pos, constant)
    w_D = block.input_layernorm.weight.detach().double() * rec.scale_in_T1[pos].double()
    weight_dD, bias_d = _head_rows(proj, head, attn.head_dim)
    out_Nd = (rows_ND * w_D) @ weight_dD.T
    out_Nd[-1] += weight_dD @ rec.fix_in_TD[pos].double() + bias_d
    return found, _rotate(out_Nd, cos_sin[0][pos], cos_sin[1][pos])


def _attention_input(block, rep: Replacement, layer: int) -> torch.Tensor:
    """[T, D] the input norm's output as the replacement model computes it (equal to the recorded one)."""
    rec = rep.record.layers[layer]
    return block.input_layernorm.weight.detach() * (rec.resid_pre_TD * rec.scale_in_T1) + rec.fix_in_TD


@torch.no_grad()
def module_score(model: nn.Module, rep: Replacement, layer: int, head: int, q_pos: int, k_pos: int) -> float:
    """The pre-softmax score from the attention module's own q_proj, k_proj, rotary and scaling."""
    block = decoder_blocks(model)[layer]
    attn, h_TD = attention_module(block), _attention_input(block, rep, layer)
    d, kv_head = attn.head_dim, head // _group(model)
    cos, sin = rotary(model, rep.record.ids_T.numel(), h_TD)
    q_d = attn.q_proj(h_TD[q_pos])[head * d : (head + 1) * d].double()
    k_d = attn.k_proj(h_TD[k_pos])[kv_head * d : (kv_head + 1) * d].double()
    q_d, k_d = _rotate(q_d, cos[q_pos], sin[q_pos]), _rotate(k_d, cos[k_pos], sin[k_pos])
    return float(attn.scaling * (q_d @ k_d))


def _group(model: nn.Module) -> int:
    """Query heads per key head."""
    config = model.config
    return config.num_attention_heads // (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


@torch.no_grad()
def decompose_score(
    model: nn.Module, rep: Replacement, spot: HeadSpot, constant_T: torch.Tensor | None = None
) -> QkDecomposition:
    """The score of ``spot``'s head at (query, key) as the pair matrix of their contributors (module docstring).

    ``constant_T`` [T] bool: positions without graph nodes (default: position 0 only)."""
    check_llama(model)
    if constant_T is None:
        constant_T = torch.zeros_like(rep.record.ids_T, dtype=torch.bool)
        constant_T[0] = True
    block = decoder_blocks(model)[spot.layer]
    attn = attention_module(block)
    cos_sin = rotary(model, rep.record.ids_T.numel(), rep.record.embed_TD)
    q_found, Q_Nd = _side_vectors(block, rep, spot.layer, spot.query_pos, bool(constant_T[spot.query_pos]),
                                  attn.q_proj, spot.head, cos_sin)  # fmt: skip
    k_found, K_Md = _side_vectors(block, rep, spot.layer, spot.key_pos, bool(constant_T[spot.key_pos]),
                                  attn.k_proj, spot.head // _group(model), cos_sin)  # fmt: skip
    pairs = attn.scaling * (Q_Nd @ K_Md.T)
    score = module_score(model, rep, spot.layer, spot.head, spot.query_pos, spot.key_pos)
    return QkDecomposition(spot, q_found, k_found, pairs, score)


def _post_norm(block: nn.Module, rep: Replacement, layer: int, pos: int) -> Tensor:
    """[D] the frozen post-attention norm at ``pos`` as a diagonal: w * s_pos."""
    return block.post_attention_layernorm.weight.detach() * rep.record.layers[layer].scale_post_T1[pos]


def _gradients_after_attention(model: nn.Module, rep: Replacement, readout: Readouts) -> list[torch.Tensor]:
    """Per layer l up to the target's (below n_layers for a logit), the gradient [D] of the target with respect
    to the residual stream right after attention l at the target's position (module docstring)."""
    (T, D), n_layers = rep.record.embed_TD.shape, len(rep.acts)
    layer, pos, vector_D = int(readout.layer_R[0]), int(readout.pos_R[0]), readout.vector_RD[0]
    like = {"dtype": rep.record.embed_TD.dtype, "device": rep.record.embed_TD.device}
    stop = None if layer == n_layers else layer
    with torch.enable_grad():
        leaves = [torch.zeros(1, T, D, **like, requires_grad=True) for _ in range(n_layers + 1)]
        out = replacement_forward(model, rep, leaves[0], leaves[1:], stop)
        read_TD = (out.final_BTD if stop is None else out.mlp_in[layer])[0]
        raw = torch.autograd.grad((read_TD[pos] * vector_D).sum(), leaves[1:], allow_unused=True)
    blocks, grads = decoder_blocks(model), []
    for lower in range(min(layer, n_layers)):
        g_D = raw[lower][0, pos] if raw[lower] is not None else vector_D.new_zeros(D)
        W_skip = getattr(rep.transcoders[lower], "W_skip", None)
        if W_skip is not None:
            g_D = g_D + _post_norm(blocks[lower], rep, lower, pos) * (W_skip.detach().to(g_D).T @ g_D)
        grads.append(g_D)
    if stop is not None:
        grads.append(_post_norm(blocks[layer], rep, layer, pos) * vector_D)
    return grads


@torch.no_grad()
def value_effects(model: nn.Module, rep: Replacement, readout: Readouts) -> torch.Tensor:
    """[n, H, T] float64: per layer l (as ``_gradients_after_attention``), head and key position, the target's
    change through that head's value path from that key into the target's position (zero after it)."""
    check_llama(model)
    pos, T = int(readout.pos_R[0]), rep.record.ids_T.numel()
    blocks, group = decoder_blocks(model), _group(model)
    effects = []
    for layer, g_D in enumerate(_gradients_after_attention(model, rep, readout)):
        attn, rec = attention_module(blocks[layer]), rep.record.layers[layer]
        d, H = attn.head_dim, rec.pattern_HTT.shape[0]
        v_kHd = attn.v_proj(_attention_input(blocks[layer], rep, layer)[: pos + 1]).view(pos + 1, -1, d)
        v_kHd = v_kHd.repeat_interleave(group, dim=1).double()
        u_Hd = (attn.o_proj.weight.detach().T @ g_D.to(attn.o_proj.weight.dtype)).view(H, d).double()
        layer_HT = rec.pattern_HTT.new_zeros(H, T, dtype=torch.float64)
        layer_HT[:, : pos + 1] = rec.pattern_HTT[:, pos, : pos + 1].double() * torch.einsum("khd,hd->hk", v_kHd, u_Hd)
        effects.append(layer_HT)
    return torch.stack(effects)


def strongest_heads(model: nn.Module, rep: Replacement, readout: Readouts, n: int) -> list[HeadSpot]:
    """The ``n`` (layer, head, key) with the largest |value effect| into the target, strongest first."""
    effects = value_effects(model, rep, readout)
    pos, top = int(readout.pos_R[0]), effects.abs().flatten().topk(min(n, effects.numel())).indices
    spots = []
    for flat in top.tolist():
        layer, rest = divmod(flat, effects.shape[1] * effects.shape[2])
        head, key = divmod(rest, effects.shape[2])
        pattern = float(rep.record.layers[layer].pattern_HTT[head, pos, key])
        spots.append(HeadSpot(layer, head, pos, key, pattern, float(effects[layer, head, key])))
    return spots


def qk_target_nodes(graph: Graph, pruned: Pruned, n: int) -> list[int]:
    """Adjacency indices of the targets to QK-trace, in this order: the kept feature of highest influence, the
    top logit, then the next kept features by influence; the first ``n`` of them."""
    kept = pruned.node_mask_N[: graph.n_features].nonzero().flatten()
    by_influence = kept[pruned.influence_N[kept].argsort(descending=True, stable=True)].tolist()
    top_logit = graph.adjacency.shape[0] - graph.n_logits
    return ([*by_influence[:1], top_logit, *by_influence[1:]])[:n]


def node_readout(model: nn.Module, rep: Replacement, graph: Graph, index: int) -> Readouts:
    """The readout (layer, position, direction) of a feature or logit node of ``graph``."""
    if index < graph.n_features:
        features = graph.features[index : index + 1].to(rep.record.ids_T.device)
        return feature_readouts(rep, features)[0]
    first_logit = graph.adjacency.shape[0] - graph.n_logits
    if index < first_logit:
        raise ValueError(f"node {index} is an error or token node: QK tracing explains features and logits")
    tokens = graph.logit_tokens[index - first_logit : index - first_logit + 1].to(rep.record.ids_T.device)
    return logit_readouts(model, rep, tokens)[0]


@dataclass(frozen=True)
class TargetQk:
    """The heads that move information into one target node, each decomposed."""

    node_index: int
    """The target's index in the graph's adjacency."""
    decompositions: tuple[QkDecomposition, ...]
    """Strongest value effect first."""


def trace_qk(
    model: nn.Module, rep: Replacement, graph: Graph, node_indices: list[int], heads_per_target: int = 3
) -> list[TargetQk]:
    """For each target node, its ``heads_per_target`` strongest (head, key) spots, their scores decomposed."""
    check_llama(model)
    constant_T = graph.constant_positions.to(rep.record.ids_T.device)
    traced = []
    for index in node_indices:
        spots = strongest_heads(model, rep, node_readout(model, rep, graph, index), heads_per_target)
        traced.append(TargetQk(index, tuple(decompose_score(model, rep, spot, constant_T) for spot in spots)))
    return traced


def _top(values: torch.Tensor, n: int) -> list[int]:
    """Indices of the ``n`` largest |values|, largest first."""
    return values.abs().flatten().topk(min(n, values.numel())).indices.tolist()


def qk_tracing_results(dec: QkDecomposition, top: int = 10) -> dict[str, list]:
    """Neuronpedia's form: the ``top`` pairs and marginals of largest magnitude (signed values), by node id."""
    q_ids, k_ids = [c.node_id for c in dec.q_contributors], [c.node_id for c in dec.k_contributors]
    n_k = len(k_ids)
    pairs = [[q_ids[i // n_k], k_ids[i % n_k], float(dec.pairs_QK.flatten()[i])] for i in _top(dec.pairs_QK, top)]
    q_top = [[q_ids[i], float(dec.q_marginal[i])] for i in _top(dec.q_marginal, top)]
    k_top = [[k_ids[i], float(dec.k_marginal[i])] for i in _top(dec.k_marginal, top)]
    return {"pair_wise_contributors": pairs, "top_q_marginal_contributors": q_top, "top_k_marginal_contributors": k_top}


def _side_clerp(c: Contributor) -> str:
    return {
        "attention": f"L{c.layer} attention output",
        "mlp": f"L{c.layer} MLP output (constant position)",
        "skip": f"L{c.layer} transcoder skip",
        "bias": f"biases into L{c.layer} q/k (decoder biases, norm rounding, projection bias)",
    }[c.kind]


def contributor_node(c: Contributor, rep: Replacement, labels: dict | None = None) -> dict:
    """A contributor as a node dict like the graph's (``graph_json``), for ``qk_only_nodes``."""
    if c.kind == "feature":
        activation = float(rep.acts[c.layer][c.pos, c.index])
        return node_entry(c.node_id, cantor(c.layer, c.index), str(c.layer), c.pos, FEATURE, f"{c.layer}_{c.index}-0",
                          clerp=(labels or {}).get((c.layer, c.index), ""), activation=activation)  # fmt: skip
    if c.kind == "error":
        return node_entry(c.node_id, -1, str(c.layer), c.pos, ERROR, f"err_{c.layer}_{c.pos}-0")
    if c.kind == "embedding":
        return node_entry(c.node_id, c.pos, "E", c.pos, EMBEDDING, f"E_{c.index}-{c.pos}")
    return node_entry(c.node_id, None, str(c.layer), c.pos, SIDE_KINDS[c.kind], c.node_id, clerp=_side_clerp(c))


def target_node_id(graph: Graph, index: int) -> str:
    """The ``graph_json`` node id of a feature or logit node of ``graph``."""
    if index < graph.n_features:
        layer, pos, latent = graph.features[index].tolist()
        return f"{layer}_{latent}_{pos}"
    token = int(graph.logit_tokens[index - (graph.adjacency.shape[0] - graph.n_logits)])
    return f"{graph.n_layers + 1}_{token}_{graph.n_pos - 1}"


def attach_qk(
    document: dict, traced: list[TargetQk], graph: Graph, rep: Replacement, labels: dict | None = None, top: int = 10
) -> None:
    """Put ``traced`` into a graph document (``graph_json``): ``qk_tracing_results`` on each target's node (its
    strongest head), every head under ``saescope.qk_tracing``, and the contributors that are not among the
    document's nodes in the top-level ``qk_only_nodes``."""
    by_id = {node["node_id"]: node for node in document["nodes"]}
    entries, side = [], {}
    for target in traced:
        target_id = target_node_id(graph, target.node_index)
        for rank, dec in enumerate(target.decompositions):
            results = qk_tracing_results(dec, top)
            if rank == 0 and target_id in by_id:
                by_id[target_id]["qk_tracing_results"] = results
            entries.append({"target": target_id, **dataclasses.asdict(dec.spot), "score": dec.score,
                            "model_score": dec.model_score, "qk_tracing_results": results})  # fmt: skip
            listed = {i for row in results["pair_wise_contributors"] for i in row[:2]}
            listed |= {row[0] for key in ("top_q_marginal_contributors", "top_k_marginal_contributors")
                       for row in results[key]}  # fmt: skip
            for c in (*dec.q_contributors, *dec.k_contributors):
                if c.node_id in listed and c.node_id not in by_id:
                    side.setdefault(c.node_id, contributor_node(c, rep, labels))
    document["qk_only_nodes"] = side
    document["saescope"]["qk_tracing"] = entries


def qk_into_document(
    document: dict,
    model: nn.Module,
    transcoders,
    graph: Graph,
    pruned: Pruned,
    n_targets: int,
    heads_per_target: int = 3,
    labels: dict | None = None,
) -> None:
    """QK-trace the first ``n_targets`` targets of ``qk_target_nodes`` and ``attach_qk`` them to ``document``.

    The prompt is recorded again (one forward of the model; the graph keeps no replacement model).
    A model that is not Llama-style is not traced: ``saescope.qk_skipped`` says why.
    """
    try:
        check_llama(model)
    except ValueError as error:
        document["saescope"]["qk_skipped"] = str(error)
        return
    device = next(model.parameters()).device
    rep = build_replacement(record_prompt(model, graph.prompt_ids.to(device)), transcoders)
    traced = trace_qk(model, rep, graph, qk_target_nodes(graph, pruned, n_targets), heads_per_target)
    attach_qk(document, traced, graph, rep, labels)
