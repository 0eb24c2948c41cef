"""QK tracing: why a head attended from a target's position to a key position, in graph nodes.

Shape legend: T positions, D d_model, H heads, d head_dim, N contributors at one position.

The replacement model (``replacement``) freezes attention patterns, so a graph shows what a
head moved between positions but not why it attended there. The pre-softmax score of head h
of layer L at (query p, key k) is bilinear in the residual streams x_p and x_k entering L:

    score = scaling * [R_p N^q_ph (W_q^h n_p(x_p) + b_q^h)] . [R_k N^k_kh' (W_k^h' n_k(x_k) + b_k^h')]

with n_p the attention norm of the family (``pipeline.lm.families``), its 1/rms (1/std) s_p frozen
as the replacement model freezes it, plus ``fix_p`` the recorded rounding term; R_p the rotary
rotation of position p (rotate-half; linear given p); h' the key head that query head h reads
(grouped-query attention). Per family (each tested in ``tests/test_families.py``):

  * Llama, Mistral: q_proj/k_proj without bias. Qwen2 (and Mistral/Llama checkpoints with
    ``attention_bias``): the q/k biases b^h are constants, carried in the ``bias`` term.
  * Qwen3, Gemma 3: the q/k norm N (RMSNorm over head_dim per head, w * y / rms(y); Gemma:
    (1 + w) * y / rms(y)) is NOT linear in y. As the replacement model freezes every norm, its
    1/rms is frozen per (position, head) at the query (key) the model computed, which makes it a
    diagonal map; the norm's float32 rounding (recorded minus recomputed) goes into ``bias``.
    The score is exact at the prompt; the pairs are the linearization at these frozen scales.
  * Gemma 2 (and Gemma 3 when configured): the attention soft-cap c * tanh(score / c) is not
    bilinear, so the PRE-cap score is decomposed; the pattern is the softmax of the capped one.
  * GPT-2: one Conv1D ``c_attn`` [D, 3D] (q, k, v thirds), no rotary (R = identity: learned
    positions are in the embeddings, which are contributors); LayerNorm's centering x - mean x
    is linear and kept live, its bias is in ``bias``; scaling includes 1/(layer + 1) if set.
  * GPT-NeoX: one Linear ``query_key_value`` laid out per head as [q | k | v]; partial rotary
    (the first rotary_pct of each head's dimensions rotated, the rest passed through); its
    parallel residual does not change attention's input.

Sliding windows only mask keys (inside the frozen pattern). ``model_score`` is the score from the
queries and keys the model's own attention module hands its attention function on the prompt
(``model_queries_keys``), which the decomposition is tested against. Query and key are affine in
the residual streams, so the score splits into pairs
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
carried over by attention) and ``{L}_bias_{p}`` (decoder biases, norm biases and rounding terms,
the q/k projection bias, the frozen q/k norm's rounding). Each node's part of the query (key) is
its write times the gradient of the query (key) components: 2 x head_dim rows of backward passes
through ``replacement_forward``.

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

    effect = P[h, p, k] * v(n(x_k))^h' . (W_O^h)^T N_post^T g_l

with v the value projection (bias included), W_O the output projection, N_post Gemma's frozen
post-attention norm (identity elsewhere), and g_l the gradient of the target with respect to the
residual stream right after attention l at p: one backward pass through ``replacement_forward``
to the write after MLP l, chained back through the frozen pre-MLP norm and the transcoder's skip
(the only path through MLP l that is not frozen; none with GPT-NeoX's parallel residual, where
the MLP reads the block's input); for a feature target and l = L, g_L is its encoder row through
that norm. Over heads and keys the effects sum to the target's change when attention l's pattern
row at p is zeroed. The strongest effects (either sign) are decomposed.

Families (``check_qk``): every family of ``pipeline.lm.families``; any other model raises a
ValueError, and ``saescope trace`` records why in ``saescope.qk_skipped``.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.lm.families import Family, child, known_family, supported_types
from pipeline.lm.hooks import decoder_blocks
from pipeline.tracing.attribution import Graph, Readouts, feature_readouts, logit_readouts
from pipeline.tracing.graph_json import EMBEDDING, ERROR, FEATURE, cantor, node_entry
from pipeline.tracing.pruning import Pruned
from pipeline.tracing.replacement import (
    FrozenNorm,
    Replacement,
    build_replacement,
    freeze_norm,
    frozen_norm,
    output_projection,
    record_prompt,
    recording_attention_call,
    replacement_forward,
    value_vectors,
)

QK_ATTENTION = "saescope_qk"
"""Name of the attention function that keeps the queries and keys a model computes (``model_queries_keys``)."""
SIDE_KINDS = {
    "attention": "attention output",
    "mlp": "mlp output",
    "skip": "transcoder skip",
    "constant": "constant positions",
    "bias": "bias",
}
"""Contributor kinds that are not graph nodes, and their ``feature_type`` in ``qk_only_nodes``."""


_NEEDED = {
    "split": ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"),
    "gpt2": ("c_attn", "c_proj", "head_dim", "split_size"),
    "neox": ("query_key_value", "dense", "head_size"),
}


def check_qk(model: nn.Module) -> Family:
    """The model's family, or a ValueError unless this module can decompose its queries and keys."""
    family = known_family(model)
    if family is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(
            f"QK tracing supports the families of pipeline/lm/families.py ({supported_types()}), "
            f"got {model_type!r}: trace with --qk-targets 0"
        )
    attn = child(decoder_blocks(model)[0], family.attention)
    missing = [name for name in (*_NEEDED[family.value_layout], "scaling") if not hasattr(attn, name)]
    if missing:
        raise ValueError(
            f"QK tracing cannot read {family.name}'s attention: {type(attn).__name__} lacks {', '.join(missing)} "
            "(trace with --qk-targets 0)"
        )
    return family


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


