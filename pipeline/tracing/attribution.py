"""Direct effects between the nodes of a replacement model: the adjacency matrix of an attribution graph.

Shape legend: R target rows in a batch, T positions, D d_model, F latents, S source columns.

Nodes, in this order: active transcoder features (activation > 0 at (layer, pos), sorted
by layer, position, latent), one error node per (layer, pos) (layer-major), one token
embedding per position, and the target logits of the last position.

Constant positions. Position 0 (BOS) and every position holding a special token, the
positions the transcoders were never trained on (masked out of training, as
``pipeline.lm.packing.special_mask`` masks them), carry no feature and no error nodes:
whatever their MLPs write (features and errors alike) is part of each target's constant.
Their token-embedding nodes stay, as in circuit-tracer (an embedding node at every
position; a BOS embedding still reaches later positions through attention's value path).
circuit-tracer zeroes the features and errors at position 0 when it holds a special
token but keeps those (empty) error nodes in the matrix, and its targets then miss the
BOS MLP's write; saescope drops the nodes and keeps completeness exact by folding
their writes into ``constants``. The other positions' edges are the same either way
(direct effects do not depend on what other sources write).

A source writes into the residual stream: feature f of layer L writes act * W_dec[f]
after layer L's MLP, an error node its frozen error vector there, a token its embedding.
A cross-layer transcoder's feature (l, p, f) writes act * W_dec[l][f, l' - l] after every
MLP l' >= l, so its edge into a target is the sum of those writes' direct effects,
sum over l' >= l of gradient(target at the output of MLP l', p) . act * W_dec[l][f, l' - l]
(as circuit-tracer sums a CLT feature's decoder vectors over output layers).
A target reads a direction: logit token v reads ``W_U[v] - mean_u W_U[u]`` on the final
normed residual at the last position (its value is the logit minus the mean logit, as
circuit-tracer does); feature f of layer L at pos p reads ``W_enc[f]`` on layer L's MLP
input at p (its value is the pre-activation, which equals the activation of an active
feature). In the frozen linear model (``replacement``), feature activations are
constants, so the gradient of a target with respect to the residual stream where a
source writes carries only paths that avoid every other node, and

    A[target, source] = gradient(target) . write(source)       (direct effect)

Each target's value = sum over all sources of A[target, source] + ``constants[target]``,
the part of the replacement model that no node provides: the target in the linear model
with every source's write set to zero (decoder biases, norm rounding terms, the writes
at constant positions), plus the encoder bias ``b_enc[f]`` for a feature target.

Gradients come from batched backward passes: R targets at once, the prompt repeated R
times along the batch, one backward of the sum of the rows' targets.

More than ``max_feature_nodes`` active features: logit rows first; then, batch by batch,
the rows of the not yet visited features with the highest influence on the targets in the
graph of the rows computed so far (``pruning.influence_from_rows``); the features visited
are the graph's feature nodes, the others are dropped (their edges with them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.lm.packing import special_mask
from pipeline.tracing.pruning import influence_from_rows, normalized
from pipeline.tracing.replacement import LinearOutputs, Replacement, replacement_forward


@dataclass(frozen=True)
class Graph:
    """An attribution graph on one prompt; nodes laid out [features, errors, tokens, logits].

    Computed on the model's device, kept on the CPU (as circuit-tracer keeps its edge matrix)."""

    prompt_ids: torch.Tensor
    """Token ids [T]."""
    n_layers: int
    features: torch.Tensor
    """[n_features, 3] (layer, position, latent) of each feature node."""
    activations: torch.Tensor
    """[n_features] activation of each feature node."""
    logit_tokens: torch.Tensor
    """[n_logits] token ids of the target logits (last position)."""
    logit_probs: torch.Tensor
    """[n_logits] their probabilities under the model."""
    adjacency: torch.Tensor
    """[N, N] direct effects A[target, source]."""
    values: torch.Tensor
    """[N] each target's value (feature pre-activation, logit minus mean logit); 0 for errors and tokens."""
    constants: torch.Tensor
    """[N] the part of each target's value no node provides: values = adjacency.sum(1) + constants."""
    n_active_features: int
    """Active features on the prompt (constant positions excluded) before ``max_feature_nodes`` selection."""
    constant_positions: torch.Tensor
    """[T] bool: positions without feature or error nodes (BOS, special tokens); their writes are constants."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage."""
    n_backward_passes: int = 0
    """Batched backward passes the adjacency took."""
    logit_error: float = float("nan")
    """max |replacement-model logits - model logits| at the last position (completeness; set by ``trace``)."""

    @property
    def n_pos(self) -> int:
        return int(self.prompt_ids.numel())

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def error_positions(self) -> torch.Tensor:
        """Positions that have error (and feature) nodes, ascending."""
        return (~self.constant_positions).nonzero().flatten()

    @property
    def n_errors(self) -> int:
        return self.n_layers * int(self.error_positions.numel())

    def error_node(self, k: int) -> tuple[int, int]:
        """(layer, pos) of the k-th error node (layer-major over ``error_positions``)."""
        layer, i = divmod(k, int(self.error_positions.numel()))
        return layer, int(self.error_positions[i])

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.numel())

    def target_weights(self) -> torch.Tensor:
        """[N] the logit probabilities on the logit nodes, 0 elsewhere (the weights of pruning)."""
        weights = torch.zeros(self.adjacency.shape[0], dtype=self.adjacency.dtype, device=self.adjacency.device)
        weights[-self.n_logits :] = self.logit_probs.to(weights)
        return weights


