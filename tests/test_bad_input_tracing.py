"""Bad input to `trace`, `export-transcoders` and `compare`: one line, exit 2, nothing written or changed.

Every CLI case runs the real entry point, asserts the one line (no traceback) and hashes the
folders it could touch before and after. Also: the graph estimate against hand-computed values,
the memory refusal of a long prompt (free memory monkeypatched), a saved graph name refused
without --force and replaced whole with it, and the progress callback once per backward pass.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import jobs.trace as trace_job
from pipeline.tracing.attribution import attribute, target_logits
from pipeline.tracing.estimate import RUNTIME_BYTES, GraphShape, estimate, largest_fitting
from pipeline.tracing.replacement import build_replacement, record_prompt
from storage.graph_groups import graph_files, graphs_dir, read_graph_json, supernodes_path
from storage.transcoder_store import set_dir
from tests.conftest import make_tiny_llama, synthetic_corpus, tiny_cache_config
from tests.test_bad_input import one_line_error, run_cli
from tests.test_tracing import N_LAYERS, random_transcoder


def tree_hash(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file, and '/' for every folder, under ``folder``."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "/"
        for path in sorted(folder.rglob("*"))
    }


@pytest.fixture
def tc_run(transcoder_run, tmp_path) -> Path:
    """A private copy of the tiny run with the transcoder set ``tc`` at every layer."""
    run = tmp_path / "tc-run"
    shutil.copytree(transcoder_run, run)
    return run


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(trace_job, "load_run_model", lambda *_: pytest.fail("the model loaded before the check"))


def refused(capsys, folders: list[Path], *args) -> str:
    """Run the CLI; assert exit 2 with one line and no change under ``folders``; return the line."""
    before = [tree_hash(folder) for folder in folders]
    code, err = run_cli(capsys, *args)
    line = one_line_error(code, err)
    assert len([x for x in err.strip().splitlines() if x.strip()]) == 1, err
    assert [tree_hash(folder) for folder in folders] == before
    return line


# --- the shared device check -----------------------------------------------------------------


def _bad_devices() -> list[tuple[str, str]]:
    cases = [("bogus", "is not a device: use cpu, cuda or cuda:N"), ("meta", "saescope runs on cpu, cuda, mps only")]
    if not torch.cuda.is_available():
        cases.append(("cuda", "torch sees no CUDA GPU on this machine: use --device cpu"))
    if torch.cuda.device_count() < 8:
        cases.append(("cuda:7", "--device 'cuda:7'"))
    if not torch.backends.mps.is_available():
        cases.append(("mps", "torch sees no MPS (Apple GPU)"))
    return cases


@pytest.mark.parametrize(("device", "message"), _bad_devices())
def test_trace_refuses_a_device_this_machine_lacks_before_the_model_loads(tc_run, capsys, no_model, device, message):
    line = refused(capsys, [tc_run], "trace", "--run", tc_run, "--prompt", "The cat", "--device", device)
    assert message in line and "--device" in line


def test_compare_refuses_a_bogus_device_before_reading_the_saes(indexed_copy, capsys):
    line = refused(capsys, [indexed_copy], "compare", "--run", indexed_copy, "--sae", "a", "--sae", "b",
                   "--device", "gpu0")  # fmt: skip
    assert "--device 'gpu0' is not a device: use cpu, cuda, cuda:N or auto" in line


# --- trace ---------------------------------------------------------------------------------------


def test_label_contexts_beyond_the_cache_are_refused_naming_the_bound(tc_run, capsys, no_model):
    line = refused(capsys, [tc_run], "trace", "--run", tc_run, "--prompt", "The cat", "--label-contexts", "100000")
    assert "--label-contexts 100000 is more than the 512 contexts the run's cache holds: use at most 512" in line


def test_a_graph_folder_that_cannot_be_made_is_refused(tc_run, capsys, no_model):
    (tc_run / "graphs").write_text("not a folder")
    line = refused(capsys, [tc_run], "trace", "--run", tc_run, "--prompt", "The cat")
    assert "--run" in line and "graphs is a file, not a folder" in line


def test_a_prompt_too_long_for_the_free_memory_is_refused_with_the_estimate(tc_run, capsys, no_model, monkeypatch):
    monkeypatch.setattr(trace_job, "free_memory", lambda _device: 150 * 2**20)
    line = refused(capsys, [tc_run], "trace", "--run", tc_run, "--prompt", "the cat sat on the mat " * 60)
    assert "--prompt: tracing" in line and "would need about" in line and "but 150 MiB is free" in line
    assert "active features" in line and "use a prompt of at most" in line


def test_a_saved_graph_name_is_refused_without_force_and_replaced_whole_with_it(tc_run, capsys, monkeypatch):
    folder = graphs_dir(tc_run)
    folder.mkdir()
    (folder / "cat.json").write_text('{"old": true}')
    (folder / "cat.safetensors").write_bytes(b"old unpruned graph")
    supernodes_path(tc_run, "cat").write_text('{"format_version": 1, "graph": "cat", "supernodes": [["g", "1_2_3"]]}')
    with monkeypatch.context() as patched:
        patched.setattr(trace_job, "load_run_model", lambda *_: pytest.fail("the model loaded before the check"))
        line = refused(capsys, [tc_run], "trace", "--run", tc_run, "--prompt", "The cat sat", "--name", "cat")
    assert "graph 'cat' is already saved" in line and "cat.json" in line and "cat.supernodes.json" in line
    assert "--force" in line

    code, err = run_cli(capsys, "trace", "--run", tc_run, "--prompt", "The cat sat", "--name", "cat", "--force")
    assert code == 0, err
    assert "estimate: " in err and "backward passes" in err
    assert [path.name for path in graph_files(tc_run, "cat")] == ["cat.safetensors", "cat.json"]
    assert (folder / "cat.safetensors").read_bytes() != b"old unpruned graph"
    assert read_graph_json(tc_run, "cat")["metadata"]["slug"] == "cat"


def test_the_default_name_from_the_prompt_is_refused_too(tc_run, capsys, no_model):
    graphs_dir(tc_run).mkdir()
    (graphs_dir(tc_run) / "the-cat.supernodes.json").write_text("{}")
    line = refused(capsys, [tc_run], "trace", "--run", tc_run, "--prompt", "The cat")
    assert "graph 'the-cat' is already saved" in line


# --- export-transcoders ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "message"),
    [
        (lambda run: run / "transcoders" / "tc", "is the transcoder set"),
        (lambda run: run / "transcoders" / "tc" / "layer-00" / "out", "is inside the transcoder set"),
        (lambda run: run, "holds the transcoder set"),
    ],
)
def test_export_never_writes_into_the_set_it_reads_even_with_force(tc_run, capsys, where, message):
    line = refused(capsys, [tc_run], "export-transcoders", "--run", tc_run, "--out", where(tc_run), "--force")
    assert f"--out {where(tc_run)} {message}" in line and "choose a folder outside the set" in line


def test_export_under_an_existing_file_is_refused(tc_run, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    line = refused(capsys, [tc_run, tmp_path], "export-transcoders", "--run", tc_run, "--out", blocker / "out")
    assert f"--out {blocker / 'out'} is under {blocker}, a file, not a folder" in line
    line = refused(capsys, [tc_run, tmp_path], "export-transcoders", "--run", tc_run, "--out", blocker)
    assert f"--out {blocker} is a file" in line


def test_export_of_a_set_missing_layers_names_them(tc_run, tmp_path, capsys):
    record_path = set_dir(tc_run, "tc") / "set.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "layers": [0, 1, 3]}))
    out = tmp_path / "out"
    line = refused(capsys, [tc_run, tmp_path], "export-transcoders", "--run", tc_run, "--out", out)
    assert "transcoder set 'tc' lacks layer 2 of the model's 0-3" in line and "--layers all" in line
    assert not out.exists()


# --- compare -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_point_run(tmp_path_factory, tiny_model_dir, indexed_run) -> Path:
    """A cache of resid-post at blocks 0 and 2, with the indexed run's SAE copied as 'early' (block 0), 'late' (2)."""
    from dataclasses import replace

    from jobs.cache import run_cache

    root = tmp_path_factory.mktemp("two-points")
    corpus = root / "corpus.txt"
    corpus.write_text(synthetic_corpus(400), encoding="utf-8")
    cfg = tiny_cache_config(root / "run", tiny_model_dir, corpus)
    run_cache(replace(cfg, tokens=1024, hooks="resid-post", layers="0,2"))
    source = indexed_run[0] / "saes" / "default"
    for name, layer in (("early", 0), ("late", 2)):
        folder = root / "run" / "saes" / name
        shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.duckdb*", "checkpoints"))
        sae_cfg = json.loads((folder / "cfg.json").read_text())
        for block in (sae_cfg, sae_cfg.get("meta") or {}):
            if "hook_name" in block:
                block["hook_name"], block["hook_layer"] = f"blocks.{layer}.hook_resid_post", layer
        (folder / "cfg.json").write_text(json.dumps(sae_cfg))
    return root / "run"