@dataclass(frozen=True)
class ModelQk:
    """What one attention module computed on the prompt, kept from inside the model's own forward."""

    query_HTd: Tensor
    """The queries its attention function received (projected, q-normed, rotated)."""
    key_hTd: Tensor
    """The keys (one per key head)."""
    scaling: float
    cos_sin: tuple[Tensor, Tensor] | None
    """The rotary (cos, sin) [T, r] the block handed the module (r <= head_dim); None without rotary."""


@contextmanager
def _keeping_queries_keys(model: nn.Module, attn: nn.Module, seen: dict):
    """While open, ``attn`` hands its queries, keys and scaling to ``seen`` (eager attention in every module)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    def attend(module, query, key, value, attention_mask, scaling=None, **kwargs):
        if module is attn:
            seen.update(query=query[0], key=key[0], scaling=query.shape[-1] ** -0.5 if scaling is None else scaling)
        return recording_attention_call(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    def keep_rotary(_m, _args, kwargs):
        seen["cos_sin"] = kwargs.get("position_embeddings")

    AttentionInterface.register(QK_ATTENTION, attend)
    AttentionMaskInterface.register(QK_ATTENTION, eager_mask)
    previous = model.config._attn_implementation
    handle = attn.register_forward_pre_hook(keep_rotary, with_kwargs=True)
    model.set_attn_implementation(QK_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        handle.remove()


@torch.no_grad()
def model_queries_keys(model: nn.Module, ids_T: Tensor, layer: int) -> ModelQk:
    """One forward of the model on the prompt: the queries, keys, scaling and rotary of attention ``layer``."""
    family = check_qk(model)
    seen: dict = {}
    with _keeping_queries_keys(model, child(decoder_blocks(model)[layer], family.attention), seen):
        model(input_ids=ids_T[None], use_cache=False)
    cos_sin = seen.get("cos_sin")
    if cos_sin is not None:
        cos_sin = (cos_sin[0][0], cos_sin[1][0])
    return ModelQk(seen["query"], seen["key"], float(seen["scaling"]), cos_sin)


def _rotate(x_Nd: Tensor, cos_sin: tuple[Tensor, Tensor] | None, pos: int) -> Tensor:
    """The rotary of position ``pos`` on the first r dimensions (rotate-half; GPT-NeoX's partial rotary leaves
    the rest as they are); nothing without rotary."""
    if cos_sin is None:
        return x_Nd
    cos_r, sin_r = (c[pos].double() for c in cos_sin)
    r = cos_r.shape[-1]
    x_Nr, rest = x_Nd[..., :r], x_Nd[..., r:]
    rotated = torch.cat((-x_Nr[..., r // 2 :], x_Nr[..., : r // 2]), dim=-1)
    return torch.cat((x_Nr * cos_r + rotated * sin_r, rest), dim=-1)


def head_dim(family: Family, attn: nn.Module) -> int:
    """The attention module's head dimension (GPT-NeoX calls it ``head_size``)."""
    return attn.head_size if family.value_layout == "neox" else attn.head_dim


