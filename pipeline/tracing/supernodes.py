"""Suggested supernodes: feature nodes of a pruned graph grouped by agreeing signed edge profiles.

Shape legend: N graph nodes, K kept nodes, F feature nodes, G feature nodes of one block, P profile length.

A researcher's hand-made supernode is usually "same role, same token position,
nearby layers": features that read from the same nodes and write to the same
nodes with the same signs. ``suggest_supernodes`` proposes such groups; nobody
else ships them (circuit-tracer and Neuronpedia leave grouping to the reader).

Profiles. Over the pruned graph's kept nodes (all kinds: features, errors, tokens,
logits), a kept feature node's profile is its row of signed incoming direct effects
A[f, kept] concatenated with its column of signed outgoing direct effects
A[kept, f]. Each half is scaled to unit L2 norm (a zero half stays zero) and the
whole divided by sqrt(2), so the cosine of two profiles is the mean of their
incoming cosine and their outgoing cosine: neither side dominates, and a node's
activation (which scales its outgoing column) and its input's size (which scales its
row) drop out. The direct effects are all those among the kept nodes, not only the
kept edges: the edge cut is a per-edge threshold that would zero the small but
consistent part of a profile.

Groups. Complete-link agglomerative clustering on the cosine: the two groups whose
least similar pair is the most similar merge, until no merge keeps every pair of a
group at cosine >= ``threshold``. Two nodes may share a group only at the same
token position and at most ``max_layer_span`` layers apart; complete link makes
that hold for every pair, so a group spans at most ``max_layer_span`` + 1
consecutive layers at one position (what a reader can point at in the graph; a
group across positions would be a pattern over tokens, not one role). Groups of
fewer than ``min_size`` nodes are dropped; the rest are ranked by the summed node
influence of their members (``pruning.Pruned.influence_N``) and kept, in rank
order, while there are at most ``max_groups`` groups and ``max_pinned`` nodes in
all (the Neuronpedia viewer draws a supernode only from pinned nodes and pins at
most 200). Ties break by node order, so the result is deterministic.

Names. From the members' labels (clerps, ``feature_labels``' form
``in1 · in2 → out1 · out2``), per side (what features fire on, what they
promote): a word (a label item stripped and lower-cased, with a letter or digit
outside backslash escapes such as a newline's ``\\n``) counts when at least two
members and at least a third of the group carry it, and scores its share of the
group times log((1 + L) / (1 + l)), L the graph's kept feature labels and l those
that carry it (``label_counts``; a word all of them carry scores 0 and is dropped).
The two best words of each side, shown in their commonest spelling, make
``in · in → out · out``; with none, the name says where the group is, the layers and
the position's token, ``L3–5 " is"`` (``L3–5 @2`` without tokens). A repeated name
gets a `` (2)`` suffix (the viewer keys a supernode by its name).

``with_suggestions`` writes the groups into a graph document: ``qParams.supernodes``
as ``[[name, node_id, ...], ...]`` (Neuronpedia's form), their members appended to
``qParams.pinnedIds``, and ``saescope.suggested_supernodes`` (settings, seconds,
and per group its name, node ids, least pairwise cosine, influence, layers and
position), which marks them as suggestions, apart from the groups a person saves.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch

from pipeline.tracing.graph_json import FEATURE, uncantor
from pipeline.tracing.pruning import Pruned

_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)")


@dataclass(frozen=True)
class GroupSettings:
    """How alike and how close feature nodes must be to be suggested as one supernode."""

    threshold: float = 0.6
    """Every pair in a group has profile cosine >= this (complete link)."""
    max_layer_span: int = 3
    """Every pair in a group is at most this many layers apart (and at the same position)."""
    min_size: int = 2
    """Smaller groups are not suggested."""
    max_groups: int = 30
    """At most this many groups, the most influential."""
    max_pinned: int = 200
    """At most this many nodes in all groups together (the viewer pins at most 200)."""

    def __post_init__(self):
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine between -1 and 1, got {self.threshold}")
        if self.max_layer_span < 0:
            raise ValueError(f"max_layer_span must be >= 0, got {self.max_layer_span}")
        if self.min_size < 2:
            raise ValueError(f"min_size must be at least 2 (a group of one is a node), got {self.min_size}")
        for name in ("max_groups", "max_pinned"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


class Supernode(NamedTuple):
    """One suggested group."""

    name: str
    members: list[int]
    """Feature indices (rows of ``features``), ascending."""
    min_cosine: float
    """The least profile cosine between two members."""
    influence: float
    """Summed node influence of the members."""


def _unit_rows(x_GK: torch.Tensor) -> torch.Tensor:
    return x_GK / x_GK.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x_GK.dtype).tiny)


def profiles(A_NN: torch.Tensor, kept_K: torch.Tensor, rows_G: torch.Tensor) -> torch.Tensor:
    """[G, 2K] unit profiles of nodes ``rows_G``: signed inputs from and outputs to the ``kept_K`` nodes."""
    incoming_GK = A_NN[rows_G[:, None], kept_K[None, :]].double()
    outgoing_GK = A_NN[kept_K[:, None], rows_G[None, :]].T.double()
    return torch.cat([_unit_rows(incoming_GK), _unit_rows(outgoing_GK)], 1) / math.sqrt(2)


def complete_link(sim_GG: torch.Tensor, threshold: float) -> list[list[int]]:
    """Complete-link clusters of ``sim_GG`` (a similarity; -inf forbids a pair) with every pair >= ``threshold``.

    Returns every cluster (singletons included) as ascending indices, ordered by first member.
    """
    n = sim_GG.shape[0]
    S_GG = sim_GG.double().clone()
    S_GG.fill_diagonal_(-math.inf)
    members = [[i] for i in range(n)]
    while n > 1:
        flat = int(torch.argmax(S_GG))
        i, j = divmod(flat, n)
        if not S_GG[i, j] >= threshold:
            break
        i, j = min(i, j), max(i, j)
        members[i] += members[j]
        members[j] = []
        merged = torch.minimum(S_GG[i], S_GG[j])
        S_GG[i], S_GG[:, i] = merged, merged
        S_GG[i, i] = -math.inf
        S_GG[j], S_GG[:, j] = -math.inf, -math.inf
    return [sorted(group) for group in members if group]


def _block_groups(A_NN, kept_K, rows_G, layers_G, threshold, max_span) -> list[tuple[list[int], float]]:
    """(members as indices into rows_G, least pairwise cosine) of one position's clusters."""
    unit_GP = profiles(A_NN, kept_K, rows_G)
    cos_GG = unit_GP @ unit_GP.T
    allowed_GG = (layers_G[:, None] - layers_G[None, :]).abs() <= max_span
    clusters = complete_link(cos_GG.masked_fill(~allowed_GG, -math.inf), threshold)
    out = []
    for group in clusters:
        inner = cos_GG[group][:, group].masked_fill(torch.eye(len(group), dtype=torch.bool), math.inf)
        out.append((group, float(inner.min()) if len(group) > 1 else 1.0))
    return out