def constant_mask(ids_T: torch.Tensor, special_ids: Sequence[int] = ()) -> torch.Tensor:
    """[T] bool: position 0 and every position holding one of ``special_ids`` (no nodes there)."""
    constant_T = special_mask(ids_T, special_ids) if len(special_ids) else torch.zeros_like(ids_T, dtype=torch.bool)
    constant_T[0] = True
    return constant_T


def target_logits(logits_V: torch.Tensor, target: int | None = None, cover: float = 0.95, at_most: int = 10):
    """(tokens, probs): the fewest most likely tokens whose probability reaches ``cover``, at most ``at_most``;
    or the one ``target`` token."""
    probs_V = logits_V.double().softmax(-1)
    if target is not None:
        if not 0 <= target < probs_V.numel():
            raise ValueError(f"target token {target} out of range: vocabulary has {probs_V.numel()} tokens")
        return torch.tensor([target], device=probs_V.device), probs_V[[target]]
    probs, tokens = probs_V.sort(descending=True)
    n = int((torch.cumsum(probs, 0) - probs < cover).sum().clamp(1, at_most))
    return tokens[:n], probs[:n]


@dataclass(frozen=True)
class Readouts:
    """Target rows: each reads ``vector`` at (``layer``, ``pos``); layer == n_layers means the final normed residual."""

    layer_R: torch.Tensor
    pos_R: torch.Tensor
    vector_RD: torch.Tensor

    def __getitem__(self, rows) -> Readouts:
        return Readouts(self.layer_R[rows], self.pos_R[rows], self.vector_RD[rows])

    def __len__(self) -> int:
        return int(self.layer_R.numel())


def _read(out: LinearOutputs, readouts: Readouts, batch_R: torch.Tensor) -> torch.Tensor:
    points = [*out.mlp_in, *([out.final_BTD] if out.final_BTD is not None else [])]
    stacked_LBTD = torch.stack(points)
    return (stacked_LBTD[readouts.layer_R, batch_R, readouts.pos_R] * readouts.vector_RD).sum(-1)


@dataclass(frozen=True)
class Sources:
    """Every active feature on the prompt (the feature columns before selection) and what each writes."""

    traced_P: torch.Tensor
    """Positions with feature and error nodes (not constant), ascending."""
    features_S3: torch.Tensor
    """(layer, pos, latent), sorted."""
    acts_S: torch.Tensor
    writes: tuple[torch.Tensor, ...]
    """Per source layer [n_L, n_out * D]: act * ``rep.decoder_rows``[latent] of that layer's active features, in
    ``features_S3`` order (n_out = 1 for a per-layer transcoder, L - layer for a cross-layer one)."""


@torch.no_grad()
def active_features(rep: Replacement, constant_T: torch.Tensor) -> Sources:
    """Every (layer, pos, latent) with a positive activation outside ``constant_T``, its activation and its write."""
    features, acts, writes = [], [], []
    for layer, acts_TF in enumerate(rep.acts):
        pos_latent = ((acts_TF > 0) & ~constant_T[:, None]).nonzero()
        values = acts_TF[pos_latent[:, 0], pos_latent[:, 1]]
        features.append(torch.cat([torch.full_like(pos_latent[:, :1], layer), pos_latent], 1))
        acts.append(values)
        writes.append(values[:, None] * rep.decoder_rows(layer)[pos_latent[:, 1]].to(values.dtype))
    return Sources((~constant_T).nonzero().flatten(), torch.cat(features), torch.cat(acts), tuple(writes))


