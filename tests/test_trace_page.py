"""The /trace page under AppTest on a small hand-written graph file, and its pure layout and supernode files."""

from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest

from dashboards.views.trace.layout import parse_graph, place, row_labels
from storage.graph_groups import graph_names, read_supernodes, supernodes_path, write_supernodes

TRICKY = "<b>*x*</b> $a$"


def small_graph() -> dict:
    """Two prompt tokens, two transcoder layers, one error node, one logit (circuit-tracer's field names)."""

    def node(node_id, feature_type, layer, pos, clerp="", act=None, infl=None, feature=None):
        return {
            "node_id": node_id,
            "feature": feature,
            "layer": layer,
            "ctx_idx": pos,
            "feature_type": feature_type,
            "jsNodeId": node_id,
            "clerp": clerp,
            "influence": infl,
            "activation": act,
            "is_target_logit": feature_type == "logit",
            "token_prob": 0.4 if feature_type == "logit" else 0.0,
        }

    nodes = [
        node("E_5_0", "embedding", "E", 0, "<bos>"),
        node("E_9_1", "embedding", "E", 1, "cat"),
        node("0_7_1", "cross layer transcoder", "0", 1, TRICKY, 1.5, 0.6, feature=35),
        node("0_3_1", "cross layer transcoder", "0", 1, "animals", 0.5, 0.2, feature=9),
        node("1_12_1", "cross layer transcoder", "1", 1, "pets", 2.0, 0.8, feature=103),
        node("1_-1_1", "mlp reconstruction error", "1", 1, "error", None, 0.1, feature=-1),
        node("3_20_1", "logit", "3", 1, 'Output " sat" (p=0.400)', feature=20),
    ]
    links = [
        {"source": "E_9_1", "target": "0_7_1", "weight": 0.9},
        {"source": "0_7_1", "target": "1_12_1", "weight": -0.4},
        {"source": "0_3_1", "target": "1_12_1", "weight": 0.2},
        {"source": "1_12_1", "target": "3_20_1", "weight": 1.1},
        {"source": "1_-1_1", "target": "3_20_1", "weight": 0.05},
        {"source": "E_5_0", "target": "missing", "weight": 1.0},
    ]
    meta = {
        "slug": "cat",
        "prompt": "<bos>cat",
        "prompt_tokens": ["<bos>", "<i>c</i>"],
        "scan": "tiny",
        "node_threshold": 0.8,
        "scores": {
            "unpruned": {"replacement": 0.25, "completeness": 0.75},
            "pruned": {"replacement": 0.5, "completeness": 0.875},
        },  # fmt: skip
    }
    return {"metadata": meta, "qParams": {"pinnedIds": [], "supernodes": []}, "nodes": nodes, "links": links,
            "saescope": {"run": "r", "transcoders": "tc", "model": "tiny", "layers": [0, 1]}}  # fmt: skip


@pytest.fixture
def graph_run(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "graphs").mkdir(parents=True)
    (run / "graphs" / "cat.json").write_text(json.dumps(small_graph()), encoding="utf-8")
    (run / "graphs" / "other.json").write_text(json.dumps(small_graph()), encoding="utf-8")
    monkeypatch.setenv("SAESCOPE_RUN", str(run))
    return run


def page(**query) -> AppTest:
    app = AppTest.from_string("from dashboards.views import trace\ntrace.render()\n", default_timeout=60)
    for key, value in query.items():
        app.query_params[key] = value
    return app


def chart_spec(app: AppTest) -> dict:
    charts = app.get("vega_lite_chart")
    assert charts, "the page draws a Vega-Lite chart"
    return json.loads(charts[0].proto.spec)


def chart_rows(app: AppTest) -> list[dict]:
    """Every data row the chart carries (its datasets are Arrow tables beside the spec)."""
    import pyarrow as pa

    chart = app.get("vega_lite_chart")[0].proto
    rows = []
    for dataset in chart.datasets:
        rows += pa.ipc.open_stream(dataset.data.data).read_all().to_pylist()
    return rows


def test_layout_rows_columns_and_feature_ids():
    graph = parse_graph(small_graph(), "cat")
    assert row_labels(graph) == ["embeddings", "L0", "L1", "logits"]
    placed = place(graph)
    assert placed["E_5_0"] == (0.0, 0.0) and placed["3_20_1"] == (1.0, 3.0)
    assert placed["0_7_1"][1] == 1.0 and placed["0_3_1"][1] == 1.0 and placed["0_7_1"][0] != placed["0_3_1"][0]
    by_id = graph.by_id
    assert by_id["0_7_1"].feature == 7 and by_id["0_7_1"].layer == 0  # from node_id, not the paired "feature"
    assert len(graph.links) == 5  # the link to an unknown node is dropped


