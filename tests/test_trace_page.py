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
    assert {"label", "activation_text", "influence_text", "density_text", "example"} <= set(tooltip_fields)
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
    app.multiselect(key="trace_members").set_value(["0_7_1", "1_12_1"])
    app.text_input[0].input("pet <path>")
    app.button(key="FormSubmitter:supernode-Save supernode").click().run()
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
    app.multiselect(key="trace_edit").set_value(["1_4_3"])
    app.button(key="FormSubmitter:intervene-Run intervention").click().run(timeout=120)
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


def rich_graph() -> dict:
    """small_graph plus what the tracer may add: densities, a top example, QK tracing, suggested supernodes."""
    data = small_graph()
    by_id = {n["node_id"]: n for n in data["nodes"]}
    by_id["0_3_1"]["saescope_density"] = 0.2  # dense
    by_id["0_7_1"].update(saescope_density=0.001, saescope_example="the <cat> sat")
    by_id["1_12_1"]["qk_tracing_results"] = {
        "pair_wise_contributors": [["0_7_1", "9_1_0", 0.5], ["E_9_1", "9_1_0", -0.9]],
        "top_q_marginal_contributors": [["0_7_1", 0.2], ["E_9_1", -0.7]],
        "top_k_marginal_contributors": [["9_1_0", 1.25]],
    }
    data["qk_only_nodes"] = [
        {"node_id": "9_1_0", "feature": None, "layer": "0", "ctx_idx": 0, "feature_type": "cross layer transcoder",
         "clerp": "key-side thing"}
    ]  # fmt: skip
    data["qParams"]["supernodes"] = [["pets", "0_7_1", "1_12_1"], ["say sat", "1_12_1", "3_20_1"]]
    return data


def test_the_index_s_dense_mark_wins_over_the_page_s_density_cut():
    data = small_graph()
    by_id = {n["node_id"]: n for n in data["nodes"]}
    by_id["0_3_1"].update(saescope_density=0.5, saescope_dense=False)  # the index used a higher threshold
    by_id["0_7_1"].update(saescope_density=0.05, saescope_dense=True)
    by_id["1_12_1"].update(saescope_density=0.5)  # no mark: the page's own cut
    graph = parse_graph(data, "cat")
    assert [graph.by_id[i].dense for i in ("0_3_1", "0_7_1", "1_12_1")] == [False, True, True]


def test_the_file_s_extras_parse_and_saved_supernodes_win_over_suggestions():
    from dashboards.views.trace.layout import export_json, merged_groups, parse_ids, without_dense

    graph = parse_graph(rich_graph(), "cat")
    by_id = graph.by_id
    assert by_id["0_3_1"].dense and not by_id["0_7_1"].dense and by_id["E_5_0"].density is None
    assert by_id["0_7_1"].example == "the <cat> sat"
    qk = by_id["1_12_1"].qk
    assert qk.k_marginal == [("9_1_0", 1.25)] and qk.pairs[1] == ("E_9_1", "9_1_0", -0.9)
    assert graph.qk_only["9_1_0"].label == "key-side thing"
    assert graph.suggested == [("pets", ["0_7_1", "1_12_1"]), ("say sat", ["1_12_1", "3_20_1"])]
    light = without_dense(graph)
    assert "0_3_1" not in light.by_id and len(light.nodes) == 6 and len(light.links) == 4  # its one link goes too
    groups = merged_groups([("pets", ["0_3_1"]), ("mine", ["3_20_1"])], graph.suggested)
    assert groups == [("pets", ["0_3_1"], False), ("mine", ["3_20_1"], False), ("say sat", ["1_12_1"], True)]
    assert parse_ids(" a,b,,a ") == ["a", "b"] and parse_ids(["x"]) == ["x"]
    data = rich_graph()
    data["qParams"]["linkType"] = "both"
    out = export_json(data, ["0_7_1"], "1_12_1", groups)
    assert out["qParams"]["pinnedIds"] == ["0_7_1"] and out["qParams"]["clickedId"] == "1_12_1"
    assert out["qParams"]["supernodes"] == [["pets", "0_3_1"], ["mine", "3_20_1"], ["say sat", "1_12_1"]]
    assert out["qParams"]["linkType"] == "both"  # the file's other view settings go out as read
    assert out["nodes"] is data["nodes"] and data["qParams"]["pinnedIds"] == []  # the file's dict is not changed
    with pytest.raises(ValueError, match="is not \\[name, node_id"):
        parse_graph({**data, "qParams": {"supernodes": [["pets", 3]]}}, "cat")


def test_the_url_s_pins_and_selection_restore_the_view(graph_run):
    app = page(graph="cat", clickedId="0_7_1", pinnedIds="1_12_1,not-a-node").run()
    assert not app.exception, app.exception
    states = {r["node_id"]: r["state"] for r in chart_rows(app) if "node_id" in r}
    assert states["0_7_1"] == "selected" and states["1_12_1"] == "pinned" and states["E_5_0"] == ""
    assert app.selectbox(key="trace_node").value == "0_7_1"
    assert app.multiselect(key="trace_pins").value == ["1_12_1"]
    assert app.query_params["pinnedIds"] == "1_12_1"  # the unknown id is dropped
    markup = "".join(h.proto.body for h in app.get("html"))
    assert 'data-node="0_7_1"' in markup and 'data-node="1_12_1"' in markup
    app.button(key="trace_pin").click().run()
    assert app.query_params["pinnedIds"] == "1_12_1,0_7_1"
    app.selectbox(key="trace_node").set_value("1_12_1").run()
    assert app.query_params["clickedId"] == "1_12_1" and app.button(key="trace_pin").label == "Unpin"
    assert [d.proto.label for d in app.get("download_button")] == ["Download graph JSON"]
    app.selectbox[0].set_value("other").run()  # another graph: node ids mean other nodes there
    assert "clickedId" not in app.query_params and "pinnedIds" not in app.query_params
    assert app.selectbox(key="trace_node").value == ""