@torch.no_grad()
def logit_readouts(model: nn.Module, rep: Replacement, tokens: torch.Tensor) -> tuple[Readouts, torch.Tensor]:
    """Logit targets at the last position: W_U[v] - mean W_U, and b[v] - mean b as the bias.

    With a final soft-cap (Gemma 2) each logit is z_v times its frozen factor f_v, so the rows
    read f_v W_U[v] - mean_u f_u W_U[u] (f at the last position, ``record.logit_scale_TV``)."""
    dtype, T = rep.record.embed_TD.dtype, rep.record.ids_T.numel()
    head = model.get_output_embeddings()
    W_U = head.weight.to(dtype)
    scale_V = None if rep.record.logit_scale_TV is None else rep.record.logit_scale_TV[-1]
    bias_V = torch.zeros(W_U.shape[0], dtype=dtype, device=W_U.device) if head.bias is None else head.bias.to(dtype)
    if scale_V is not None:
        W_U, bias_V = W_U * scale_V[:, None], bias_V * scale_V
    n = tokens.numel()
    layer_R, pos_R = torch.full((n,), len(rep.acts), device=W_U.device), torch.full((n,), T - 1, device=W_U.device)
    return Readouts(layer_R, pos_R, W_U[tokens] - W_U.mean(0)), bias_V[tokens] - bias_V.mean()


@torch.no_grad()
def feature_readouts(rep: Replacement, features_R3: torch.Tensor) -> tuple[Readouts, torch.Tensor]:
    """Feature targets: W_enc[latent] on the layer's MLP input at pos; bias b_enc[latent]."""
    (_, D), like = rep.record.embed_TD.shape, {"dtype": rep.record.embed_TD.dtype, "device": rep.record.embed_TD.device}
    layer_R, pos_R, latent_R = features_R3.unbind(1)
    vector_RD, bias_R = torch.zeros(len(layer_R), D, **like), torch.zeros(len(layer_R), **like)
    for layer in layer_R.unique().tolist():
        rows = layer_R == layer
        vector_RD[rows] = rep.transcoders[layer].W_enc_FD[latent_R[rows]].to(vector_RD)
        bias_R[rows] = rep.transcoders[layer].b_enc[latent_R[rows]].to(bias_R)
    return Readouts(layer_R, pos_R, vector_RD), bias_R


def _edge_rows(model: nn.Module, rep: Replacement, sources: Sources, readouts: Readouts) -> torch.Tensor:
    """Direct effects [R, S] of every source column on each target row: one batched backward."""
    R, (T, D), n_layers = len(readouts), rep.record.embed_TD.shape, len(rep.acts)
    like = {"dtype": rep.record.embed_TD.dtype, "device": rep.record.embed_TD.device}
    last = int(readouts.layer_R.max())
    with torch.enable_grad():
        leaves = [torch.zeros(R, T, D, **like, requires_grad=True) for _ in range(n_layers + 1)]
        out = replacement_forward(model, rep, leaves[0], leaves[1:], None if last == n_layers else last)
        total = _read(out, readouts, torch.arange(R, device=like["device"])).sum()
        raw = torch.autograd.grad(total, leaves, allow_unused=True)
    grads = [torch.zeros(R, T, D, **like) if g is None else g for g in raw]
    g_embed, g_writes = grads[0], grads[1:]
    feature_cols = [
        _source_effects(rep, layer, raw[1:], g_writes, sources.features_S3[sources.features_S3[:, 0] == layer, 1], w)
        for layer, w in enumerate(sources.writes)
    ]
    error_cols = [
        torch.einsum("rtd,td->rt", g_writes[layer], rep.errors[layer])[:, sources.traced_P] for layer in range(n_layers)
    ]
    token_cols = torch.einsum("rtd,td->rt", g_embed, rep.record.embed_TD)
    return torch.cat([*feature_cols, *error_cols, token_cols], 1)