def _proj_rows(family: Family, attn: nn.Module, side: str, head: int) -> tuple[Tensor, Tensor]:
    """This head's query (``side`` "q") or key ("k") projection [d, D] and its bias [d] (zeros without one),
    float64, in each family's layout: q_proj/k_proj; GPT-2's Conv1D c_attn [D, 3D] (q, k, v thirds);
    GPT-NeoX's query_key_value, per head [q | k | v]."""
    d = head_dim(family, attn)
    if family.value_layout == "gpt2":
        start = (attn.split_size if side == "k" else 0) + head * d
        cols = slice(start, start + d)
        weight, bias = attn.c_attn.weight[:, cols].T, attn.c_attn.bias[cols]
    elif family.value_layout == "neox":
        layer, which = attn.query_key_value, int(side == "k")
        weight = layer.weight.view(-1, 3, d, layer.weight.shape[-1])[head, which]
        bias = None if layer.bias is None else layer.bias.view(-1, 3, d)[head, which]
    else:
        proj = attn.q_proj if side == "q" else attn.k_proj
        weight = proj.weight[head * d : (head + 1) * d]
        bias = None if proj.bias is None else proj.bias[head * d : (head + 1) * d]
    weight = weight.detach().double()
    return weight, (weight.new_zeros(d) if bias is None else bias.detach().double())


def head_map(
    family: Family, attn: nn.Module, side: str, head: int, h_D: Tensor, cos_sin: tuple[Tensor, Tensor] | None, pos: int
) -> tuple[Tensor, Tensor]:
    """(M [d, D], b [d]) float64: the head's query or key at ``pos`` as M h + b of attention's input h: the
    projection rows and bias; Qwen3's and Gemma 3's q/k norm (w * x / rms(x) per head, not linear in x) with its
    1/rms frozen at the recorded query (key) of this position and head, as the replacement model freezes its
    norms, which makes it linear, and its float rounding kept in b; then the rotary of ``pos``. Exact at the
    recorded input ``h_D``."""
    weight_dD, bias_d = _proj_rows(family, attn, side, head)
    norm = getattr(attn, f"{side}_norm", None)
    fix_d = bias_d.new_zeros(bias_d.shape)
    if norm is not None:
        raw_1d = (weight_dD @ h_D.double() + bias_d)[None]
        frozen = freeze_norm(family.norm, norm, raw_1d, norm(raw_1d.to(norm.weight.dtype)).double())
        linear = FrozenNorm(frozen.scale_T1, torch.zeros_like(frozen.fix_TD))
        weight_dD = frozen_norm(family.norm, norm, weight_dD.T, linear).T
        bias_d, fix_d = frozen_norm(family.norm, norm, bias_d[None], linear)[0], frozen.fix_TD[0]
    return _rotate(weight_dD.T, cos_sin, pos).T, _rotate(bias_d + fix_d, cos_sin, pos)