def test_compare_refuses_saes_of_different_hook_points_naming_both(two_point_run, capsys):
    line = refused(capsys, [two_point_run], "compare", "--run", two_point_run, "--sae", "early", "--sae", "late")
    assert "reads blocks.0.hook_resid_post" in line and "reads blocks.2.hook_resid_post" in line
    assert "saes/early" in line and "saes/late" in line and "compare two SAEs of one hook point" in line


# --- the estimate --------------------------------------------------------------------------------


def test_the_estimate_matches_the_formula_worked_by_hand():
    shape = GraphShape(n_tokens=2, n_layers=1, d_model=2, vocab=3, d_sae=4, active_per_token=1, batch_size=1,
                       max_feature_nodes=10, n_logits=1, n_heads=1, n_params=10)  # fmt: skip
    est = estimate(shape)
    # n = 1*2*1 = 2, m = 2, S = 2 + 2 + 2 = 6, N = 2 + 2 + 2 + 1 = 7, B = 1 + 2 = 3
    assert (est.n_active, est.n_feature_nodes, est.n_nodes, est.n_backward_passes) == (2, 2, 7, 3)
    # weights 10 + (16 + 4 + 8 + 2); prompt 6 + (24 + 4) + 8 + 4 + 4; backward 36 + 4 + 72 + 4
    assert est.stages == {"weights": 40, "prompt": 50, "backward": 116, "assemble": 81, "prune": 588, "labels": 98}
    assert est.peak_bytes == 4 * (40 + 588) + RUNTIME_BYTES  # pruning's 12 N^2 outweighs prompt + backward = 166
    assert est.flops["record"] == 136 and est.flops["backward"] == 3 * 80 and est.flops["select"] == 0
    assert est.flops["prune"] == pytest.approx(4 * 3 * 49 + 4 * 49 * math.log2(49))


