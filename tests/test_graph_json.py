"""The Neuronpedia graph document: schema fields, ids unique, links only between kept nodes, JSON round trip."""

import json

import pytest
import torch

from pipeline.tracing.graph_json import (
    EMBEDDING,
    ERROR,
    FEATURE,
    LOGIT,
    cantor,
    from_json,
    graph_document,
    to_json,
    uncantor,
)
from pipeline.tracing.pruning import prune
from pipeline.tracing.trace import trace
from tests.conftest import make_tiny_llama
from tests.test_tracing import N_LAYERS, D, random_transcoder, with_random_norm_weights

NODE_FIELDS = {
    "node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit",
    "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp", "influence", "activation",
}  # fmt: skip


@pytest.fixture(scope="module")
def traced(tokenizer):
    model = with_random_norm_weights(make_tiny_llama(len(tokenizer), n_layers=N_LAYERS, d_model=D).double(), 1)
    generator = torch.Generator().manual_seed(1)
    transcoders = [random_transcoder(generator) for _ in range(N_LAYERS)]
    graph = trace(model, torch.tensor(tokenizer("A cat.\nIt").input_ids), transcoders, batch_size=64)
    return graph, prune(graph.adjacency, graph.target_weights(), graph.n_features, graph.n_errors)


@pytest.fixture(scope="module")
def document(tokenizer, traced):
    graph, pruned = traced
    first = tuple(graph.features[0, [0, 2]].tolist())
    return graph_document(
        graph, pruned, tokenizer.decode, slug="tiny-cat", scan="tiny-llama-tc", prompt="A cat.\nIt",
        node_threshold=0.8, edge_threshold=0.98, provenance={"model": "tiny", "run": "x"},
        labels={first: "a label"}, transcoder_list=[f"tc-{layer}" for layer in range(N_LAYERS)],
    )  # fmt: skip


def test_document_has_the_viewer_schema(traced, document):
    graph, pruned = traced
    assert set(document) == {"metadata", "qParams", "nodes", "links", "saescope"}
    assert document["metadata"]["prompt_tokens"] == list("A cat.") + ["⏎", "I", "t"]
    assert {"slug", "scan", "prompt", "node_threshold", "transcoder_list"} <= set(document["metadata"])
    assert set(document["qParams"]) == {"pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"}
    assert all(set(node) == NODE_FIELDS for node in document["nodes"])
    ids = [node["node_id"] for node in document["nodes"]]
    assert len(ids) == len(set(ids)) == int(pruned.node_mask_N.sum())
    kinds = [node["feature_type"] for node in document["nodes"]]
    assert kinds.count(EMBEDDING) == graph.n_pos and kinds.count(LOGIT) == graph.n_logits
    assert {FEATURE, ERROR} <= set(kinds)
    logits = [node for node in document["nodes"] if node["feature_type"] == LOGIT]
    assert [node["is_target_logit"] for node in logits] == [True] + [False] * (len(logits) - 1)
    assert all(node["clerp"].endswith(f"(p={node['token_prob']:.3f})") for node in logits)
    assert document["saescope"]["model"] == "tiny" and document["saescope"]["logit_error"] < 1e-12
    assert len(document["links"]) == int(pruned.edge_mask_NN.sum()) > 0
    ends = {link["source"] for link in document["links"]} | {link["target"] for link in document["links"]}
    assert ends <= set(ids)


def test_cantor_ids_by_hand():
    """(x + y)(x + y + 1)/2 + y by hand: diagonals x + y = 0, 1, 2 number 0 | 1 2 | 3 4 5; (29, 16383):
    16412 * 16413 / 2 = 8206 * 16413 = 134_685_078, + 16383 = 134_701_461."""
    pairs = [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2), (3, 5), (29, 16383)]
    assert [cantor(x, y) for x, y in pairs] == [0, 1, 2, 3, 4, 5, 41, 134_701_461]
    assert [uncantor(z) for z in [0, 1, 2, 3, 4, 5, 41, 134_701_461]] == pairs
    assert all(uncantor(cantor(x, y)) == (x, y) for x in range(40) for y in range(40))


