"""The peak memory and the time of an attribution graph, from its shape alone, before any work is done.

Pure arithmetic on the numbers a trace knows before the model loads. Symbols:

    T prompt tokens (BOS included)      L layers           D d_model         V vocabulary
    H attention heads (D / 64 unknown)  F latents a layer  a active latents per token per layer
    R --batch-size                      M --max-feature-nodes                G target logits (<= 10)
    C label tokens (--label-contexts x context length)    P model parameters (2VD + 12LD^2 unknown)
    O output layers a feature writes, on average (1; (L+1)/2 for a cross-layer transcoder)

``a`` is k for TopK transcoders (exact); for other activations the caller bounds it (twice the
recorded L0, or F when nothing is recorded). Counts, as ``attribution`` lays the graph out:

    active features   n = L * T * a
    feature nodes     m = min(n, M)
    source columns    S = n + L*T + T                  (features, error nodes, tokens)
    graph nodes       N = m + L*T + T + G
    backward passes   B = ceil(G / R) + ceil(m / R)

Memory, in numbers (4 bytes each in float32, 8 with ``trace --float64``), what stays while the
stages run plus the largest stage:

    weights   = P + L * ((1 + O) FD + D^2 + 2F + D)     model and transcoders (skip included)
    prompt    = T*V + L*(6TD + H*T^2) + L*T*F + L*T*D + n*O*D
                (logits, the record with every head's pattern, dense codes, errors, feature writes)
    backward  = 2 (m + G) S + m D + R T D (15 L + 3) + R T n / L
                (rows kept, twice while selecting; readout vectors; one pass's autograd graph,
                 leaves and gradients; one layer's write effects g @ writes^T)
    assemble  = (m + G) S + m N + N^2                  (rows, the chosen columns, the adjacency)
    prune     = 12 N^2                                 (|A|, normalized and masked copies, the sort
                                                        of N^2 edge scores with int64 indices)
    labels    = 2 N^2 + C * min(m, L F)                (adjacency and masks, per-token latent values)

    peak = 4 (or 8) bytes * (weights + max(prompt + max(backward, assemble), prune, labels)) + RUNTIME_BYTES

The prompt's record and replacement are freed once the adjacency is built, before pruning.

Time, in floating-point operations. A pass runs the frozen linear model (value, output and skip
projections, at most 3 D^2 a token and layer, and the pattern times values) to the deepest target's
layer, half the layers on average, and back through the same products once (no weight gradients),
then multiplies each layer's gradient with its features' writes:

    record    = 2 P T + 4 L T^2 D + 4 L T D F
    pass      = 6 R L T D^2 + 2 R L T^2 D + 2 R T D n
    select    = sum over the ceil(M/R) batches b of 2 f_b S + 2 (L+2) f_b^2,   f_b = G + b R
                (only when n > M: each batch re-reads the influence of the rows so far)
    prune     = 4 (L+2) N^2 + 4 N^2 log2(N^2)
    labels    = 2 P C + 2 C L D F

    seconds = (record + B * pass + select + prune + labels) / (EFFICIENCY * measured FLOP/s)
              + B * L * PASS_LAYER_S
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

BYTES_PER_NUMBER = 4
"""Tracing runs in float32."""
EFFICIENCY = 1.0
"""Tracing's FLOP/s over a large matrix product's (set from the README's SmolLM2 traces on a 2-core CPU
measuring ~130 GFLOP/s: 12 s for 7 tokens, 39 s for 33; with PASS_LAYER_S this formula says 13 s and 57 s)."""
PASS_LAYER_S = 3e-3
"""Fixed cost of one layer in one backward pass (small ops, kernel launches, Python), seconds; several
times more on a CPU shared with other jobs."""
GiB = 1024**3
RUNTIME_BYTES = 128 * 2**20
"""What a trace adds whatever its size: library and allocator work buffers, the document's Python objects
(the tiny test run's 8-token trace peaked ~96 MB above the process's RSS after its imports)."""


@dataclass(frozen=True)
class GraphShape:
    """What sets a graph's size: the prompt, the model, the transcoders and the trace options."""

    n_tokens: int
    """T: prompt tokens, BOS included."""
    n_layers: int
    """L."""
    d_model: int
    """D."""
    vocab: int
    """V."""
    d_sae: int
    """F: latents of one layer's transcoder (the widest)."""
    active_per_token: float
    """a: active latents per token and layer (k for TopK; a bound otherwise)."""
    batch_size: int = 32
    """R: target rows per backward pass."""
    max_feature_nodes: int = 2000
    """M."""
    n_logits: int = 10
    """G: target logits (10, the most ``target_logits`` takes; 1 with --target)."""
    label_tokens: int = 0
    """C: tokens the feature labels read."""
    n_heads: int = 0
    """H (0: D // 64)."""
    n_params: int = 0
    """P (0: 2VD + 12LD^2, a Llama-shaped guess)."""
    decoder_outputs: float = 1.0
    bytes_per_number: int = BYTES_PER_NUMBER
    """4 (float32, the default) or 8 (``trace --float64``)."""
    """O: output layers a feature writes, on average (1 per-layer; (L+1)/2 for a cross-layer transcoder)."""

    def __post_init__(self):
        for name in ("n_tokens", "n_layers", "d_model", "vocab", "d_sae", "batch_size", "n_logits"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.active_per_token <= self.d_sae:
            raise ValueError(f"active_per_token must be in (0, d_sae={self.d_sae}], got {self.active_per_token}")
        if not 1 <= self.decoder_outputs <= self.n_layers:
            raise ValueError(f"decoder_outputs must be in [1, n_layers={self.n_layers}], got {self.decoder_outputs}")
        if self.max_feature_nodes < 0 or self.label_tokens < 0:
            raise ValueError("max_feature_nodes and label_tokens must be >= 0")

    @property
    def heads(self) -> int:
        return self.n_heads or max(1, self.d_model // 64)

    @property
    def params(self) -> int:
        return self.n_params or 2 * self.vocab * self.d_model + 12 * self.n_layers * self.d_model**2


@dataclass(frozen=True)
class Estimate:
    """A graph's expected size, peak memory and time (see the module docstring for the formulas)."""

    n_active: int
    n_feature_nodes: int
    n_nodes: int
    n_backward_passes: int
    peak_bytes: int
    stages: dict[str, int] = field(default_factory=dict)
    """Numbers (not bytes) of weights, prompt and each stage."""
    flops: dict[str, float] = field(default_factory=dict)
    """Operations per stage: record, backward, select, prune, labels."""

    def seconds(self, flops_per_s: float, n_layers: int) -> float:
        """Expected wall time at ``flops_per_s`` (a measured matrix-product rate)."""
        return sum(self.flops.values()) / (EFFICIENCY * flops_per_s) + self.n_backward_passes * n_layers * PASS_LAYER_S


def _memory(s: GraphShape, n: int, m: int, S: int, N: int) -> dict[str, int]:
    T, L, D, F, R, G = s.n_tokens, s.n_layers, s.d_model, s.d_sae, s.batch_size, s.n_logits
    return {
        "weights": s.params + L * (round((1 + s.decoder_outputs) * F * D) + D * D + 2 * F + D),
        "prompt": T * s.vocab
        + L * (6 * T * D + s.heads * T * T)
        + L * T * F
        + L * T * D
        + round(n * s.decoder_outputs * D),
        "backward": 2 * (m + G) * S + m * D + R * T * D * (15 * L + 3) + R * T * n // L,
        "assemble": (m + G) * S + m * N + N * N,
        "prune": 12 * N * N,
        "labels": 2 * N * N + s.label_tokens * min(m, L * F),
    }


def _select_flops(s: GraphShape, n: int, S: int) -> float:
    if n <= s.max_feature_nodes:
        return 0.0
    b, R, G = math.ceil(s.max_feature_nodes / s.batch_size), s.batch_size, s.n_logits
    filled = b * G + R * b * (b - 1) // 2  # sum of f_b = G + bR over the batches
    filled_sq = b * G * G + G * R * b * (b - 1) + R * R * (b - 1) * b * (2 * b - 1) // 6
    return 2.0 * filled * S + 2.0 * (s.n_layers + 2) * filled_sq


def _flops(s: GraphShape, n: int, S: int, N: int, passes: int) -> dict[str, float]:
    T, L, D, F, R = s.n_tokens, s.n_layers, s.d_model, s.d_sae, s.batch_size
    one_pass = 6.0 * R * L * T * D * D + 2.0 * R * L * T * T * D + 2.0 * R * T * D * n
    return {
        "record": 2.0 * s.params * T + 4.0 * L * T * T * D + 4.0 * L * T * D * F,
        "backward": passes * one_pass,
        "select": _select_flops(s, n, S),
        "prune": 4.0 * (L + 2) * N * N + 4.0 * N * N * math.log2(max(N * N, 2)),
        "labels": 2.0 * s.params * s.label_tokens + 2.0 * s.label_tokens * L * D * F,
    }


def estimate(shape: GraphShape) -> Estimate:
    """The counts, peak memory and operations of tracing a prompt of this shape."""
    T, L, R, G = shape.n_tokens, shape.n_layers, shape.batch_size, shape.n_logits
    n = math.ceil(L * T * shape.active_per_token)
    m = min(n, shape.max_feature_nodes)
    S, N = n + L * T + T, m + L * T + T + G
    passes = math.ceil(G / R) + math.ceil(m / R)
    stages = _memory(shape, n, m, S, N)
    during = stages["prompt"] + max(stages["backward"], stages["assemble"])
    peak = shape.bytes_per_number * (stages["weights"] + max(during, stages["prune"], stages["labels"])) + RUNTIME_BYTES
    return Estimate(n, m, N, passes, peak, stages, _flops(shape, n, S, N, passes))


def largest_fitting(shape: GraphShape, field_name: str, free_bytes: int, lowest: int = 1) -> int | None:
    """The largest value of ``field_name`` (e.g. "n_tokens") from ``lowest`` up to its current one whose peak
    fits in ``free_bytes``; None when not even ``lowest`` fits."""
    low, high = lowest, getattr(shape, field_name)
    if estimate(replace(shape, **{field_name: low})).peak_bytes > free_bytes:
        return None
    while low < high:
        middle = (low + high + 1) // 2
        fits = estimate(replace(shape, **{field_name: middle})).peak_bytes <= free_bytes
        low, high = (middle, high) if fits else (low, middle - 1)
    return low
