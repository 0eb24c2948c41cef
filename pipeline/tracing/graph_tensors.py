"""An unpruned Graph as flat tensors and string metadata (what ``RUN/graphs/NAME.safetensors`` holds).

Any tool can prune again or recompute the scores from it without saescope's classes.

Tensors (N nodes laid out [features, errors, tokens, logits], T positions):
    adjacency         [N, N] direct effects A[target, source]
    node_kind         [N] int8: 0 feature, 1 error, 2 token (embedding), 3 logit
    node_layer        [N] int64: transcoder layer of a feature or error; -1 for tokens; n_layers for logits
    node_position     [N] int64: token position (logits: the last)
    node_latent       [N] int64: a feature's latent; -1 for errors; the vocabulary id of a token or logit
    values, constants [N] each target's value and the part no node provides (values = A.sum(1) + constants)
    activations       [n_features]
    prompt_ids        [T]; constant_positions [T] bool (no feature or error nodes there)
    logit_tokens, logit_probs  [n_logits]
Metadata: format_version, n_layers, n_features, n_errors, n_tokens, n_logits, n_active_features (as text,
the safetensors rule).
"""

from __future__ import annotations

import torch

from pipeline.tracing.attribution import Graph

FORMAT_VERSION = 1
FEATURE, ERROR, TOKEN, LOGIT = range(4)


def node_table(graph: Graph) -> dict[str, torch.Tensor]:
    """Per node: kind, layer, position, latent (see the module docstring)."""
    errors = torch.tensor([graph.error_node(k) for k in range(graph.n_errors)], dtype=torch.long).view(-1, 2)
    positions = torch.arange(graph.n_pos)
    n_logits, minus = graph.n_logits, torch.full((graph.n_pos,), -1)
    kind = [FEATURE] * graph.n_features + [ERROR] * graph.n_errors + [TOKEN] * graph.n_pos + [LOGIT] * n_logits
    features = graph.features.cpu().long()
    layer = torch.cat([features[:, 0], errors[:, 0], minus, torch.full((n_logits,), graph.n_layers)])
    position = torch.cat([features[:, 1], errors[:, 1], positions, torch.full((n_logits,), graph.n_pos - 1)])
    latent = torch.cat([features[:, 2], torch.full((graph.n_errors,), -1), graph.prompt_ids.cpu().long(),
                        graph.logit_tokens.cpu().long()])  # fmt: skip
    return {"node_kind": torch.tensor(kind, dtype=torch.int8), "node_layer": layer, "node_position": position,
            "node_latent": latent}  # fmt: skip


def graph_tensors(graph: Graph) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the unpruned graph, on the CPU and contiguous, ready for safetensors."""
    tensors = {
        "adjacency": graph.adjacency,
        **node_table(graph),
        "values": graph.values,
        "constants": graph.constants,
        "activations": graph.activations,
        "prompt_ids": graph.prompt_ids.long(),
        "constant_positions": graph.constant_positions.bool(),
        "logit_tokens": graph.logit_tokens.long(),
        "logit_probs": graph.logit_probs,
    }
    counts = {
        "format_version": FORMAT_VERSION,
        "n_layers": graph.n_layers,
        "n_features": graph.n_features,
        "n_errors": graph.n_errors,
        "n_tokens": graph.n_pos,
        "n_logits": graph.n_logits,
        "n_active_features": graph.n_active_features,
    }
    cpu = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    return cpu, {key: str(value) for key, value in counts.items()}
