"""Killed anywhere, lose nothing: SIGKILL each job at fixed points, re-run, compare with a clean run.

The short, deterministic version of bench/chaos.py: each kill lands right after the
N-th call of a named function (a shard just written but not yet listed, a checkpoint
just saved, a batch of codes spilled, ...), never at a timed moment.
"""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import chaos  # noqa: E402

KILLED = -signal.SIGKILL

KILL_POINTS = {
    "cache": [("jobs.cache_shards", "write_shard", 3), ("jobs.cache_shards", "write_manifest", 6)],
    "train": [("pipeline.sae.training", "train_step", 9), ("jobs.training.grid", "save_checkpoint", 2)],
    "index": [
        ("storage.index_builder", "IndexBuilder.add_contexts", 5),
        ("storage.index_builder", "IndexBuilder.finish", 1),
    ],
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, text_corpus):
    """(work folder, reference run, corpus): cache, train and index run once without interruption."""
    work = tmp_path_factory.mktemp("chaos")
    corpus = work / "corpus.txt"
    from conftest import synthetic_corpus

    corpus.write_text(synthetic_corpus(4000), encoding="utf-8")
    run = work / "reference"
    for job in ("cache", "train", "index"):
        result = chaos.run_job(chaos.job_args(job, run, tiny_model_dir, corpus), work / "home")
        assert result.returncode == 0, result.stderr
    return work, run, corpus


@pytest.mark.parametrize("job", ["cache", "train", "index"])
def test_kills_at_fixed_points_then_resume_equal_an_uninterrupted_run(reference, tiny_model_dir, tmp_path, job):
    work, run, corpus = reference
    target = tmp_path / "run"
    chaos.prepare(job, run, target)
    args = chaos.job_args(job, target, tiny_model_dir, corpus)
    for module, attribute, nth in KILL_POINTS[job]:
        assert chaos.run_with_kill_at(args, work / "home", module, attribute, nth) == KILLED
    finished = chaos.run_job(args, work / "home")
    assert finished.returncode == 0, finished.stderr
    assert chaos.differences(job, run, target) == []


def test_a_killed_index_build_keeps_the_previous_index(reference, tiny_model_dir, tmp_path):
    work, run, corpus = reference
    target = tmp_path / "run"
    shutil.copytree(run, target)
    before = chaos.index_fingerprint(target)
    args = chaos.job_args("index", target, tiny_model_dir, corpus)
    assert chaos.run_with_kill_at(args, work / "home", "storage.index_builder", "IndexBuilder.add_codes", 4) == KILLED
    assert chaos.index_fingerprint(target) == before