def _is_word(item: str) -> bool:
    """A letter or digit outside backslash escapes (labels show a newline as the two characters backslash, n)."""
    return any(c.isalnum() for c in _ESCAPE.sub("", item))


def _words(label: str) -> tuple[list[str], list[str]]:
    """The label's (fires-on, promotes) items, stripped, keeping the words."""
    fires, _, promotes = label.partition("→")
    fires_on, promoted = ([w.strip() for w in side.split("·") if _is_word(w)] for side in (fires, promotes))
    return fires_on, promoted


def _best_words(sides: list[list[str]], graph_count: Counter, n_graph: int, n_best: int = 2) -> list[str]:
    """The group's most informative words on one side (see the module docstring), shown in their commonest form."""
    shown: dict[str, Counter] = {}
    for items in sides:
        for word in items:
            shown.setdefault(word.lower(), Counter())[word] += 1
    share = Counter(key for items in sides for key in {w.lower() for w in items})
    need = max(2, math.ceil(len(sides) / 3))
    scored = []
    for key, count in share.items():
        score = count / len(sides) * math.log((1 + n_graph) / (1 + graph_count[key]))
        if count >= need and score > 1e-12:
            scored.append((-score, -count, key))
    best = [key for *_, key in sorted(scored)[:n_best]]
    return [min(shown[key].items(), key=lambda item: (-item[1], item[0]))[0] for key in best]


class LabelCounts(NamedTuple):
    """How many of a graph's labels carry each word (lower-cased), per side."""

    fires: Counter
    promotes: Counter
    n_labels: int


def label_counts(labels: list[str]) -> LabelCounts:
    """The word counts ``group_name`` weighs a group's words against (the graph's kept feature labels)."""
    parsed = [_words(label) for label in labels]
    fires, promotes = (Counter(key for words in parsed for key in {w.lower() for w in words[side]}) for side in (0, 1))
    return LabelCounts(fires, promotes, len(labels))


def group_name(member_labels: list[str], counts: LabelCounts, fallback: str) -> str:
    """A short name for a group from its members' labels against the graph's ``counts`` (module docstring)."""
    parsed = [_words(label) for label in member_labels]
    fires, promotes = (
        _best_words([words[side] for words in parsed], graph_count, counts.n_labels)
        for side, graph_count in enumerate((counts.fires, counts.promotes))
    )
    if not fires and not promotes:
        return fallback
    return " ".join(part for part in (" · ".join(fires), "→ " + " · ".join(promotes) if promotes else "") if part)


