"""The /trace page on a run whose transcoder set is a cross-layer transcoder: the prompt box and the intervention panel.

The CLT is circuit-tracer's layout, imported with `saescope import-sae` into a copy of the tiny run.
"""

from __future__ import annotations

import json

import torch

from dashboards.views.trace.intervene import set_transcoders
from jobs.cli import main
from pipeline.sae.cross_layer import CltLayer
from storage.graph_groups import graph_names
from storage.transcoder_store import set_dir
from tests.test_import_transcoders import L, write_clt
from tests.test_trace_page import page


def test_a_clt_set_traces_from_the_prompt_box_and_its_nodes_take_interventions(run_copy, tmp_path, monkeypatch):
    write_clt(tmp_path / "clt", "relu")
    assert main(["import-sae", str(tmp_path / "clt"), "--run", str(run_copy), "--name", "clt"]) == 0
    views = set_transcoders(set_dir(run_copy, "clt"), (0,))
    assert sorted(views) == list(range(L)) and all(isinstance(v, CltLayer) for v in views.values())
    monkeypatch.setenv("SAESCOPE_RUN", str(run_copy))
    app = page().run()
    assert not app.exception, app.exception
    app.text_input[0].set_value("The cat sat on")
    app.button[0].click().run(timeout=120)
    assert not app.exception, app.exception
    assert not app.error, app.error[0].value
    assert graph_names(run_copy) == ["the-cat-sat-on"] and app.query_params["graph"] == "the-cat-sat-on"
    doc = json.loads((run_copy / "graphs" / "the-cat-sat-on.json").read_text())
    assert doc["saescope"]["transcoders"] == "clt" and doc["saescope"]["logit_error"] < 1e-3
    features = [n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"]
    first = min(features, key=lambda n: int(n["layer"]))  # the earliest source writes into the most layers
    app.multiselect(key="trace_edit").set_value([first["node_id"]])
    app.button(key="FormSubmitter:intervene-Run intervention").click().run(timeout=120)
    assert not app.exception, app.exception
    assert not app.error, app.error[0].value
    assert [h.value for h in app.subheader][-2:] == ["original", "intervened"]
    assert len(app.dataframe[-2].value) == 10 and len(app.dataframe[-1].value) == 10
    assert torch.is_tensor(views[0].decoder_rows) and views[0].output_layers == range(0, L)
