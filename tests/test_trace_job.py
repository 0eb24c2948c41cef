"""`saescope trace` on the tiny run: a saved graph the page can read, completeness, paths, bad input first."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from jobs.cli import main
from pipeline.tracing.pruning import prune
from pipeline.tracing.scores import graph_scores
from storage.graph_groups import graph_names, read_graph_json, read_graph_tensors


@pytest.fixture(scope="module")
def traced_run(tmp_path_factory, transcoder_run):
    run = tmp_path_factory.mktemp("traced") / "run"
    shutil.copytree(transcoder_run, run)
    return run


def test_trace_saves_a_graph_with_the_viewers_fields(traced_run, capsys):
    code = main(["trace", "--run", str(traced_run), "--prompt", "The cat sat on the mat", "--name", "cat"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert graph_names(traced_run) == ["cat"]
    doc = read_graph_json(traced_run, "cat")
    assert set(doc) >= {"metadata", "qParams", "nodes", "links", "saescope"}
    from jobs.demo import traced_with  # the demo reuses a graph only when its own set traced it

    assert traced_with(traced_run, "cat") == "tc" and traced_with(traced_run, "dog") is None
    kinds = {node["feature_type"] for node in doc["nodes"]}
    assert {"embedding", "logit"} <= kinds
    ids = {node["node_id"] for node in doc["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in doc["links"])
    assert doc["saescope"]["transcoders"] == "tc" and doc["saescope"]["layers"] == [0, 1, 2, 3]
    assert doc["saescope"]["logit_error"] < 1e-3
    assert "completeness" in out and "saved" in out and "/trace?graph=cat" in out
    assert "scores (unpruned / pruned): replacement" in out
    # QK tracing (default --qk-targets 2): the strongest kept feature (if any) and the top logit, Neuronpedia's form
    carrying = [node for node in doc["nodes"] if "qk_tracing_results" in node]
    assert {node["feature_type"] for node in carrying} == {"logit"} | (kinds & {"cross layer transcoder"})
    known = ids | set(doc["qk_only_nodes"])
    for node in carrying:
        pairs = node["qk_tracing_results"]["pair_wise_contributors"]
        assert pairs and all(q in known and k in known for q, k, _ in pairs)
    assert all(entry["score"] == pytest.approx(entry["model_score"], rel=1e-3, abs=1e-4)
               for entry in doc["saescope"]["qk_tracing"])  # fmt: skip
    assert out.count("QK into ") == len(carrying)


def _strings(value):
    if isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def test_the_graph_file_records_the_run_by_name_and_no_path(traced_run, tiny_model_dir):
    assert main(["trace", "--run", str(traced_run), "--prompt", "The cat", "--name", "nopath"]) == 0
    doc = read_graph_json(traced_run, "nopath")
    assert doc["saescope"]["run"] == traced_run.name and doc["metadata"]["schema_version"] == 1
    roots = {str(traced_run.parent.parent), str(tiny_model_dir.parent), "/tmp", str(traced_run.home())}
    leaks = [text for text in _strings(doc) if text.startswith("/") or any(root in text for root in roots)]
    assert not leaks
    _, meta = read_graph_tensors(traced_run, "nopath")
    assert not [text for text in meta.values() if "/" in text]


def test_trace_saves_the_unpruned_graph_and_its_scores(traced_run):
    """The safetensors file alone is enough to prune again and recompute the document's scores."""
    assert main(["trace", "--run", str(traced_run), "--prompt", "The cat sat on the mat", "--name", "mat"]) == 0
    doc = read_graph_json(traced_run, "mat")
    tensors, meta = read_graph_tensors(traced_run, "mat")
    n_features, n_errors, n_tokens, n_logits = (
        int(meta[k]) for k in ("n_features", "n_errors", "n_tokens", "n_logits")
    )
    A = tensors["adjacency"]
    assert A.shape[0] == n_features + n_errors + n_tokens + n_logits == tensors["node_kind"].numel()
    assert tensors["node_kind"].tolist() == [0] * n_features + [1] * n_errors + [2] * n_tokens + [3] * n_logits
    assert tensors["prompt_ids"].tolist() == doc["saescope"]["prompt_ids"] and tensors["constant_positions"][0]
    assert not tensors["constant_positions"][tensors["node_position"][: n_features + n_errors]].any()
    weights = torch.zeros(A.shape[0], dtype=A.dtype)
    weights[-n_logits:] = tensors["logit_probs"].to(A.dtype)
    layout = (n_features, n_errors, n_tokens)
    scores = doc["metadata"]["scores"]
    assert graph_scores(A, weights, *layout)._asdict() == pytest.approx(scores["unpruned"], abs=1e-6)
    pruned = prune(A, weights, n_features, n_errors)
    assert graph_scores(A * pruned.edge_mask_NN, weights, *layout)._asdict() == pytest.approx(
        scores["pruned"], abs=1e-6
    )
    assert 0 < scores["unpruned"]["replacement"] <= 1 and 0 < scores["pruned"]["completeness"] <= 1
    assert int(pruned.node_mask_N.sum()) == len(doc["nodes"])


