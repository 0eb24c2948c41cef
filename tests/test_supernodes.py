"""Suggested supernodes: complete link, profile cosines, planted groups found exactly, names, the document, the CLI."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from jobs.cli import main
from pipeline.tracing.attribution import Graph
from pipeline.tracing.graph_json import from_json, graph_document, to_json
from pipeline.tracing.pruning import Pruned, cumulative_share
from pipeline.tracing.supernodes import (
    GroupSettings,
    complete_link,
    group_name,
    label_counts,
    profiles,
    suggest_supernodes,
    with_suggestions,
)
from storage.graph_groups import read_graph_json, read_supernodes

A_IN, A_OUT = [0.5, 1.0], [1.0, -0.5]
"""Planted group A reads tokens (t0, t1) and writes logits (l0, l1) like this; B differently."""
B_IN, B_OUT = [1.0, -1.0], [0.2, 1.0]
# (layer, position, latent, scale of inputs, incoming, scale of outputs, outgoing, label)
FEATURES = [
    (0, 1, 10, 1.0, A_IN, 1.0, A_OUT, "Paris · France → Paris"),
    (1, 1, 11, 1.0, A_IN, 1.0, [-1.0, 0.5], "France · the → capital"),  # distractor: A's inputs, opposite outputs
    (1, 1, 12, 3.0, A_IN, 3.0, A_OUT, "France · French → Paris · city"),
    (1, 1, 13, 1.0, B_IN, 1.0, B_OUT, "plus · add → sum"),
    (2, 1, 14, 0.5, A_IN, 2.0, A_OUT, "French · the → Paris"),
    (2, 1, 15, 2.0, B_IN, 0.1, B_OUT, "add · the → sum · total"),
    (1, 2, 16, 1.0, A_IN, 1.0, A_OUT, "Paris · the → Paris"),  # A's profile at another position
    (6, 1, 17, 1.0, A_IN, 1.0, A_OUT, "Paris · the → Paris"),  # A's profile four layers from A's last
    (1, 1, 18, 1.0, A_IN, 1.0, [0.6, 1.0], "the · France → city"),  # near A: cosine 0.54 with each member
]
GROUP_A, GROUP_B, NEAR = [0, 2, 4], [3, 5], 8


def hand_graph() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(A [N, N] laid out [features, tokens t0 t1, logits l0 l1], features [F, 3], labels)."""
    n_f = len(FEATURES)
    A_NN = torch.zeros(n_f + 4, n_f + 4, dtype=torch.float64)
    for i, (_, _, _, s_in, incoming, s_out, outgoing, _) in enumerate(FEATURES):
        A_NN[i, n_f : n_f + 2] = s_in * torch.tensor(incoming, dtype=torch.float64)
        A_NN[n_f + 2 :, i] = s_out * torch.tensor(outgoing, dtype=torch.float64)
    features_F3 = torch.tensor([row[:3] for row in FEATURES])
    return A_NN, features_F3, [row[-1] for row in FEATURES]


def influence(n: int) -> torch.Tensor:
    weights = torch.full((n,), 0.01, dtype=torch.float64)
    weights[GROUP_A] = 0.3
    weights[GROUP_B] = 0.2
    return weights


def test_complete_link_needs_every_pair_to_agree():
    sim = torch.tensor([[1.0, 0.9, 0.3], [0.9, 1.0, 0.9], [0.3, 0.9, 1.0]])  # a chain: a~b, b~c, a not ~c
    assert complete_link(sim, 0.6) == [[0, 1], [2]]
    assert complete_link(sim, 0.2) == [[0, 1, 2]]


def test_the_threshold_is_inclusive_and_minus_infinity_forbids():
    sim = torch.tensor([[1.0, 0.6], [0.6, 1.0]], dtype=torch.float64)
    assert complete_link(sim, 0.6) == [[0, 1]]
    assert complete_link(sim, math.nextafter(0.6, 1.0)) == [[0], [1]]
    assert complete_link(torch.tensor([[1.0, -math.inf], [-math.inf, 1.0]]), -1.0) == [[0], [1]]


def test_the_profile_cosine_is_the_mean_of_the_incoming_and_outgoing_cosines():
    A_NN, _, _ = hand_graph()
    kept = torch.arange(A_NN.shape[0])
    unit = profiles(A_NN, kept, torch.tensor([0, 2, 8]))
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(3, dtype=torch.float64))
    cos = unit @ unit.T
    assert cos[0, 1] == pytest.approx(1.0)  # a node's scale drops out of both halves
    cos_out = (0.6 - 0.5) / (math.hypot(1.0, 0.5) * math.hypot(0.6, 1.0))
    assert cos[0, 2] == pytest.approx((1.0 + cos_out) / 2)


