"""Chaos benchmark: kill the cache, train and index jobs anywhere, resume, and compare with a clean run.

On a small run (a random 4-layer Llama built in code, ~16k tokens of synthetic text),
each job first runs uninterrupted (the reference). Then, for each job, it is started
again on a fresh copy and killed with SIGKILL at seeded random moments, re-run after
every kill until it finishes, and compared with the reference:
  cache  - the shard sha256 list of the manifest;
  train  - every tensor of sae_weights.safetensors with torch.equal;
  index  - every table of features.duckdb, row for row.
A second round sends SIGINT instead: the job must exit with status 130 and print one
line, and the re-run must again match. It prints kills, resumes and differences.

    python bench/chaos.py [--kills 12] [--seed 0]

``run_with_kill_at`` (a deterministic kill after the N-th call of a named function) is
also what tests/test_chaos.py uses for its short fixed-point version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KILL_AFTER = """
import importlib, os, signal, sys
module_name, attribute, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
owner_name, _, name = attribute.rpartition(".")
module = importlib.import_module(module_name)
owner = getattr(module, owner_name) if owner_name else module
real = getattr(owner, name)
calls = [0]
def wrapped(*args, **kwargs):
    result = real(*args, **kwargs)
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(owner, name, wrapped)
from jobs.cli import main
sys.exit(main(sys.argv[4:]))
"""


def job_args(job: str, run: Path, model: Path, corpus: Path) -> list[str]:
    common = ["--run", str(run), "--device", "cpu"]
    if job == "cache":
        return ["cache", *common, "--model", str(model), "--dataset", str(corpus), "--tokens", "16384",
                "--ctx-len", "32", "--batch-size", "16", "--shard-tokens", "1024", "--dtype", "float32",
                "--model-dtype", "float32"]  # fmt: skip
    if job == "train":
        return ["train", *common, "--d-sae", "64", "--k", "4", "--tokens", str(256 * 60), "--batch-size", "256",
                "--lm-eval-contexts", "0", "--dtype", "float32", "--checkpoint-every", "6"]  # fmt: skip
    return ["index", *common, "--top-k", "5", "--window", "4", "--batch-contexts", "7"]


def environment(home: Path) -> dict:
    return {**os.environ, "SAESCOPE_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PYTHONPATH": str(ROOT)}  # fmt: skip


def run_job(args: list[str], home: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "jobs.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=environment(home), cwd=ROOT, timeout=900)


def run_with_kill_at(args: list[str], home: Path, module: str, attribute: str, nth: int) -> int:
    """Run a job and SIGKILL it right after the ``nth`` call of ``module.attribute``; return its status."""
    command = [sys.executable, "-c", KILL_AFTER, module, attribute, str(nth), *args]
    return subprocess.run(command, capture_output=True, env=environment(home), cwd=ROOT, timeout=900).returncode


def cache_fingerprint(run: Path) -> list[str]:
    manifest = json.loads((run / "activations" / "manifest.json").read_text())
    return [shard["sha256"] for shard in manifest["shards"]]


def weights_fingerprint(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "saes" / "default" / "sae_weights.safetensors")


def index_fingerprint(run: Path) -> dict[str, str]:
    """Per table, a hash of all rows in a fixed order (metadata without its build time)."""
    import duckdb

    con = duckdb.connect(str(run / "saes" / "default" / "features.duckdb"), read_only=True)
    tables = [name for (name,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()]
    digests = {}
    for table in sorted(tables):
        rows = con.execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall()
        if table == "metadata":
            rows = [row for row in rows if row[0] not in ("index",)]
        digests[table] = hashlib.sha256(repr(rows).encode()).hexdigest()
    con.close()
    return digests


def differences(job: str, reference: Path, candidate: Path) -> list[str]:
    import torch

    if job == "cache":
        return [] if cache_fingerprint(reference) == cache_fingerprint(candidate) else ["shard sha256s differ"]
    if job == "train":
        a, b = weights_fingerprint(reference), weights_fingerprint(candidate)
        return [name for name in a if not torch.equal(a[name], b[name])]
    a, b = index_fingerprint(reference), index_fingerprint(candidate)
    return [table for table in a if a[table] != b.get(table)]


def build_inputs(folder: Path) -> tuple[Path, Path]:
    """The tiny model (saved as a model folder) and a synthetic text corpus."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_llama, make_tokenizer, synthetic_corpus

    tokenizer = make_tokenizer()
    model_dir = folder / "tiny-llama"
    make_tiny_llama(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus = folder / "corpus.txt"
    corpus.write_text(synthetic_corpus(4000), encoding="utf-8")
    return model_dir, corpus


def prepare(job: str, reference: Path, target: Path) -> None:
    """A fresh copy holding everything the job needs, and none of its own output."""
    if job == "cache":
        return
    shutil.copytree(reference, target)
    if job == "train":
        shutil.rmtree(target / "saes")
    else:
        (target / "saes" / "default" / "features.duckdb").unlink()


def chaos_round(job: str, reference: Path, work: Path, model: Path, corpus: Path, rng, kills: int, sig) -> dict:
    """Rounds on fresh copies, each killed and resumed until it finishes, until ``kills`` kills landed."""
    started = time.perf_counter()
    report = {"job": job, "signal": sig.name, "kills": 0, "resumes": 0, "rounds": 0, "differences": [],
              "bad_interrupt_exits": []}  # fmt: skip
    while report["kills"] < kills and report["rounds"] < 3 * kills:
        target = work / f"{job}-{sig.name}-{report['rounds']}"
        one = one_round(job, reference, target, model, corpus, rng, sig, kills - report["kills"])
        report["rounds"] += 1
        for key in ("kills", "resumes"):
            report[key] += one[key]
        report["differences"] += one["differences"]
        report["bad_interrupt_exits"] += one["bad_interrupt_exits"]
        shutil.rmtree(target, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def one_round(job, reference, target, model, corpus, rng, sig, kills: int) -> dict:
    prepare(job, reference, target)
    args = job_args(job, target, model, corpus)
    duration = reference_duration[job]
    done, n_kills, resumes, bad_exits = False, 0, 0, []
    while not done:
        process = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], env=environment(target.parent / "home"),
                                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        delay = rng.uniform(0.3, max(0.6, duration)) if n_kills < kills else None
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.send_signal(sig)
            _, err = process.communicate(timeout=120)
            n_kills += 1
            last = (err.strip().splitlines() or [""])[-1]
            interrupted = process.returncode == 130 and last.startswith("interrupted:")
            if sig == signal.SIGINT and not (interrupted or process.returncode == 0):  # 0: it had just finished
                bad_exits.append(f"exit {process.returncode}: {last}")
            resumes += 1
            continue
        _, err = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"{job} failed after {n_kills} kills: {err}")
        done = True
    return {"kills": n_kills, "resumes": resumes, "differences": differences(job, reference, target),
            "bad_interrupt_exits": bad_exits}  # fmt: skip


reference_duration: dict[str, float] = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=12, help="SIGKILLs per job (and half as many SIGINTs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        model, corpus = build_inputs(work)
        reference = work / "reference"
        for job in ("cache", "train", "index"):
            start = time.perf_counter()
            result = run_job(job_args(job, reference, model, corpus), work / "home")
            if result.returncode != 0:
                raise RuntimeError(f"reference {job} failed: {result.stderr}")
            reference_duration[job] = time.perf_counter() - start
            print(f"reference {job}: {reference_duration[job]:.1f}s", flush=True)
        totals = {"kills": 0, "differences": 0}
        for sig, kills in ((signal.SIGKILL, args.kills), (signal.SIGINT, max(1, args.kills // 2))):
            for job in ("cache", "train", "index"):
                report = chaos_round(job, reference, work, model, corpus, rng, kills, sig)
                totals["kills"] += report["kills"]
                totals["differences"] += len(report["differences"]) + len(report["bad_interrupt_exits"])
                print(json.dumps(report), flush=True)
        print(f"total: {totals['kills']} kills and interrupts, {totals['differences']} differences")


if __name__ == "__main__":
    main()