def test_selection_is_costed_per_batch_when_features_exceed_the_cap():
    shape = GraphShape(n_tokens=2, n_layers=1, d_model=2, vocab=3, d_sae=4, active_per_token=2, batch_size=1,
                       max_feature_nodes=2, n_logits=1, n_heads=1, n_params=10)  # fmt: skip
    # n = 4 > M = 2: batches see f = 1 then 2 rows; S = 4 + 2 + 2 = 8: 2 * (1 + 2) * 8 + 2 * 3 * (1 + 4)
    assert estimate(shape).flops["select"] == 78


def test_largest_fitting_prompt_is_the_longest_whose_peak_fits():
    shape = GraphShape(n_tokens=300, n_layers=4, d_model=32, vocab=100, d_sae=64, active_per_token=4)
    free = estimate(GraphShape(n_tokens=40, n_layers=4, d_model=32, vocab=100, d_sae=64, active_per_token=4)).peak_bytes
    assert largest_fitting(shape, "n_tokens", free) == 40
    assert largest_fitting(shape, "n_tokens", RUNTIME_BYTES) is None  # not even one token fits


# --- progress --------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_feature_nodes", [2000, 5])
def test_the_progress_callback_hears_every_backward_pass_once(tokenizer, max_feature_nodes):
    model = make_tiny_llama(len(tokenizer), n_layers=N_LAYERS, d_model=32).double()
    generator = torch.Generator().manual_seed(0)
    tcs = {layer: random_transcoder(generator) for layer in range(N_LAYERS)}
    rep = build_replacement(record_prompt(model, torch.tensor(tokenizer("The cat sat on.").input_ids)), tcs)
    tokens, probs = target_logits(rep.record.logits_TV[-1])
    calls = []
    graph = attribute(model, rep, tokens, probs, max_feature_nodes, batch_size=3, on_batch=lambda *a: calls.append(a))
    total = graph.n_backward_passes
    assert total > 2 and calls == [(done, total) for done in range(1, total + 1)]