def _norm_at(frozen: FrozenNorm, pos: int) -> FrozenNorm:
    return FrozenNorm(frozen.scale_T1[pos : pos + 1].double(), frozen.fix_TD[pos : pos + 1].double())


def _attention_norm(family: Family, block: nn.Module, rep: Replacement, layer: int, pos: int, rows_ND: Tensor):
    """The rows through the frozen attention norm at ``pos``: their linear parts [N, D] and its constant [D]
    (LayerNorm's bias plus the rounding term)."""
    norm, frozen = child(block, family.attn_norm), _norm_at(rep.record.layers[layer].attn_norm, pos)
    constant_1D = frozen_norm(family.norm, norm, rows_ND.new_zeros(1, rows_ND.shape[1]), frozen)
    return frozen_norm(family.norm, norm, rows_ND, frozen) - constant_1D, constant_1D[0]


def _side_vectors(model, rep, layer, pos, constant, side, head, qk: ModelQk) -> tuple[tuple[Contributor, ...], Tensor]:
    """[N, d]: each contributor through the frozen input norm and the head's query (key) map of ``pos``."""
    family = check_qk(model)
    block = decoder_blocks(model)[layer]
    found, rows_ND = residual_contributors(rep, layer, pos, constant)
    linear_ND, constant_D = _attention_norm(family, block, rep, layer, pos, rows_ND)
    h_D = _attention_input(model, rep, layer)[pos]
    M_dD, b_d = head_map(family, child(block, family.attention), side, head, h_D, qk.cos_sin, pos)
    out_Nd = linear_ND @ M_dD.T
    out_Nd[-1] += M_dD @ constant_D + b_d
    return found, out_Nd


def _attention_input(model: nn.Module, rep: Replacement, layer: int) -> Tensor:
    """[T, D] float64: the attention norm's output as the replacement model computes it (equal to the recorded)."""
    family, rec = check_qk(model), rep.record.layers[layer]
    norm = child(decoder_blocks(model)[layer], family.attn_norm)
    return frozen_norm(family.norm, norm, rec.resid_pre_TD, rec.attn_norm).double()


def module_score(
    model: nn.Module, rep: Replacement, layer: int, head: int, q_pos: int, k_pos: int, qk: ModelQk | None = None
) -> float:
    """The pre-softmax score (before Gemma 2's soft-cap) from the queries and keys the model's own attention
    module computed on the prompt (``model_queries_keys``, run here unless ``qk`` is given): scaling * q . k."""
    qk = qk or model_queries_keys(model, rep.record.ids_T, layer)
    return float(qk.scaling * (qk.query_HTd[head, q_pos].double() @ qk.key_hTd[_kv_head(qk, head), k_pos].double()))


def _kv_head(qk: ModelQk, head: int) -> int:
    """The key head that query ``head`` reads (grouped-query attention)."""
    return head // (qk.query_HTd.shape[0] // qk.key_hTd.shape[0])


@torch.no_grad()
def decompose_score(
    model: nn.Module, rep: Replacement, spot: HeadSpot, constant_T: torch.Tensor | None = None
) -> QkDecomposition:
    """The score of ``spot``'s head at (query, key) as the pair matrix of their contributors (module docstring).

    ``constant_T`` [T] bool: positions without graph nodes (default: position 0 only)."""
    check_qk(model)
    constant_T = _constants(rep, constant_T)
    qk = model_queries_keys(model, rep.record.ids_T, spot.layer)
    p, k = spot.query_pos, spot.key_pos
    q_found, Q_Nd = _side_vectors(model, rep, spot.layer, p, bool(constant_T[p]), "q", spot.head, qk)
    k_found, K_Md = _side_vectors(model, rep, spot.layer, k, bool(constant_T[k]), "k", _kv_head(qk, spot.head), qk)
    score = module_score(model, rep, spot.layer, spot.head, p, k, qk)
    return QkDecomposition(spot, q_found, k_found, qk.scaling * Q_Nd, K_Md, score)