def _source_effects(rep: Replacement, source: int, raw, g_writes, pos_n: torch.Tensor, write_nX: torch.Tensor):
    """[R, n]: the effects of source layer ``source``'s features, summed over the outputs they write
    (only those the targets' backward reached: a target reading MLP input L sees no write after MLP >= L)."""
    D = g_writes[0].shape[-1]
    outputs = [out for out in rep.output_layers(source) if raw[out] is not None] or [source]
    if len(outputs) == 1:
        return _write_effects(g_writes[outputs[0]], pos_n, write_nX[:, :D])
    g_RTX = torch.cat([g_writes[out] for out in outputs], dim=-1)
    return _write_effects_by_position(g_RTX, pos_n, write_nX[:, : len(outputs) * D])


def _write_effects_by_position(g_RTX: torch.Tensor, pos_n: torch.Tensor, write_nX: torch.Tensor) -> torch.Tensor:
    """[R, n]: g[r, pos_n[i]] . write_nX[i], one product per position (``pos_n`` ascending, as the sources are).

    For wide writes (a CLT feature's, X = (L - l) * D): the all-positions product of
    ``_write_effects`` would cost T times the flops.
    """
    out_Rn = g_RTX.new_zeros(g_RTX.shape[0], pos_n.numel())
    positions, counts = torch.unique_consecutive(pos_n, return_counts=True)
    start = 0
    for pos, count in zip(positions.tolist(), counts.tolist(), strict=True):
        out_Rn[:, start : start + count] = g_RTX[:, pos] @ write_nX[start : start + count].T
        start += count
    return out_Rn


def _write_effects(g_RTD: torch.Tensor, pos_n: torch.Tensor, write_nD: torch.Tensor) -> torch.Tensor:
    """[R, n]: g[r, pos_n[i]] . write_nD[i], as one matrix product then a gather (no [R, n, D] copy)."""
    every_RTn = g_RTD @ write_nD.T
    return every_RTn[:, pos_n, torch.arange(pos_n.numel(), device=pos_n.device)]


def _rows_in_batches(
    model, rep: Replacement, sources: Sources, readouts: Readouts, batch_size: int, tick: Callable[[], None]
) -> list[torch.Tensor]:
    rows = []
    for start in range(0, len(readouts), batch_size):
        rows.append(_edge_rows(model, rep, sources, readouts[start : start + batch_size]))
        tick()
    return rows


def _counter(on_batch: Callable[[int, int], None] | None, total: int) -> Callable[[], None]:
    """A tick to call after each backward pass: ``on_batch(passes done, passes in all)``."""
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_batch is not None:
            on_batch(done, total)

    return tick


@torch.no_grad()
def _values_and_constants(model, rep: Replacement, readouts: Readouts, bias_R: torch.Tensor, constant_T):
    """Each target's value in the real model, and its value with every source's write set to zero
    (the writes at constant positions kept)."""
    record, T, D = rep.record, *rep.record.embed_TD.shape
    zero = torch.zeros(1, T, D, dtype=record.embed_TD.dtype, device=record.embed_TD.device)
    kept_T1 = constant_T[:, None].to(zero.dtype)
    constant_writes = [kept_T1 * (rep.feature_writes(L) + rep.errors[L]) for L in range(len(rep.acts))]
    empty_out = replacement_forward(model, rep, zero, [w[None] for w in constant_writes])
    mlp_ins = tuple(layer.mlp_in_TD[None] for layer in record.layers)
    true_out = LinearOutputs(mlp_ins, record.final_TD[None])
    batch = torch.zeros(len(readouts), dtype=torch.long, device=zero.device)
    return _read(true_out, readouts, batch) + bias_R, _read(empty_out, readouts, batch) + bias_R