def _place(layers: torch.Tensor, position: int, position_tokens: list[str] | None) -> str:
    """'L3–5 " is"' (or 'L3–5 @2' without the tokens): where a group is."""
    low, high = int(layers.min()), int(layers.max())
    span = f"L{low}" if low == high else f"L{low}–{high}"
    if position_tokens is None or not 0 <= position < len(position_tokens):
        return f"{span} @{position}"
    return f'{span} "{position_tokens[position]}"'


def _unique(names: list[str]) -> list[str]:
    seen: Counter = Counter()
    out = []
    for name in names:
        seen[name] += 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out


def suggest_supernodes(
    A_NN: torch.Tensor,
    node_mask_N: torch.Tensor,
    features_F3: torch.Tensor,
    influence_N: torch.Tensor,
    labels_F: list[str],
    settings: GroupSettings = GroupSettings(),
    position_tokens: list[str] | None = None,
) -> list[Supernode]:
    """Suggested groups of the kept feature nodes (feature i is node i; ``features_F3`` rows: layer, position,
    latent), most influential first; ``labels_F`` name them, ``position_tokens`` (the prompt's tokens as text)
    name a group whose labels share no word (see the module docstring)."""
    n_features = features_F3.shape[0]
    kept_K = node_mask_N.nonzero().flatten()
    kept_features = kept_K[kept_K < n_features]
    layer_F, position_F = features_F3[:, 0].long(), features_F3[:, 1].long()
    found = []
    for position in torch.unique(position_F[kept_features]).tolist():
        rows_G = kept_features[position_F[kept_features] == position]
        for group, least in _block_groups(A_NN, kept_K, rows_G, layer_F[rows_G], settings.threshold,
                                          settings.max_layer_span):  # fmt: skip
            if len(group) >= settings.min_size:
                members = rows_G[group].tolist()
                found.append((float(influence_N[members].sum()), members, least))
    found.sort(key=lambda item: (-item[0], item[1][0]))
    chosen, pinned = [], 0
    for influence, members, least in found:
        if len(chosen) < settings.max_groups and pinned + len(members) <= settings.max_pinned:
            chosen.append((influence, members, least))
            pinned += len(members)
    counts = label_counts([labels_F[i] for i in kept_features.tolist()])
    names = []
    for _, members, _ in chosen:
        fallback = _place(layer_F[members], int(position_F[members[0]]), position_tokens)
        names.append(group_name([labels_F[i] for i in members], counts, fallback))
    return [
        Supernode(name, members, least, influence)
        for name, (influence, members, least) in zip(_unique(names), chosen, strict=True)
    ]


def _feature_ids(document: dict[str, Any]) -> dict[tuple[int, int, int], dict[str, Any]]:
    """(layer, position, latent) -> the document's feature node."""
    out = {}
    for node in document["nodes"]:
        if node["feature_type"] == FEATURE:
            layer, latent = uncantor(int(node["feature"]))
            out[(layer, int(node["ctx_idx"]), latent)] = node
    return out


def with_suggestions(
    document: dict[str, Any],
    A_NN: torch.Tensor,
    pruned: Pruned,
    features_F3: torch.Tensor,
    settings: GroupSettings = GroupSettings(),
) -> dict[str, Any]:
    """The document (changed in place and returned) with suggested supernodes (see the module docstring).

    Labels are the clerps of the document's nodes; ``A_NN``, ``pruned`` and ``features_F3`` are the graph's.
    """
    started = time.perf_counter()
    by_key = _feature_ids(document)
    keys = [tuple(row) for row in features_F3.tolist()]
    labels = [by_key[key]["clerp"] if key in by_key else "" for key in keys]
    tokens = document.get("metadata", {}).get("prompt_tokens")
    groups = suggest_supernodes(A_NN, pruned.node_mask_N, features_F3, pruned.influence_N, labels, settings, tokens)
    entries = [[group.name, *(by_key[keys[i]]["node_id"] for i in group.members)] for group in groups]
    q_params = document["qParams"]
    q_params["supernodes"] = [*q_params.get("supernodes", []), *entries]
    pinned = list(q_params.get("pinnedIds", []))
    q_params["pinnedIds"] = pinned + [i for entry in entries for i in entry[1:] if i not in pinned]
    described = [
        {
            "name": group.name,
            "node_ids": entry[1:],
            "min_cosine": round(group.min_cosine, 4),
            "influence": group.influence,
            "layers": [keys[group.members[0]][0], keys[group.members[-1]][0]],
            "position": keys[group.members[0]][1],
        }
        for group, entry in zip(groups, entries, strict=True)
    ]
    document.setdefault("saescope", {})["suggested_supernodes"] = {
        "settings": asdict(settings),
        "seconds": round(time.perf_counter() - started, 3),
        "groups": described,
    }
    return document