def test_two_planted_groups_are_found_exactly_and_the_distractors_left_alone():
    A_NN, features_F3, labels = hand_graph()
    mask = torch.ones(A_NN.shape[0], dtype=torch.bool)
    groups = suggest_supernodes(A_NN, mask, features_F3, influence(A_NN.shape[0]), labels)
    assert [g.members for g in groups] == [GROUP_A, GROUP_B]  # ranked by summed influence
    assert [g.name for g in groups] == ["French · France → Paris", "add → sum"]
    assert all(g.min_cosine == pytest.approx(1.0) for g in groups)
    assert groups[0].influence == pytest.approx(0.9)


def test_a_looser_threshold_takes_in_the_near_node_and_a_removed_node_is_not_grouped():
    A_NN, features_F3, labels = hand_graph()
    mask = torch.ones(A_NN.shape[0], dtype=torch.bool)
    loose = suggest_supernodes(A_NN, mask, features_F3, influence(A_NN.shape[0]), labels, GroupSettings(threshold=0.5))
    assert loose[0].members == sorted([*GROUP_A, NEAR]) and loose[0].min_cosine == pytest.approx(0.538, abs=1e-3)
    mask[2] = False  # pruned away: not a member, and not a column of anyone's profile
    groups = suggest_supernodes(A_NN, mask, features_F3, influence(A_NN.shape[0]), labels)
    assert [g.members for g in groups] == [[0, 4], GROUP_B]


def test_position_and_layer_span_bound_a_group():
    A_NN, features_F3, labels = hand_graph()
    mask = torch.ones(A_NN.shape[0], dtype=torch.bool)
    narrow = suggest_supernodes(
        A_NN, mask, features_F3, influence(A_NN.shape[0]), labels, GroupSettings(max_layer_span=1)
    )
    members = [g.members for g in narrow]
    assert GROUP_B in members and [m for m in members if m != GROUP_B] in ([[0, 2]], [[2, 4]])  # A's layers 0-2 split
    wide = suggest_supernodes(
        A_NN, mask, features_F3, influence(A_NN.shape[0]), labels, GroupSettings(max_layer_span=6)
    )
    assert wide[0].members == [0, 2, 4, 7]  # node 6 (position 2) never joins