def test_a_file_s_view_opens_when_the_url_has_none(graph_run):
    data = small_graph()
    data["qParams"].update(pinnedIds=["0_3_1"], clickedId="1_12_1")
    (graph_run / "graphs" / "cat.json").write_text(json.dumps(data), encoding="utf-8")
    app = page(graph="cat").run()
    assert app.selectbox(key="trace_node").value == "1_12_1" and app.multiselect(key="trace_pins").value == ["0_3_1"]


def test_dense_latents_hide_until_asked_and_qk_tracing_shows_both_sides(graph_run):
    data = rich_graph()
    data["saescope"]["qk_tracing"] = [{"target": "1_12_1", "layer": 1, "head": 3, "query_pos": 1, "key_pos": 0,
                                       "pattern": 0.875, "score": 2.5}]  # fmt: skip
    (graph_run / "graphs" / "cat.json").write_text(json.dumps(data), encoding="utf-8")
    app = page(graph="cat", clickedId="1_12_1").run()
    assert not app.exception, app.exception
    tokens = data["metadata"]["prompt_tokens"]
    assert any(f"head L1.H3 attends from {tokens[1]!r}@1 to {tokens[0]!r}@0 (pattern 0.88)" in m.value
               for m in app.markdown)  # fmt: skip
    assert sorted(r["node_id"] for r in chart_rows(app) if "node_id" in r).count("0_3_1") == 0
    q_side, k_side, pairs = (d.value for d in app.dataframe)
    assert q_side["attribution"].tolist() == [-0.7, 0.2]  # strongest first
    assert k_side["node"].tolist()[0].endswith("key-side thing")  # a QK-only node, named by its label
    assert pairs["attribution"].tolist() == [-0.9, 0.5]
    app.toggle(key="trace_dense").set_value(True).run()
    assert "0_3_1" in [r["node_id"] for r in chart_rows(app) if "node_id" in r]
    rows = {r["node_id"]: r for r in chart_rows(app) if "node_id" in r}
    assert rows["0_7_1"]["example"] == "the <cat> sat" and rows["0_7_1"]["density"] == 0.001


def test_suggested_supernodes_draw_as_boxes_and_a_saved_one_of_the_name_wins(graph_run):
    (graph_run / "graphs" / "cat.json").write_text(json.dumps(rich_graph()), encoding="utf-8")
    write_supernodes(graph_run, "cat", [("pets", ["0_7_1", "1_-1_1"])])
    app = page(graph="cat").run()
    assert not app.exception, app.exception
    boxes = sorted((r["name"], r["source"], r["members"]) for r in chart_rows(app) if "members" in r)
    assert boxes == [("pets", "saved", 2), ("say sat", "suggested", 2)]
    assert app.selectbox(key="trace_group").options == ["pets"]  # only the person's own groups can be removed


def test_every_chart_layer_is_axisless_and_small_charts_are_svg(graph_run):
    """A rect layer with axes beside the selecting node layer without them fails to draw in Chromium (Vega-Lite
    "reading 'forEach'"): every layer's x and y say axis None. SVG gives each node an aria-label to click in a test."""
    write_supernodes(graph_run, "cat", [("pets", ["0_7_1", "1_12_1"])])
    spec = chart_spec(page(graph="cat").run())
    for layer in spec["layer"]:
        for channel in ("x", "y"):
            assert layer["encoding"][channel].get("axis", "missing") is None, (layer["mark"], channel)
    assert spec["usermeta"]["embedOptions"]["renderer"] == "svg"


def test_boxes_whose_tops_meet_name_only_the_largest_saved_first():
    from dashboards.views.trace.layout import group_boxes

    placed = {"a": (1.0, 0.0), "b": (1.0, 1.0), "c": (1.2, 0.0), "d": (3.0, 0.0), "e": (3.0, 1.0)}
    groups = [("small", ["a", "c"], True), ("big", ["a", "b", "c"], True), ("mine", ["a", "c"], False),
              ("apart", ["d"], True)]  # fmt: skip
    labels = {b["name"]: b["label"] for b in group_boxes(groups, placed)}
    assert labels == {"small": "", "big": "big", "mine": "mine", "apart": "apart"}


def test_the_chart_carries_each_box_s_label(graph_run):
    (graph_run / "graphs" / "cat.json").write_text(json.dumps(rich_graph()), encoding="utf-8")
    rows = [r for r in chart_rows(page(graph="cat").run()) if "members" in r]
    assert rows and all(r["label"] in ("", r["name"]) for r in rows) and any(r["label"] for r in rows)