def _attention_input_reads(
    model: nn.Module, rep: Replacement, layer: int, pos_R: Tensor, M_RD: Tensor
) -> tuple[list[Tensor | None], Tensor]:
    """Rows r = M_RD[r] . h[pos_R[r]], h the attention input of ``layer`` in the replacement model: their gradients
    [R, T, D] with respect to the embeddings and to each layer's write (None where unreached), and their values
    with every embedding and write at zero [R] (the part no node provides)."""
    (T, D), n_layers, R = rep.record.embed_TD.shape, len(rep.acts), pos_R.numel()
    like = {"dtype": rep.record.embed_TD.dtype, "device": rep.record.embed_TD.device}
    with torch.enable_grad():
        leaves = [torch.zeros(R, T, D, **like, requires_grad=True) for _ in range(n_layers + 1)]
        h_RTD = replacement_forward(model, rep, leaves[0], leaves[1:], layer).attn_in[layer]
        values_R = (h_RTD[torch.arange(R, device=pos_R.device), pos_R] * M_RD.to(**like)).sum(-1)
        grads = torch.autograd.grad(values_R.sum(), leaves, allow_unused=True)
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
    family = check_qk(model)
    constant_T = _constants(rep, constant_T)
    attn = child(decoder_blocks(model)[spot.layer], family.attention)
    qk, h_TD = model_queries_keys(model, rep.record.ids_T, spot.layer), _attention_input(model, rep, spot.layer)
    d, p, k = head_dim(family, attn), spot.query_pos, spot.key_pos
    M_q, b_q = head_map(family, attn, "q", spot.head, h_TD[p], qk.cos_sin, p)
    M_k, b_k = head_map(family, attn, "k", _kv_head(qk, spot.head), h_TD[k], qk.cos_sin, k)
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
    score = module_score(model, rep, spot.layer, spot.head, p, k, qk)
    return QkDecomposition(spot, q_found, k_found, qk.scaling * Q_Nd, K_Md, score, through_attention=True)


def _constants(rep: Replacement, constant_T: Tensor | None) -> Tensor:
    """``constant_T`` or, when None, position 0 alone."""
    if constant_T is not None:
        return constant_T.to(rep.record.ids_T.device, torch.bool)
    default = torch.zeros_like(rep.record.ids_T, dtype=torch.bool)
    default[0] = True
    return default


def _vjp(fn, width: int, g_D: Tensor) -> Tensor:
    """[width] the gradient of g . fn(x) with respect to x (``fn`` affine, [1, 1, width] -> [1, 1, D]): the
    transpose of fn's linear part applied to g."""
    with torch.enable_grad():
        x = g_D.new_zeros(1, 1, width, requires_grad=True)
        (grad,) = torch.autograd.grad((fn(x)[0, 0] * g_D).sum(), x)
    return grad[0, 0]


def _norm_vjp(family: Family, block: nn.Module, role: str, frozen: FrozenNorm, pos: int, g_D: Tensor) -> Tensor:
    """[D] g through the transpose of the frozen norm ``role`` (a family attribute) at ``pos``."""
    norm, at = child(block, getattr(family, role)), _norm_at(frozen, pos)
    return _vjp(lambda x: frozen_norm(family.norm, norm, x, _as_norm(at, x)), g_D.shape[0], g_D)


def _as_norm(frozen: FrozenNorm, like: Tensor) -> FrozenNorm:
    return FrozenNorm(frozen.scale_T1.to(like), frozen.fix_TD.to(like))