def test_at_most_max_groups_and_max_pinned_nodes_the_most_influential_first():
    A_NN, features_F3, labels = hand_graph()
    mask, weights = torch.ones(A_NN.shape[0], dtype=torch.bool), influence(A_NN.shape[0])
    assert [g.members for g in suggest_supernodes(A_NN, mask, features_F3, weights, labels,
                                                  GroupSettings(max_groups=1))] == [GROUP_A]  # fmt: skip
    assert [g.members for g in suggest_supernodes(A_NN, mask, features_F3, weights, labels,
                                                  GroupSettings(max_pinned=2))] == [GROUP_B]  # fmt: skip
    assert suggest_supernodes(A_NN, mask, features_F3, weights, labels, GroupSettings(min_size=4)) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"threshold": 1.5}, "threshold"), ({"min_size": 1}, "min_size"), ({"max_layer_span": -1}, "max_layer_span")],
)
def test_bad_settings_say_which(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GroupSettings(**kwargs)


def test_names_take_shared_informative_words_per_side():
    graph = ["the · a → x", "the · b → y", "the · c → z", "the · Paris → city", "the · paris → city"]
    name = group_name(["the · Paris → city", "the · paris → city"], label_counts(graph), "L1")
    assert name == "Paris → city"  # 'the' is on every label of the graph: no information
    escapes = ["\\n · . → x", "\\n · . → y"]
    assert group_name(escapes, label_counts([*escapes, "a → b"]), "L1") == "L1"  # a newline is not a word
    assert group_name(["a → b", "c → d"], label_counts(["a → b", "c → d", "e → f"]), 'L2–3 " is"') == 'L2–3 " is"'
    assert group_name(["x → sum", "y → sum"], label_counts(["x → sum", "y → sum", "z → q"]), "L1") == "→ sum"
    assert group_name(["a · x", "a · y", "b · z"], label_counts(["a · x", "a · y", "b · z", "c"]), "L1") == "a"


def hand_traced() -> tuple[Graph, Pruned, dict]:
    """The hand graph (layers within 0-3) as a Graph with error nodes, every node and edge kept."""
    rows = [row for row in FEATURES if row[0] <= 3]
    n_f, n_layers, n_pos = len(rows), 4, 3
    n_e = n_layers * 2  # positions 1 and 2
    N = n_f + n_e + n_pos + 2
    A_NN = torch.zeros(N, N, dtype=torch.float64)
    for i, (_, _, _, s_in, incoming, s_out, outgoing, _) in enumerate(rows):
        A_NN[i, n_f + n_e : n_f + n_e + 2] = s_in * torch.tensor(incoming, dtype=torch.float64)
        A_NN[N - 2 :, i] = s_out * torch.tensor(outgoing, dtype=torch.float64)
    graph = Graph(
        prompt_ids=torch.tensor([0, 5, 6]), n_layers=n_layers, features=torch.tensor([r[:3] for r in rows]),
        activations=torch.ones(n_f, dtype=torch.float64), logit_tokens=torch.tensor([7, 8]),
        logit_probs=torch.tensor([0.6, 0.3], dtype=torch.float64), adjacency=A_NN, values=A_NN.sum(1),
        constants=torch.zeros(N, dtype=torch.float64), n_active_features=n_f,
        constant_positions=torch.tensor([True, False, False]),
    )  # fmt: skip
    weights = torch.zeros(N, dtype=torch.float64)
    weights[:n_f] = influence(n_f)
    pruned = Pruned(torch.ones(N, dtype=torch.bool), A_NN != 0, weights, cumulative_share(weights))
    labels = {(r[0], r[2]): r[-1] for r in rows}
    document = graph_document(graph, pruned, lambda t: f"t{t}", "hand", "tiny", "a b", 0.8, 0.98, labels=labels)
    return graph, pruned, document


def test_the_document_gets_neuronpedias_supernodes_pinned_and_marked_as_suggestions():
    graph, pruned, document = hand_traced()
    assert document["qParams"]["supernodes"] == [] and document["qParams"]["pinnedIds"] == []
    with_suggestions(document, graph.adjacency, pruned, graph.features)
    expected = [["French · France → Paris", "0_10_1", "1_12_1", "2_14_1"], ["add → sum", "1_13_1", "2_15_1"]]
    assert document["qParams"]["supernodes"] == expected
    assert document["qParams"]["pinnedIds"] == ["0_10_1", "1_12_1", "2_14_1", "1_13_1", "2_15_1"]
    suggested = document["saescope"]["suggested_supernodes"]
    assert [[g["name"], *g["node_ids"]] for g in suggested["groups"]] == expected
    assert suggested["groups"][0]["layers"] == [0, 2] and suggested["groups"][0]["position"] == 1
    assert suggested["settings"]["threshold"] == 0.6 and suggested["seconds"] >= 0
    parsed = from_json(to_json(document))  # strict JSON, and every id names a node
    ids = {node["node_id"] for node in parsed.nodes}
    assert all(isinstance(x, str) for entry in parsed.qParams["supernodes"] for x in entry)
    assert {i for entry in parsed.qParams["supernodes"] for i in entry[1:]} <= ids


def test_the_document_still_validates_against_circuit_tracers_models():
    graph_models = pytest.importorskip("circuit_tracer.frontend.graph_models")
    graph, pruned, document = hand_traced()
    model = graph_models.Model.model_validate(with_suggestions(document, graph.adjacency, pruned, graph.features))
    assert len(model.qParams.supernodes) == 2


@pytest.fixture(scope="module")
def grouped_run(tmp_path_factory, transcoder_run):
    run = tmp_path_factory.mktemp("grouped") / "run"
    shutil.copytree(transcoder_run, run)
    return run


@pytest.mark.parametrize("flag", [[], ["--no-group"]])
def test_trace_suggests_supernodes_unless_no_group(grouped_run, flag):
    name = "nogroup" if flag else "group"
    keep = ["--node-threshold", "1", "--edge-threshold", "1", "--label-contexts", "0"]
    assert main(["trace", "--run", str(grouped_run), "--prompt", "The cat sat", "--name", name, *keep, *flag]) == 0
    doc = read_graph_json(grouped_run, name)
    if flag:
        assert "suggested_supernodes" not in doc["saescope"]
        assert doc["qParams"]["supernodes"] == [] and doc["qParams"]["pinnedIds"] == []
    else:
        groups = doc["saescope"]["suggested_supernodes"]["groups"]
        assert groups  # the tiny random model's graph, every node kept, has some
        assert doc["qParams"]["supernodes"] == [[g["name"], *g["node_ids"]] for g in groups]
        ids = {node["node_id"] for node in doc["nodes"]}
        assert {i for g in groups for i in g["node_ids"]} <= ids
        assert json.dumps(doc, allow_nan=False)
    assert read_supernodes(grouped_run, name) == []  # suggestions never land in the person's saved groups