def test_schema_1_fields(traced, document):
    graph, _ = traced
    assert document["metadata"]["schema_version"] == 1
    features = [node for node in document["nodes"] if node["feature_type"] == FEATURE]
    for node in features:
        layer, latent, pos = (int(part) for part in node["node_id"].split("_"))
        assert node["feature"] == (layer + latent) * (layer + latent + 1) // 2 + latent
        assert node["layer"] == str(layer) and node["ctx_idx"] == pos
    errors = [node for node in document["nodes"] if node["feature_type"] == ERROR]
    assert errors and all(node["node_id"] == f"{node['layer']}_-1_{node['ctx_idx']}" for node in errors)
    # position 0 is a constant: its only node is the token embedding
    assert {node["feature_type"] for node in document["nodes"] if node["ctx_idx"] == 0} == {EMBEDDING}
    assert len({node["jsNodeId"] for node in features + errors}) == len(
        {(n["layer"], n["feature"]) for n in features}
    ) + len(errors)


def test_the_document_validates_against_circuit_tracers_models(document):
    graph_models = pytest.importorskip("circuit_tracer.frontend.graph_models")
    model = graph_models.Model.model_validate(document)
    assert model.metadata.schema_version == 1 and len(model.nodes) == len(document["nodes"])
    for node in document["nodes"]:
        assert graph_models.Node(**node).model_dump() == node
    for link in document["links"]:
        assert graph_models.Link(**link).model_dump() == link


def _matrix_index(graph, node_id: str) -> int:
    """The adjacency index a node id names, read from the id alone (the layout of ``attribution``)."""
    first, middle, pos = node_id.split("_")
    n = graph.adjacency.shape[0]
    if first == "E":
        assert graph.prompt_ids[int(pos)] == int(middle)
        return graph.n_features + graph.n_errors + int(pos)
    if first == str(graph.n_layers + 1):
        assert int(pos) == graph.n_pos - 1
        return n - graph.n_logits + graph.logit_tokens.tolist().index(int(middle))
    if middle == "-1":
        return (
            graph.n_features + int(first) * len(graph.error_positions) + graph.error_positions.tolist().index(int(pos))
        )
    return graph.features.tolist().index([int(first), int(pos), int(middle)])


def test_every_link_is_its_adjacency_entry(traced, document):
    graph, pruned = traced
    pairs = [(_matrix_index(graph, link["target"]), _matrix_index(graph, link["source"])) for link in document["links"]]
    assert sorted(pairs) == sorted(map(tuple, pruned.edge_mask_NN.nonzero().tolist()))
    for (t, s), link in zip(pairs, document["links"], strict=True):
        assert link["weight"] == float(graph.adjacency[t, s]) != 0.0
    by_id = {node["node_id"]: node["feature_type"] for node in document["nodes"]}
    assert {by_id[link["source"]] for link in document["links"]} == {FEATURE, ERROR, EMBEDDING}


def test_round_trip(tmp_path, document):
    path = tmp_path / "tiny-cat.json"
    path.write_text(to_json(document), encoding="utf-8")
    back = from_json(path.read_text(encoding="utf-8"))
    assert back.nodes == document["nodes"] and back.links == document["links"]
    assert back.metadata == document["metadata"] and back.saescope == document["saescope"]


def test_bad_documents_are_refused(document):
    with pytest.raises(ValueError, match="missing links"):
        from_json(json.dumps({k: v for k, v in document.items() if k != "links"}))
    broken = {**document, "links": [{"source": "nowhere", "target": document["nodes"][0]["node_id"], "weight": 1.0}]}
    with pytest.raises(ValueError, match="names a node not in the graph"):
        from_json(json.dumps(broken))