def _select_features(
    model: nn.Module,
    rep: Replacement,
    sources: Sources,
    logit_rows: torch.Tensor,
    probs: torch.Tensor,
    budget: int,
    batch: int,
    tick: Callable[[], None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy: visit the unvisited features of highest influence in the partial graph, a batch at a time."""
    (n_logits, n_cols), n_feat = logit_rows.shape, sources.features_S3.shape[0]
    bar_RN = logit_rows.new_zeros(n_logits + budget, n_cols + n_logits)
    raw_RS = logit_rows.new_zeros(budget, n_cols)
    bar_RN[:n_logits, :n_cols] = normalized(logit_rows)
    device = logit_rows.device
    row_nodes = torch.cat(
        [n_cols + torch.arange(n_logits, device=device), torch.zeros(budget, dtype=torch.long, device=device)]
    )
    weights = torch.cat([probs.to(logit_rows), logit_rows.new_zeros(budget)])
    visited, done = torch.zeros(n_feat, dtype=torch.bool, device=device), 0
    while done < budget:
        filled = n_logits + done
        influence = influence_from_rows(bar_RN[:filled], row_nodes[:filled], weights[:filled])
        take = influence[:n_feat].masked_fill(visited, float("-inf")).topk(min(batch, budget - done)).indices
        rows = _edge_rows(model, rep, sources, feature_readouts(rep, sources.features_S3[take])[0])
        tick()
        raw_RS[done : done + take.numel()] = rows
        bar_RN[filled : filled + take.numel(), :n_cols] = normalized(rows)
        row_nodes[filled : filled + take.numel()] = take
        visited[take], done = True, done + take.numel()
    order = row_nodes[n_logits:]
    chosen, position = order.sort()
    return chosen, raw_RS[position]


def attribute(
    model: nn.Module,
    rep: Replacement,
    logit_tokens: torch.Tensor,
    logit_probs: torch.Tensor,
    max_feature_nodes: int = 2000,
    batch_size: int = 32,
    constant_T: torch.Tensor | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> Graph:
    """The attribution graph of a replacement model for the given target logits (see the module docstring).

    ``constant_T`` [T] bool: positions without feature or error nodes (default: position 0 only;
    ``constant_mask`` adds special tokens; all False gives every position its nodes).
    ``on_batch(done, total)``, if given, is called after each backward pass (for a progress bar).
    """
    if max_feature_nodes < 0 or batch_size < 1:
        raise ValueError(f"max_feature_nodes must be >= 0 and batch_size >= 1, got {max_feature_nodes}, {batch_size}")
    start = time.perf_counter()
    ids_T = rep.record.ids_T
    constant_T = constant_mask(ids_T) if constant_T is None else constant_T.to(ids_T.device, torch.bool)
    if constant_T.shape != ids_T.shape:
        raise ValueError(f"constant_T needs one entry per position ({ids_T.numel()}), got {tuple(constant_T.shape)}")
    sources = active_features(rep, constant_T)
    n_active, n_layers, T = sources.features_S3.shape[0], len(rep.acts), rep.record.ids_T.numel()
    n_errors = n_layers * sources.traced_P.numel()
    logit_read, logit_bias = logit_readouts(model, rep, logit_tokens)
    passes = -(-logit_tokens.numel() // batch_size) + -(-min(n_active, max_feature_nodes) // batch_size)
    tick = _counter(on_batch, passes)
    logit_rows = torch.cat(_rows_in_batches(model, rep, sources, logit_read, batch_size, tick))
    if n_active <= max_feature_nodes:
        chosen = torch.arange(n_active, device=logit_rows.device)
        readouts, _ = feature_readouts(rep, sources.features_S3)
        feature_rows = torch.cat([logit_rows[:0], *_rows_in_batches(model, rep, sources, readouts, batch_size, tick)])
    else:
        chosen, feature_rows = _select_features(
            model, rep, sources, logit_rows, logit_probs, max_feature_nodes, batch_size, tick
        )
    columns = torch.cat([chosen, n_active + torch.arange(n_errors + T, device=chosen.device)])
    n_sources = columns.numel()
    A = logit_rows.new_zeros(n_sources + logit_tokens.numel(), n_sources + logit_tokens.numel())
    A[: chosen.numel(), :n_sources] = feature_rows[:, columns]
    A[n_sources:, :n_sources] = logit_rows[:, columns]
    feature_read, feature_bias = feature_readouts(rep, sources.features_S3[chosen])
    values, constants = A.new_zeros(A.shape[0]), A.new_zeros(A.shape[0])
    values[: chosen.numel()], constants[: chosen.numel()] = _values_and_constants(
        model, rep, feature_read, feature_bias, constant_T
    )
    values[n_sources:], constants[n_sources:] = _values_and_constants(model, rep, logit_read, logit_bias, constant_T)
    return Graph(
        prompt_ids=rep.record.ids_T.cpu(),
        n_layers=n_layers,
        features=sources.features_S3[chosen].cpu(),
        activations=sources.acts_S[chosen].cpu(),
        logit_tokens=logit_tokens.cpu(),
        logit_probs=logit_probs.cpu(),
        adjacency=A.cpu(),
        values=values.cpu(),
        constants=constants.cpu(),
        n_active_features=n_active,
        constant_positions=constant_T.cpu(),
        timings={"attribute_s": time.perf_counter() - start},
        n_backward_passes=-(-logit_tokens.numel() // batch_size) + -(-chosen.numel() // batch_size),
    )