@pytest.mark.parametrize("contexts", [16, 0])
def test_feature_labels_say_what_a_feature_fires_on_and_writes(traced_run, contexts):
    keep_all = ["--node-threshold", "1", "--edge-threshold", "1", "--label-contexts", str(contexts), "--force"]
    assert main(["trace", "--run", str(traced_run), "--prompt", "The cat sat", "--name", "all", *keep_all]) == 0
    doc = read_graph_json(traced_run, "all")
    clerps = [node["clerp"] for node in doc["nodes"] if node["feature_type"] == "cross layer transcoder"]
    assert clerps and all(" → promotes " in c for c in clerps)
    from_contexts = [c for c in clerps if c.startswith("fires on ")]
    assert bool(from_contexts) == (contexts > 0)  # with held-out contexts, some feature fires on them
    assert all(c.startswith(("fires on ", "fires here on ")) for c in clerps)  # else on the prompt
    features = [node for node in doc["nodes"] if node["feature_type"] == "cross layer transcoder"]
    assert all(node["saescope_density"] is None and node["saescope_dense"] is None for node in features)  # no index
    assert doc["saescope"]["timings"]["labels_s"] >= 0


def test_json_prints_the_document(traced_run, capsys):
    args = ["--prompt", "a b", "--name", "ab", "--json", "--qk-targets", "0"]
    assert main(["trace", "--run", str(traced_run), *args]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["metadata"]["slug"] == "ab" and doc["metadata"]["prompt"] == "a b"
    assert "qk_only_nodes" not in doc and not any("qk_tracing_results" in node for node in doc["nodes"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "  "], "--prompt is empty"),
        (["--prompt", "x", "--node-threshold", "1.5"], "--node-threshold must be in (0, 1]"),
        (["--prompt", "x", "--qk-targets", "-1"], "--qk-targets must be >= 0"),
        (["--prompt", "x", "--name", "../up"], "--name '../up' is not a valid graph name"),
        (["--prompt", "x", "--name", "cat\n"], "--name 'cat\\n' is not a valid graph name"),
        (["--prompt", "x", "--transcoders", "nope"], "has no trained transcoder set 'nope'"),
        (["--prompt", "x", "--target", "sat on the mat"], "--target 'sat on the mat' is"),
    ],
)
def test_bad_input_is_one_line_before_the_model_loads(traced_run, capsys, monkeypatch, args, message):
    import jobs.trace as job

    monkeypatch.setattr(job, "load_run_model", lambda *_: pytest.fail("the model loaded before the check"))
    code = main(["trace", "--run", str(traced_run), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err.strip().splitlines()[-1] and "Traceback" not in err


def test_a_run_without_transcoders_says_how_to_train_them(run_copy, capsys):
    assert main(["trace", "--run", str(run_copy), "--prompt", "x"]) == 2
    assert "saescope train --run" in capsys.readouterr().err


def test_a_set_missing_a_layer_is_refused_with_how_to_train_one(traced_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(traced_run, run)
    set_json = run / "transcoders" / "tc" / "set.json"
    set_json.write_text(json.dumps({**json.loads(set_json.read_text()), "layers": [0, 1, 2]}))
    assert main(["trace", "--run", str(run), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "covers layers 0-2 (3 of 4): tracing needs every layer" in err
    assert "--transcoder --name tc --layers all --force" in err


def test_the_trace_page_reads_every_field_trace_writes(traced_run):
    """The page parses the saved graph: its nodes, the QK-only contributors (a dict of node dicts, biases and
    earlier attention among them) and the suggested supernodes, naming each QK contributor."""
    from dashboards.views.trace.details import name_of
    from dashboards.views.trace.layout import parse_graph

    assert main(["trace", "--run", str(traced_run), "--prompt", "The dog sat on the mat", "--name", "page"]) == 0
    doc = read_graph_json(traced_run, "page")
    graph = parse_graph(doc, "page")
    assert len(graph.nodes) == len(doc["nodes"]) and set(graph.qk_only) == set(doc["qk_only_nodes"])
    assert [name for name, *_ in doc["qParams"]["supernodes"]] == [name for name, _ in graph.suggested]
    carrying = [node for node in graph.nodes if node.qk is not None]
    assert carrying
    for node in carrying:
        for q, k, _ in node.qk.pairs:
            assert name_of(graph, q) != q and name_of(graph, k) != k


def test_float64_traces_to_float64_rounding_and_a_poor_completeness_warns(traced_run, capsys):
    from jobs.trace import incomplete_warning

    assert main(["trace", "--run", str(traced_run), "--prompt", "The cat sat", "--name", "wide", "--float64"]) == 0
    doc = read_graph_json(traced_run, "wide")
    assert doc["saescope"]["logit_error"] < 1e-9  # float32 rounding alone is ~1e-7 here
    assert "warning" not in capsys.readouterr().out
    assert incomplete_warning(1e-3) == [] and "--float64" in incomplete_warning(0.03)[0]
