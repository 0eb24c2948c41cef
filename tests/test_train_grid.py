"""`saescope train` with comma lists: a grid of SAEs from one read, each exactly the SAE trained alone."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_train_job import crash_training_at

from jobs.cli import main
from jobs.options import ConfigError
from jobs.train import run_grid, run_train
from jobs.training.config import grid_members

GRID = dict(k=(4, 8), arch=("topk", "jumprelu"))
NAMES = ["topk-d64-k4", "topk-d64-k8", "jumprelu-d64"]


def _cfg(run, **overrides):
    from conftest import tiny_train_config

    return tiny_train_config(run, **overrides)


def _weights(run, name):
    return load_file(run / "saes" / name / "sae_weights.safetensors")


def _assert_same_weights(run_a, name_a, run_b, name_b):
    a, b = _weights(run_a, name_a), _weights(run_b, name_b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{name_a} vs {name_b}: {key}"


def _log(run, name):
    lines = (run / "saes" / name / "train_log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def test_member_names_follow_the_rule():
    assert [m.name for m in grid_members(_cfg("r", **GRID))] == NAMES
    assert [m.name for m in grid_members(_cfg("r", name="sweep", d_sae=None, expansion=(4, 8)))] == [
        "sweep-topk-x4-k4",
        "sweep-topk-x8-k4",
    ]
    assert [m.name for m in grid_members(_cfg("r", lr=(1e-3, 2e-3)))] == ["topk-d64-k4-lr0.001", "topk-d64-k4-lr0.002"]
    alone = grid_members(_cfg("r", name="mine", k=8))
    assert [(m.name, m.k, m.arch) for m in alone] == [("mine", 8, "topk")]


def test_grid_options_are_checked_before_any_work(run_copy, capsys):
    with pytest.raises(ConfigError, match="--d-sae and --expansion are both lists"):
        _cfg(run_copy, d_sae=(64, 128), expansion=(4, 8))
    with pytest.raises(ConfigError, match=r"--k \(64\) must be smaller than --d-sae \(64\)"):
        _cfg(run_copy, k=(4, 64))
    with pytest.raises(SystemExit):
        main(["train", "--run", str(run_copy), "--batch-size", "256,512"])
    assert "argument --batch-size: takes one value, got '256,512'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--run", str(run_copy), "--arch", "topk,gated"])
    assert "invalid choice: 'gated'" in capsys.readouterr().err
    assert not (run_copy / "saes").exists()


def test_a_grid_member_equals_the_same_sae_trained_alone(run_copy):
    summaries = run_grid(_cfg(run_copy, **GRID))
    assert [s.folder.name for s in summaries] == NAMES
    run_train(_cfg(run_copy, name="alone", k=8))
    _assert_same_weights(run_copy, "topk-d64-k8", run_copy, "alone")
    assert _log(run_copy, "topk-d64-k8") == _log(run_copy, "alone")
    grid_cfg = json.loads((run_copy / "saes" / "topk-d64-k8" / "cfg.json").read_text())["saescope"]
    alone_cfg = json.loads((run_copy / "saes" / "alone" / "cfg.json").read_text())["saescope"]
    for record in (grid_cfg, alone_cfg):
        record["metrics"].pop("training_tokens_per_second")
        record["training"].pop("name")
    assert grid_cfg == alone_cfg
    run_train(_cfg(run_copy, name="jumprelu-alone", arch="jumprelu"))
    _assert_same_weights(run_copy, "jumprelu-d64", run_copy, "jumprelu-alone")


def test_a_killed_grid_resumes_every_member_exactly(run_copy, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    shutil.copytree(run_copy, whole)
    run_grid(_cfg(whole, **GRID))
    undo = crash_training_at(monkeypatch, 13)
    with pytest.raises(KeyboardInterrupt):
        run_grid(_cfg(run_copy, **GRID))
    undo()
    # members stop at different steps: the first one crashed in the middle of a chunk of batches the others
    # had not reached (or, with chunks of one, one member lost its newest checkpoint while writing it)
    shutil.rmtree(run_copy / "saes" / "jumprelu-d64" / "checkpoints" / "step-000000010", ignore_errors=True)
    summaries = run_grid(_cfg(run_copy, **GRID))
    resumed = [s.resumed_from for s in summaries]
    assert resumed[0] == 10 and min(resumed) < 10
    for name in NAMES:
        _assert_same_weights(run_copy, name, whole, name)
        assert _log(run_copy, name) == _log(whole, name)


def test_chunks_of_one_batch_give_the_same_grid(run_copy, tmp_path, monkeypatch):
    import jobs.training.grid

    other = tmp_path / "chunk1"
    shutil.copytree(run_copy, other)
    run_grid(_cfg(run_copy, **GRID))
    monkeypatch.setattr(jobs.training.grid, "GRID_CHUNK_MAX", 1)
    run_grid(_cfg(other, **GRID))
    for name in NAMES:
        _assert_same_weights(run_copy, name, other, name)


def test_finished_members_are_skipped(run_copy):
    run_grid(_cfg(run_copy, **GRID))
    kept = _weights(run_copy, "topk-d64-k4")
    shutil.rmtree(run_copy / "saes" / "topk-d64-k8")
    summaries = run_grid(_cfg(run_copy, **GRID))
    assert [s.already_done for s in summaries] == [True, False, True]
    assert summaries[0].metrics["l0"] > 0  # a skipped member still reports its recorded metrics
    assert torch.equal(_weights(run_copy, "topk-d64-k4")["W_dec"], kept["W_dec"])
    with pytest.raises(ConfigError, match="make a grid of 3 SAEs"):
        run_train(_cfg(run_copy, **GRID))


def test_cli_prints_one_table_sorted_by_l0(run_copy, capsys):
    args = ["train", "--run", str(run_copy), "--d-sae", "64", "--k", "8,4", "--tokens", "3072"]
    args += ["--batch-size", "256", "--device", "cpu", "--dtype", "float32", "--lm-eval-contexts", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("SAE "))
    assert lines[header].split()[:8] == ["SAE", "arch", "d_sae", "k", "FVU", "PCA", "FVU", "L0"]
    assert [line.split()[0] for line in lines[header + 1 : header + 3]] == ["topk-d64-k4", "topk-d64-k8"]
    assert "trained a grid of 2 SAEs (2 in this job" in out


def test_overview_draws_the_frontier_with_a_link_per_sae(indexed_run, tmp_path, monkeypatch):
    import pyarrow
    from streamlit.testing.v1 import AppTest

    run = tmp_path / "two-saes"
    shutil.copytree(indexed_run[0], run)
    run_train(_cfg(run, name="wider", d_sae=96, k=8))
    monkeypatch.setenv("SAESCOPE_RUN", str(run))
    app = AppTest.from_string("from dashboards.views import overview\noverview.render()\n", default_timeout=120)
    app.run()
    assert not app.exception
    charts = [chart for chart in app.get("vega_lite_chart") if "href" in json.loads(chart.proto.spec)["encoding"]]
    assert len(charts) == 1
    spec = json.loads(charts[0].proto.spec)
    assert spec["encoding"]["href"]["field"] == "url"
    assert (spec["encoding"]["x"]["field"], spec["encoding"]["y"]["field"]) == ("L0", "FVU")
    points = pyarrow.ipc.open_stream(charts[0].proto.datasets[0].data.data).read_all().to_pydict()
    assert sorted(points["url"]) == ["./overview?sae=default", "./overview?sae=wider"]
    assert "L0-FVU frontier" in "".join(c.value for c in app.caption)


def test_overview_of_a_run_with_one_sae_has_no_frontier(indexed_run, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("SAESCOPE_RUN", str(indexed_run[0]))
    app = AppTest.from_string("from dashboards.views import overview\noverview.render()\n", default_timeout=120)
    app.run()
    assert not app.exception
    assert "L0-FVU frontier" not in "".join(c.value for c in app.caption)


def test_a_matryoshka_member_equals_it_alone_with_the_default_widths(run_copy):
    members = grid_members(_cfg("r", arch=("topk", "matryoshka"), matryoshka_widths="8,64"))
    assert [(m.name, m.matryoshka_widths) for m in members] == [("topk-d64-k4", None), ("matryoshka-d64-k4", "8,64")]
    summaries = run_grid(_cfg(run_copy, arch=("batchtopk", "matryoshka")))
    assert [s.folder.name for s in summaries] == ["batchtopk-d64-k4", "matryoshka-d64-k4"]
    run_train(_cfg(run_copy, name="alone", arch="matryoshka"))
    _assert_same_weights(run_copy, "matryoshka-d64-k4", run_copy, "alone")
    assert _log(run_copy, "matryoshka-d64-k4") == _log(run_copy, "alone")
    saved = json.loads((run_copy / "saes" / "alone" / "cfg.json").read_text())
    assert saved["matryoshka_widths"] == [4, 8, 16, 32, 64]
    assert "matryoshka_widths" not in json.loads((run_copy / "saes" / "batchtopk-d64-k4" / "cfg.json").read_text())