def test_a_feature_id_of_another_shape_reads_the_cantor_paired_feature():
    """feature = cantor(layer, index): cantor(1, 12) = 13 * 14 / 2 + 12 = 103; cantor(0, 7) = 7 * 8 / 2 + 7 = 35."""
    data = small_graph()
    for node in data["nodes"]:
        if node["feature_type"] == "cross layer transcoder":
            node["node_id"] = "f" + node["node_id"]
    data["links"] = []
    by_id = parse_graph(data, "cat").by_id
    assert by_id["f1_12_1"].feature == 12 and by_id["f0_7_1"].feature == 7 and by_id["f0_3_1"].feature == 3


def test_supernodes_round_trip_atomically(tmp_path):
    (tmp_path / "graphs").mkdir()
    (tmp_path / "graphs" / "g.json").write_text("{}")
    write_supernodes(tmp_path, "g", [("pets", ["0_7_1", "1_12_1"])])
    assert read_supernodes(tmp_path, "g") == [("pets", ["0_7_1", "1_12_1"])]
    assert json.loads(supernodes_path(tmp_path, "g").read_text())["supernodes"] == [["pets", "0_7_1", "1_12_1"]]
    assert graph_names(tmp_path) == ["g"] and not list((tmp_path / "graphs").glob("*.tmp"))
    with pytest.raises(ValueError, match="needs a name"):
        write_supernodes(tmp_path, "g", [("", ["x"])])


def test_page_lists_graphs_and_draws_the_chosen_one(graph_run):
    app = page(graph="other").run()
    assert not app.exception, app.exception
    assert app.selectbox[0].options == ["cat", "other"] and app.selectbox[0].value == "other"
    spec = chart_spec(app)
    assert "layer" in spec and len(spec["layer"]) >= 4
    node_rows = [r for r in chart_rows(app) if "node_id" in r]
    assert len(node_rows) == 7
    shown = " ".join(c.value for c in app.caption)
    assert "replacement 0.250 (pruned 0.500)" in shown and "completeness 0.750 (pruned 0.875)" in shown


def test_the_chart_draws_the_strongest_links_and_the_page_offers_more(graph_run, monkeypatch):
    from dashboards.views.trace import page as trace_page
    from dashboards.views.trace.chart import frames

    graph = parse_graph(small_graph(), "cat")
    _, edges, _ = frames(graph, [], max_links=2)
    assert sorted(edges["weight"].tolist()) == [0.9, 1.1]  # the two largest |weight| of five
    assert len(frames(graph, [])[1]) == 5
    monkeypatch.setattr(trace_page, "DEFAULT_LINKS", 3)
    app = page(graph="cat").run()
    assert not app.exception, app.exception
    assert len([r for r in chart_rows(app) if "strength" in r]) == 3
    assert "the 3 strongest of 5 links" in " ".join(c.value for c in app.caption)


def test_hover_label_is_literal_text_and_prompt_tokens_are_escaped(graph_run):
    app = page(graph="cat").run()
    labels = {r["node_id"]: r["label"] for r in chart_rows(app) if "node_id" in r}
    assert labels["0_7_1"] == TRICKY  # tooltip data holds the characters; Vega's tooltip escapes HTML
    tooltip_fields = [t["field"] for layer in chart_spec(app)["layer"] for t in layer["encoding"].get("tooltip", [])]
    assert "label" in tooltip_fields and "activation" in tooltip_fields and "influence" in tooltip_fields
    markup = "".join(h.proto.body for h in app.get("html"))
    assert "&lt;i&gt;c&lt;/i&gt;" in markup and "<i>c</i>" not in markup
    assert not [m for m in app.markdown if "*x*" in m.value or "<b>" in m.value]


def test_choosing_a_feature_node_links_its_feature_page(graph_run):
    app = page(graph="cat").run()
    app.selectbox(key="trace_node").set_value("0_7_1").run()
    markup = "".join(h.proto.body for h in app.get("html"))
    assert 'href="./feature?id=7&amp;layer=0&amp;transcoders=tc"' in markup
    assert html_escaped(TRICKY) in markup