def _gradients_after_attention(model: nn.Module, rep: Replacement, readout: Readouts) -> list[torch.Tensor]:
    """Per layer l up to the target's (below n_layers for a logit), the gradient [D] of the target with respect
    to the residual stream right after attention l at the target's position (module docstring). With GPT-NeoX's
    parallel residual the MLP of l reads the block's input, so nothing of attention l reaches it."""
    family = check_qk(model)
    parallel = family.parallel(model.config)
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
        if W_skip is not None and not parallel:
            skip_D = W_skip.detach().to(g_D).T @ g_D
            g_D = g_D + _norm_vjp(family, blocks[lower], "mlp_norm", rep.record.layers[lower].mlp_norm, pos, skip_D)
        grads.append(g_D)
    if stop is not None:
        frozen = rep.record.layers[layer].mlp_norm
        grads.append(0 * vector_D if parallel else _norm_vjp(family, blocks[layer], "mlp_norm", frozen, pos, vector_D))
    return grads


def _output_vjp(family: Family, block: nn.Module, rec, pos: int, g_D: Tensor) -> Tensor:
    """[H * d] g through the transpose of attention's output projection (and Gemma's frozen post-attention norm)."""
    attn = child(block, family.attention)
    width = rec.pattern_HTT.shape[0] * head_dim(family, attn)

    def write(z):
        a = output_projection(family, attn, z.to(next(attn.parameters()).dtype)).to(z)
        if family.attn_post_norm is None:
            return a
        post = _as_norm(_norm_at(rec.attn_post_norm, pos), a)
        return frozen_norm(family.norm, child(block, family.attn_post_norm), a, post)

    return _vjp(write, width, g_D)


@torch.no_grad()
def value_effects(model: nn.Module, rep: Replacement, readout: Readouts) -> torch.Tensor:
    """[n, H, T] float64: per layer l (as ``_gradients_after_attention``), head and key position, the target's
    change through that head's value path from that key into the target's position (zero after it)."""
    family = check_qk(model)
    pos, T = int(readout.pos_R[0]), rep.record.ids_T.numel()
    blocks, effects = decoder_blocks(model), []
    for layer, g_D in enumerate(_gradients_after_attention(model, rep, readout)):
        attn, rec = child(blocks[layer], family.attention), rep.record.layers[layer]
        d, H = head_dim(family, attn), rec.pattern_HTT.shape[0]
        h_kD = _attention_input(model, rep, layer)[: pos + 1].to(rep.record.embed_TD.dtype)
        v_hkd = value_vectors(family, attn, h_kD[None])[0]
        v_kHd = v_hkd.repeat_interleave(H // v_hkd.shape[0], dim=0).transpose(0, 1).double()
        u_Hd = _output_vjp(family, blocks[layer], rec, pos, g_D).view(H, d).double()
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


def qk_target_nodes(graph: Graph, pruned: Pruned, n: int, dense: frozenset[int] = frozenset()) -> list[int]:
    """Adjacency indices of the targets to QK-trace, in this order: the kept feature of highest influence, the
    top logit, then the next kept features by influence; the first ``n`` of them. Features in ``dense`` (dense
    latents, which the page hides by default, often attention sinks at BOS) come after every other feature."""
    kept = pruned.node_mask_N[: graph.n_features].nonzero().flatten()
    by_influence = kept[pruned.influence_N[kept].argsort(descending=True, stable=True)].tolist()
    by_influence = [i for i in by_influence if i not in dense] + [i for i in by_influence if i in dense]
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
    check_qk(model)
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
    dense: frozenset[int] = frozenset(),
) -> None:
    """QK-trace the first ``n_targets`` targets of ``qk_target_nodes`` (``dense`` features last) and ``attach_qk``
    them to ``document``.

    The prompt is recorded again (one forward of the model; the graph keeps no replacement model).
    A model that is not Llama-style is not traced: ``saescope.qk_skipped`` says why.
    """
    try:
        check_qk(model)
    except ValueError as error:
        document["saescope"]["qk_skipped"] = str(error)
        return
    device = next(model.parameters()).device
    rep = build_replacement(record_prompt(model, graph.prompt_ids.to(device)), transcoders)
    traced = trace_qk(model, rep, graph, qk_target_nodes(graph, pruned, n_targets, dense), heads_per_target)
    attach_qk(document, traced, graph, rep, labels)
