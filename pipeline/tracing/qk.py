"""QK tracing: why a head attended from a target's position to a key position, in graph nodes.

Shape legend: T positions, D d_model, H heads, d head_dim, N contributors at one position.

The replacement model (``replacement``) freezes attention patterns, so a graph shows what a
head moved between positions but not why it attended there. The pre-softmax score of head h
of layer L at (query p, key k) is bilinear in the residual streams x_p and x_k entering L:

    score = scaling * [R_p (W_q^h n_p(x_p) + b_q^h)] . [R_k (W_k^h' n_k(x_k) + b_k^h')]

with n_p(x) = w * x * s_p + fix_p the input norm, its 1/rms s_p frozen as the replacement model
freezes it (``fix_p`` the recorded rounding term), R_p the rotary rotation of position p
(rotate-half; linear given p), and h' the key head that query head h reads (grouped-query
attention). Query and key are affine in the residual streams, so the score splits into pairs
(query-side contributor i, key-side contributor j): pair[i, j] = scaling * Q_i . K_j, with Q_i
(K_j) the contributor's part of the rotated query (key). The pairs sum exactly to the score: no
term is left over, because the biases are contributors too. The query-side marginal of i is its
row sum (Q_i . the whole key), the key-side marginal of j its column sum. Two ways to cut the
residual stream into contributors:

``decompose_through_attention`` (the default of ``trace_qk``): the replacement model is linear
in the nodes' writes given its frozen patterns and norm scales, so the attention input of layer L
at p is a sum over the graph's nodes at positions <= p (features and errors of layers below L,
token embeddings), each reaching p directly or through earlier heads' value paths, plus two terms
that are no node: ``{L}_const_{p}`` (what the MLPs write at constant positions, BOS above all,
carried over by attention) and ``{L}_bias_{p}`` (decoder biases, norm rounding terms, the q/k
projection bias). Each node's part of the query (key) is its write times the gradient of the
query (key) components: 2 x head_dim rows of backward passes through ``replacement_forward``.

``decompose_score``: only what is written at p itself, attention outputs kept whole:

  * the token embedding at p (node ``E_{token}_{p}``);
  * per layer l < L, at a position with graph nodes: each active transcoder feature's decoder
    write (node ``{l}_{latent}_{p}``; a cross-layer transcoder's feature of source l counts its
    writes into every output layer below L), the error node (``{l}_-1_{p}``), and the linear skip
    of a skip transcoder (side node ``{l}_skip_{p}``);
  * per layer l < L, at a constant position (BOS, special tokens: no graph nodes there, see
    ``attribution``), the whole MLP output (side node ``{l}_mlp_{p}``);
  * per layer l < L, attention layer l's output at p (side node ``{l}_attn_{p}``), not decomposed;
  * ``{L}_bias_{p}``: the decoder biases b_dec of the layers below L, the norm's rounding term and
    the projection bias.

Ids of graph nodes follow ``graph_json``; the side nodes (``SIDE_KINDS``) are listed in the
document's ``qk_only_nodes``. The listed pairs are the largest |pair| among the 512 contributors
of largest |Q_i| (|K_j|) on each side; the marginals are exact.

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
    "constant": "constant positions",
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
    """feature, error, embedding, attention, mlp, skip, constant or bias."""
    layer: int
    """The layer that wrote it; for a bias or constant, the head's layer; -1 for an embedding."""
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
        short = {"attention": "attn", "mlp": "mlp", "skip": "skip", "constant": "const", "bias": "bias"}[self.kind]
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
    """A head's pre-softmax score at (query, key) as pairs of contributors: pair (i, j) = Q_i . K_j."""

    spot: HeadSpot
    q_contributors: tuple[Contributor, ...]
    k_contributors: tuple[Contributor, ...]
    Q_Nd: torch.Tensor
    """[N_q, d] float64: each query-side contributor's part of the rotated query, times ``scaling``."""
    K_Md: torch.Tensor
    """[N_k, d] float64: each key-side contributor's part of the rotated key."""
    model_score: float
    """The score from the module's own q_proj, k_proj and rotary on the recorded attention input."""
    through_attention: bool = False
    """Whether attention outputs are attributed through to the nodes at earlier positions (else one
    contributor per layer and position)."""

    @property
    def pairs_QK(self) -> torch.Tensor:
        """[N_q, N_k] every pair; sums to the score."""
        return self.Q_Nd @ self.K_Md.T

    @property
    def score(self) -> float:
        return float(self.Q_Nd.sum(0) @ self.K_Md.sum(0))

    @property
    def q_marginal(self) -> torch.Tensor:
        """[N_q] each query-side contributor with the whole key: its row of ``pairs_QK`` summed."""
        return self.Q_Nd @ self.K_Md.sum(0)

    @property
    def k_marginal(self) -> torch.Tensor:
        return self.K_Md @ self.Q_Nd.sum(0)

    def top_pairs(self, n: int, candidates: int = 512) -> list[tuple[int, int, float]]:
        """The ``n`` pairs of largest |Q_i . K_j|, searched among the ``candidates`` contributors of largest norm
        on each side (all of them when there are fewer): (i, j, value), largest first."""
        q_rows = self.Q_Nd.norm(dim=1).topk(min(candidates, self.Q_Nd.shape[0])).indices
        k_rows = self.K_Md.norm(dim=1).topk(min(candidates, self.K_Md.shape[0])).indices
        pairs = self.Q_Nd[q_rows] @ self.K_Md[k_rows].T
        flat = pairs.abs().flatten().topk(min(n, pairs.numel())).indices.tolist()
        n_k = k_rows.numel()
        return [(int(q_rows[f // n_k]), int(k_rows[f % n_k]), float(pairs.flatten()[f])) for f in flat]


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


def _attention_output(record, layer: int, pos: int) -> Tensor:
    """[D] float64: what attention ``layer`` added at ``pos`` (sequential residual: the next block's input,
    or the final residual, minus this block's input and its MLP's output)."""
    layers = record.layers
    after = layers[layer + 1].resid_pre_TD if layer + 1 < len(layers) else record.resid_final_TD
    rec = layers[layer]
    return (after[pos] - rec.resid_pre_TD[pos] - rec.mlp_out_TD[pos]).double()


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
        rows.append(_attention_output(record, lower, pos)[None])
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
    w_D = block.input_layernorm.weight.detach().double() * rec.attn_norm.scale_T1[pos].double()
    weight_dD, bias_d = _head_rows(proj, head, attn.head_dim)
    out_Nd = (rows_ND * w_D) @ weight_dD.T
    out_Nd[-1] += weight_dD @ rec.attn_norm.fix_TD[pos].double() + bias_d
    return found, _rotate(out_Nd, cos_sin[0][pos], cos_sin[1][pos])


def _attention_input(block, rep: Replacement, layer: int) -> torch.Tensor:
    """[T, D] the input norm's output as the replacement model computes it (equal to the recorded one)."""
    rec = rep.record.layers[layer]
    return block.input_layernorm.weight.detach() * (rec.resid_pre_TD * rec.attn_norm.scale_T1) + rec.attn_norm.fix_TD


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
    constant_T = _constants(rep, constant_T)
    block = decoder_blocks(model)[spot.layer]
    attn = attention_module(block)
    cos_sin = rotary(model, rep.record.ids_T.numel(), rep.record.embed_TD)
    q_found, Q_Nd = _side_vectors(block, rep, spot.layer, spot.query_pos, bool(constant_T[spot.query_pos]),
                                  attn.q_proj, spot.head, cos_sin)  # fmt: skip
    k_found, K_Md = _side_vectors(block, rep, spot.layer, spot.key_pos, bool(constant_T[spot.key_pos]),
                                  attn.k_proj, spot.head // _group(model), cos_sin)  # fmt: skip
    score = module_score(model, rep, spot.layer, spot.head, spot.query_pos, spot.key_pos)
    return QkDecomposition(spot, q_found, k_found, attn.scaling * Q_Nd, K_Md, score)


def _rotated_rows(proj: nn.Linear, head: int, d: int, cos_d: Tensor, sin_d: Tensor) -> tuple[Tensor, Tensor]:
    """R_pos W^head [d, D] and R_pos b^head [d]: the head's projection followed by the rotary of one position."""
    weight_dD, bias_d = _head_rows(proj, head, d)
    return _rotate(weight_dD.T, cos_d, sin_d).T, _rotate(bias_d, cos_d, sin_d)


def _attention_input_reads(
    model: nn.Module, rep: Replacement, layer: int, pos_R: Tensor, M_RD: Tensor
) -> tuple[list[Tensor | None], Tensor]:
    """Rows r = M_RD[r] . h[pos_R[r]], h the attention input of ``layer`` in the replacement model: their gradients
    [R, T, D] with respect to the embeddings and to each layer's write (None where unreached), and their values
    with every embedding and write at zero [R] (the part no node provides)."""
    (T, D), n_layers, R = rep.record.embed_TD.shape, len(rep.acts), pos_R.numel()
    like = {"dtype": rep.record.embed_TD.dtype, "device": rep.record.embed_TD.device}
    seen: dict = {}
    handle = attention_module(decoder_blocks(model)[layer]).v_proj.register_forward_pre_hook(
        lambda _m, inputs: seen.__setitem__("h", inputs[0])
    )
    try:
        with torch.enable_grad():
            leaves = [torch.zeros(R, T, D, **like, requires_grad=True) for _ in range(n_layers + 1)]
            replacement_forward(model, rep, leaves[0], leaves[1:], layer)
            values_R = (seen["h"][torch.arange(R, device=pos_R.device), pos_R] * M_RD.to(**like)).sum(-1)
            grads = torch.autograd.grad(values_R.sum(), leaves, allow_unused=True)
    finally:
        handle.remove()
    return list(grads), values_R.detach().double()


def _node_effects(
    rep: Replacement, grads: list[Tensor | None], layer: int, last_pos: int, constant_T: Tensor
) -> tuple[list[Contributor], Tensor, Tensor]:
    """Each node at positions <= ``last_pos`` that can reach ``layer`` (embeddings; features and errors of layers
    below it at positions with nodes), its effect [N, R] on the rows of ``grads``, and the effect [R] of the writes
    at constant positions (which are no nodes)."""
    record, P, R = rep.record, last_pos + 1, next(g.shape[0] for g in grads if g is not None)
    zero = record.embed_TD.new_zeros(R, *record.embed_TD.shape)
    g_embed, *g_writes = (zero if g is None else g for g in grads)
    D = record.embed_TD.shape[1]
    found = [Contributor("embedding", -1, p, int(record.ids_T[p])) for p in range(P)]
    rows = [torch.einsum("rtd,td->tr", g_embed[:, :P], record.embed_TD[:P])]
    traced, const = (~constant_T[:P]).nonzero().flatten(), constant_T[:P].nonzero().flatten()
    const_R = record.embed_TD.new_zeros(R)
    for lower in range(layer):
        g_RTD = g_writes[lower]
        rows.append(torch.einsum("rtd,td->tr", g_RTD[:, traced], rep.errors[lower][traced]))
        found.extend(Contributor("error", lower, p) for p in traced.tolist())
        writes_TD = rep.feature_writes(lower) + rep.errors[lower]
        const_R = const_R + torch.einsum("rtd,td->r", g_RTD[:, const], writes_TD[const])
    for source in range(layer):
        pos_latent = ((rep.acts[source][:P] != 0) & ~constant_T[:P, None]).nonzero()
        if pos_latent.numel() == 0:
            continue
        pos_n, latent_n = pos_latent.unbind(1)
        acts_n, start = rep.acts[source][pos_n, latent_n], rep.output_layers(source).start
        decoder_nX = rep.decoder_rows(source)[latent_n].to(acts_n)
        effect_nR = acts_n.new_zeros(pos_n.numel(), R)
        for out in (o for o in rep.output_layers(source) if o < layer):
            write_nD = acts_n[:, None] * decoder_nX[:, (out - start) * D : (out - start + 1) * D]
            every_RTn = g_writes[out] @ write_nD.T
            effect_nR += every_RTn[:, pos_n, torch.arange(pos_n.numel(), device=pos_n.device)].T
        rows.append(effect_nR)
        found.extend(Contributor("feature", source, p, f) for p, f in pos_latent.tolist())
    return found, torch.cat(rows).double(), const_R.double()


@torch.no_grad()
def decompose_through_attention(
    model: nn.Module, rep: Replacement, spot: HeadSpot, constant_T: Tensor | None = None, batch_size: int = 32
) -> QkDecomposition:
    """Like ``decompose_score``, with every attention output attributed through the frozen patterns to the nodes
    at earlier positions: the contributors are the graph's nodes (features, errors, embeddings) at positions up
    to the query (the key), and per side two terms no node provides: ``constant`` (what the MLPs write at the
    constant positions, BOS's above all, carried over by attention) and ``bias`` (decoder biases, norm rounding,
    projection bias, carried the same way). Rows of ``batch_size`` query and key components share a backward pass."""
    check_llama(model)
    constant_T = _constants(rep, constant_T)
    attn = attention_module(decoder_blocks(model)[spot.layer])
    d = attn.head_dim
    cos, sin = rotary(model, rep.record.ids_T.numel(), rep.record.embed_TD)
    p, k = spot.query_pos, spot.key_pos
    M_q, b_q = _rotated_rows(attn.q_proj, spot.head, d, cos[p], sin[p])
    M_k, b_k = _rotated_rows(attn.k_proj, spot.head // _group(model), d, cos[k], sin[k])
    M_RD, device = torch.cat([M_q, M_k]), rep.record.ids_T.device
    pos_R = torch.tensor([p] * d + [k] * d, device=device)
    effects, bias, constant = [], [], []
    for start in range(0, 2 * d, batch_size):
        rows = slice(start, start + batch_size)
        grads, zero_R = _attention_input_reads(model, rep, spot.layer, pos_R[rows], M_RD[rows])
        found, effect_NR, const_R = _node_effects(rep, grads, spot.layer, p, constant_T)
        effects.append(effect_NR)
        bias.append(zero_R)
        constant.append(const_R)
    effect_N2d, bias_2d, const_2d = torch.cat(effects, 1), torch.cat(bias) + torch.cat([b_q, b_k]), torch.cat(constant)
    on_key = torch.tensor([c.pos <= k for c in found], device=effect_N2d.device)
    Q_Nd = torch.cat([effect_N2d[:, :d], const_2d[None, :d], bias_2d[None, :d]])
    K_Md = torch.cat([effect_N2d[on_key, d:], const_2d[None, d:], bias_2d[None, d:]])
    q_found = (*found, Contributor("constant", spot.layer, p), Contributor("bias", spot.layer, p))
    k_found = (
        *(c for c in found if c.pos <= k),
        Contributor("constant", spot.layer, k),
        Contributor("bias", spot.layer, k),
    )
    score = module_score(model, rep, spot.layer, spot.head, p, k)
    return QkDecomposition(spot, q_found, k_found, attn.scaling * Q_Nd, K_Md, score, through_attention=True)


def _constants(rep: Replacement, constant_T: Tensor | None) -> Tensor:
    """``constant_T`` or, when None, position 0 alone."""
    if constant_T is not None:
        return constant_T.to(rep.record.ids_T.device, torch.bool)
    default = torch.zeros_like(rep.record.ids_T, dtype=torch.bool)
    default[0] = True
    return default


def _post_norm(block: nn.Module, rep: Replacement, layer: int, pos: int) -> Tensor:
    """[D] the frozen post-attention norm at ``pos`` as a diagonal: w * s_pos."""
    return block.post_attention_layernorm.weight.detach() * rep.record.layers[layer].mlp_norm.scale_T1[pos]


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
    model: nn.Module,
    rep: Replacement,
    graph: Graph,
    node_indices: list[int],
    heads_per_target: int = 3,
    through_attention: bool = True,
) -> list[TargetQk]:
    """For each target node, its ``heads_per_target`` strongest (head, key) spots, their scores decomposed
    (``decompose_through_attention``, or ``decompose_score`` with ``through_attention=False``)."""
    check_llama(model)
    constant_T = graph.constant_positions.to(rep.record.ids_T.device)
    decompose = decompose_through_attention if through_attention else decompose_score
    traced = []
    for index in node_indices:
        spots = strongest_heads(model, rep, node_readout(model, rep, graph, index), heads_per_target)
        traced.append(TargetQk(index, tuple(decompose(model, rep, spot, constant_T) for spot in spots)))
    return traced


def _top(values: torch.Tensor, n: int) -> list[int]:
    """Indices of the ``n`` largest |values|, largest first."""
    return values.abs().flatten().topk(min(n, values.numel())).indices.tolist()


def qk_tracing_results(dec: QkDecomposition, top: int = 10) -> dict[str, list]:
    """Neuronpedia's form: the ``top`` pairs and marginals of largest magnitude (signed values), by node id."""
    q_ids, k_ids = [c.node_id for c in dec.q_contributors], [c.node_id for c in dec.k_contributors]
    pairs = [[q_ids[i], k_ids[j], value] for i, j, value in dec.top_pairs(top)]
    q_top = [[q_ids[i], float(dec.q_marginal[i])] for i in _top(dec.q_marginal, top)]
    k_top = [[k_ids[i], float(dec.k_marginal[i])] for i in _top(dec.k_marginal, top)]
    return {"pair_wise_contributors": pairs, "top_q_marginal_contributors": q_top, "top_k_marginal_contributors": k_top}


def _side_clerp(c: Contributor) -> str:
    return {
        "attention": f"L{c.layer} attention output",
        "mlp": f"L{c.layer} MLP output (constant position)",
        "skip": f"L{c.layer} transcoder skip",
        "constant": f"MLP writes at constant positions (BOS) reaching L{c.layer} q/k through attention",
        "bias": f"biases reaching L{c.layer} q/k (decoder biases, norm rounding, projection bias)",
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
                            "model_score": dec.model_score, "through_attention": dec.through_attention,
                            "qk_tracing_results": results})  # fmt: skip
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