def html_escaped(text: str) -> str:
    import html

    return html.escape(text)


def test_supernode_save_and_reload(graph_run):
    app = page(graph="cat").run()
    app.multiselect[0].set_value(["0_7_1", "1_12_1"])
    app.text_input[0].input("pet <path>")
    app.button[0].click().run()
    assert not app.exception, app.exception
    assert read_supernodes(graph_run, "cat") == [("pet <path>", ["0_7_1", "1_12_1"])]
    fresh = page(graph="cat").run()
    boxes = [r for r in chart_rows(fresh) if "members" in r]
    assert [(b["name"], b["members"]) for b in boxes] == [("pet <path>", 2)]
    assert fresh.selectbox(key="trace_group").options == ["pet <path>"]


def test_intervention_panel_shows_original_and_edited_predictions(run_copy, monkeypatch):
    """Ablate a layer-1 feature node of a graph on the tiny run, with a random transcoder saved in the run."""
    import torch

    from storage.sae_store import save_sae
    from storage.transcoder_store import layer_dir, set_dir

    torch.manual_seed(0)
    tensors = {"W_enc": torch.randn(32, 16), "b_enc": torch.zeros(16), "W_dec": torch.randn(16, 32) * 0.5,
               "b_dec": torch.zeros(32), "W_skip": torch.zeros(32, 32)}  # fmt: skip
    cfg = {"architecture": "skip_transcoder", "activation_fn": "relu", "d_in": 32, "d_sae": 16, "d_out": 32}
    save_sae(layer_dir(set_dir(run_copy, "tc"), 1), tensors, cfg)
    graph = small_graph()
    graph["metadata"].update(prompt="cat", prompt_tokens=["<bos>", "c", "a", "t"])
    graph["nodes"] = [n for n in graph["nodes"] if n["layer"] in ("E", "1", "3")]
    graph["nodes"].append(
        {"node_id": "1_4_3", "feature": 4, "layer": "1", "ctx_idx": 3, "feature_type": "cross layer transcoder",
         "clerp": "t-ish", "activation": 1.0, "influence": 0.5}
    )  # fmt: skip
    graph["saescope"] = {"transcoders": "tc", "layers": [1]}
    (run_copy / "graphs").mkdir()
    (run_copy / "graphs" / "cat.json").write_text(json.dumps(graph), encoding="utf-8")
    monkeypatch.setenv("SAESCOPE_RUN", str(run_copy))
    app = page(graph="cat").run()
    app.multiselect[1].set_value(["1_4_3"])
    app.button[1].click().run(timeout=120)
    assert not app.exception, app.exception
    assert not app.error, app.error[0].value
    assert [h.value for h in app.subheader][-2:] == ["original", "intervened"]
    assert len(app.dataframe[0].value) == 10 and len(app.dataframe[1].value) == 10
    assert len(app.get("html")) >= 3  # prompt, node details, two continuations


def test_the_prompt_box_traces_saves_and_opens_a_new_graph(transcoder_run, tmp_path, monkeypatch):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(transcoder_run, run)
    monkeypatch.setenv("SAESCOPE_RUN", str(run))
    app = page().run()
    assert not app.exception, app.exception
    assert any("trace a prompt above" in i.value for i in app.info)
    app.text_input[0].set_value("The cat sat on")
    app.button[0].click().run(timeout=120)
    assert not app.exception, app.exception
    assert not app.error, app.error[0].value
    assert graph_names(run) == ["the-cat-sat-on"]
    assert app.query_params["graph"] == "the-cat-sat-on"
    doc = json.loads((run / "graphs" / "the-cat-sat-on.json").read_text())
    assert doc["metadata"]["prompt"] == "The cat sat on" and doc["saescope"]["transcoders"] == "tc"
    assert doc["saescope"]["logit_error"] < 1e-3 and chart_spec(app)
    app.text_input[1].set_value("two tokens!")
    app.text_input[2].set_value("other")
    app.button[0].click().run(timeout=120)
    assert app.error and "is" in app.error[0].value and "tokens, not one" in app.error[0].value
    saved = (run / "graphs" / "the-cat-sat-on.json").read_bytes()
    app.text_input[1].set_value("")
    app.text_input[2].set_value("")
    app.button[0].click().run(timeout=120)
    assert app.error and "already saved" in app.error[0].value and "replace" in app.error[0].value
    assert (run / "graphs" / "the-cat-sat-on.json").read_bytes() == saved
