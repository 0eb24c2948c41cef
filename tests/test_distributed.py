"""`torchrun --standalone` on CPU (gloo): two ranks cache and train what one process does.

Every launch goes through the real console script exactly as a user types it
(`torchrun ... -- saescope cache --run R`), one thread per process so one-process
and two-process runs do the same arithmetic. After each test no process started
for it may remain.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from storage.shards import iter_shards, read_manifest, write_manifest
from storage.writer_manifests import read_writer_manifests, write_writer_manifest

SAESCOPE = str(Path(sys.executable).with_name("saescope"))
COLLECTIVE_TIMEOUT_S = 120  # generous: a slow CI machine must not time out a healthy barrier (rank 0 evaluates alone)


def cache_args(run: Path, model: Path, corpus: Path) -> list[str]:
    return [
        "cache",
        "--run",
        str(run),
        "--model",
        str(model),
        "--dataset",
        str(corpus),
        "--tokens",
        "14336",  # 448 contexts: 14 shards of 32
        "--ctx-len",
        "32",
        "--batch-size",
        "16",
        "--shard-tokens",
        "1024",
        "--dtype",
        "float32",
        "--model-dtype",
        "float32",
        "--device",
        "cpu",
    ]


def train_args(run: Path, name: str, tokens: int, arch: str = "topk") -> list[str]:
    return [
        "train",
        "--run",
        str(run),
        "--name",
        name,
        "--arch",
        arch,
        "--d-sae",
        "128",
        "--k",
        "4",
        "--batch-size",
        "250",  # not a multiple of 3: ranks of a 3-process run get 84, 83 and 83 rows
        "--tokens",
        str(tokens),
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--lm-eval-contexts",
        "0",
        "--checkpoint-every",
        "10",
    ]


def command(args: list[str], nproc: int | None) -> list[str]:
    if nproc is None:
        return [SAESCOPE, *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "--"]
    return [*launcher, SAESCOPE, *args]


def environment() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "SAESCOPE_DIST_TIMEOUT": str(COLLECTIVE_TIMEOUT_S),
        "PYTHONWARNINGS": "ignore",
    }


def saescope(args: list[str], nproc: int | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command(args, nproc), env=environment(), capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def started_for(marker: str) -> list[psutil.Process]:
    """Live processes whose command line mentions ``marker`` (a test's temp folder)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if process.pid != os.getpid() and marker in " ".join(process.info["cmdline"] or []):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.fixture
def no_strays(tmp_path):
    yield tmp_path
    deadline = time.monotonic() + 10
    while started_for(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert started_for(str(tmp_path)) == []


def cache_contents(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [C, T], activations [C, T, D]) of a cache in manifest order."""
    folder = run / "activations"
    manifest = read_manifest(folder)
    assert manifest.complete
    shards = list(iter_shards(folder, manifest))
    return torch.cat([s.tokens_CT for s in shards]), torch.cat([s.activations_CTD for s in shards])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from conftest import synthetic_corpus

    path = tmp_path_factory.mktemp("dist-corpus") / "corpus.txt"
    path.write_text(synthetic_corpus(4000), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_process_cache(tmp_path_factory, tiny_model_dir, corpus) -> Path:
    run = tmp_path_factory.mktemp("dist-one") / "run"
    saescope(cache_args(run, tiny_model_dir, corpus))
    return run


def test_two_rank_cache_equals_one_process(no_strays, tiny_model_dir, corpus, one_process_cache):
    run = no_strays / "two"
    saescope(cache_args(run, tiny_model_dir, corpus), nproc=2)
    manifest = read_manifest(run / "activations")
    assert {record.writer for record in manifest.shards} == {"w00", "w01"}
    assert [record.first_context for record in manifest.shards] == list(range(0, 448, 32))
    assert read_writer_manifests(run / "activations") == []  # merged, then removed
    tokens, acts = cache_contents(run)
    one_tokens, one_acts = cache_contents(one_process_cache)
    assert torch.equal(tokens, one_tokens)
    assert acts.numpy().tobytes() == one_acts.numpy().tobytes()  # byte-identical, context by context


def _interrupted_copy(source: Path, target: Path, keep_merged: int, keep_w01: list[int]) -> None:
    """A copy of a finished two-writer cache as a killed launch leaves it: a prefix merged, some w01 shards listed."""
    shutil.copytree(source, target)
    folder = target / "activations"
    manifest = read_manifest(folder)
    merged = manifest.shards[:keep_merged]
    late = [r for r in manifest.shards if r.writer == "w01" and r.index in keep_w01]
    for record in manifest.shards:
        if record not in merged and record not in late:
            (folder / record.file).unlink()
    write_manifest(folder, replace(manifest, shards=merged, complete=False, extra={}))
    write_writer_manifest(folder, "w01", replace(manifest, shards=tuple(late), complete=False, extra={}))


def test_cache_resumes_under_another_world_size(no_strays, tiny_model_dir, corpus, one_process_cache):
    two = no_strays / "two"
    saescope(cache_args(two, tiny_model_dir, corpus), nproc=2)
    for nproc, name in ((3, "to-three"), (None, "to-one")):
        run = no_strays / name
        _interrupted_copy(two, run, keep_merged=3, keep_w01=[5, 9])
        result = saescope(cache_args(run, tiny_model_dir, corpus), nproc=nproc)
        assert "cached 9.22k new tokens" in result.stdout  # 14 shards - 3 merged - 2 listed by w01: 9 x 1024
        tokens, acts = cache_contents(run)
        one_tokens, one_acts = cache_contents(one_process_cache)
        assert torch.equal(tokens, one_tokens) and torch.equal(acts, one_acts)


def _weights(run: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(run / "saes" / name / "sae_weights.safetensors")


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_two_rank_training_equals_one_process(no_strays, one_process_cache, arch):
    run = no_strays / "run"
    shutil.copytree(one_process_cache, run)
    saescope(train_args(run, "one", 15000, arch))
    result = saescope(train_args(run, "two", 15000, arch), nproc=2)
    assert "data-parallel over 2 ranks: each computes 125 of every batch's 250 tokens" in result.stdout
    one, two = _weights(run, "one"), _weights(run, "two")
    assert one.keys() == two.keys()
    for key in one:  # 60 steps; summing gradients over ranks reorders float additions, nothing else
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=2e-5)


def test_two_rank_grid_equals_one_process_grid(no_strays, one_process_cache):
    run = no_strays / "run"
    shutil.copytree(one_process_cache, run)
    grid = ["--k", "4,8"]  # the last --k wins: a grid of two TopK SAEs
    saescope(train_args(run, "one", 5000) + grid)
    result = saescope(train_args(run, "two", 5000) + grid, nproc=2)
    assert "data-parallel over 2 ranks" in result.stdout and "trained a grid of 2 SAEs" in result.stdout
    for member in ("topk-d128-k4", "topk-d128-k8"):
        one, two = _weights(run, f"one-{member}"), _weights(run, f"two-{member}")
        assert one.keys() == two.keys()
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=0, atol=2e-5)


def test_training_checkpoint_resumes_under_another_world_size(no_strays, one_process_cache, monkeypatch):
    import jobs.train as train_job
    import pipeline.sae.training as training
    from jobs.cli import build_parser
    from jobs.options import config_from_args

    run = no_strays / "run"
    shutil.copytree(one_process_cache, run)
    saescope(train_args(run, "whole", 15000))
    real_step = training.train_step

    def stop_at_step_25(sae, optimizer, x, state, cfg, *rest):
        if state.step == 25:
            raise KeyboardInterrupt
        return real_step(sae, optimizer, x, state, cfg, *rest)

    monkeypatch.setattr(training, "train_step", stop_at_step_25)
    args = build_parser().parse_args(train_args(run, "moved", 15000))
    with pytest.raises(KeyboardInterrupt):
        train_job.run_train(config_from_args(train_job.TrainJobConfig, args))
    assert (run / "saes" / "moved" / "checkpoints" / "step-000000020").is_dir()
    result = saescope(train_args(run, "moved", 15000), nproc=3)
    assert "resuming 'moved' from its checkpoint at step 20" in result.stdout
    whole, moved = _weights(run, "whole"), _weights(run, "moved")
    for key in whole:
        torch.testing.assert_close(moved[key], whole[key], rtol=0, atol=2e-5)


def _rank_process(marker: str, rank: int) -> psutil.Process | None:
    for process in started_for(marker):
        try:
            is_worker = "torch.distributed.run" not in " ".join(process.cmdline())
            if is_worker and process.environ().get("RANK") == str(rank):
                return process
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_a_killed_rank_stops_the_whole_launch(no_strays, one_process_cache):
    run = no_strays / "run"
    shutil.copytree(one_process_cache, run)
    launch = subprocess.Popen(
        command(train_args(run, "long", 50_000_000), nproc=2),
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log = run / "saes" / "long" / "train_log.jsonl"
        deadline = time.monotonic() + 240
        while not (log.is_file() and log.stat().st_size) and launch.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # waiting for training to be under way (an event, not a duration)
        victim = _rank_process(str(run), 1)
        assert victim is not None and launch.poll() is None, "training did not start"
        victim.send_signal(signal.SIGKILL)
        output, _ = launch.communicate(timeout=COLLECTIVE_TIMEOUT_S + 60)
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
            launch.wait()
    assert launch.returncode != 0
    assert "rank      : 1" in output and "SIGKILL" in output  # torchrun names the rank that died
    assert not (run / "saes" / "long" / "sae_weights.safetensors").exists()


def test_only_cache_and_train_run_on_several_ranks(monkeypatch, run_copy, capsys):
    from jobs.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["index", "--run", str(run_copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "error: rank 1 of 2: `saescope index` runs in one process: start it without torchrun "
        "(only cache and train run on several ranks)"
    )
