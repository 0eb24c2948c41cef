"""Benchmark: `saescope explain` (token explainer + token simulation + MiniLM embedding scorer) on a whole SAE.

Target (issue 12): every live feature of the demo SAE (4,608 latents) in under 3
minutes on 2 CPU cores. The job runs on a throw-away copy of the run's small
files (manifest, SAE, index: the activations are never read), so the real
explanations are untouched. In the same run it measures a baseline: MiniLM
embedding the same number of texts the job embedded, alone — the floor of the
embedding scorer — and prints the job's wall time against it and against the target.

    python bench/explain_speed.py [--run runs/demo] [--features all]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.explain import ExplainConfig, run_explain  # noqa: E402

TARGET_SECONDS = 180.0


def small_copy(run: Path, target: Path) -> Path:
    """The run's manifest, config, SAE and index, without activations or explanations."""
    (target / "activations").mkdir(parents=True)
    shutil.copy(run / "activations" / "manifest.json", target / "activations" / "manifest.json")
    if (run / "run.toml").exists():
        shutil.copy(run / "run.toml", target / "run.toml")
    for sae in (run / "saes").iterdir():
        folder = target / "saes" / sae.name
        folder.mkdir(parents=True)
        for name in ("cfg.json", "sae_weights.safetensors", "features.duckdb"):
            shutil.copy(sae / name, folder / name)
    return target


def embedded_texts(path: Path) -> int:
    """How many texts the job embedded: explanations, top-example texts and distinct scored windows."""
    con = duckdb.connect(str(path), read_only=True)
    n_features = con.execute("SELECT count(*) FROM explanations").fetchone()[0]
    windows = con.execute(
        "SELECT count(DISTINCT k) FROM (SELECT unnest(keys) AS k FROM predictions WHERE scorer = 'embedding')"
    ).fetchone()[0]
    con.close()
    return 2 * n_features + windows


def baseline_seconds(n_texts: int) -> float:
    """MiniLM alone on n_texts window-like texts (9 tokens of prose each)."""
    from pipeline.explain.embedding import Embedder

    embedder = Embedder()
    words = "the module returns a path to the file when the value is not found in a list of names".split()
    texts = [" ".join(words[(i % 7) : (i % 7) + 9]) + f" {i}" for i in range(n_texts)]
    started = time.perf_counter()
    embedder.encode(texts)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--features", default="all")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        run = small_copy(Path(args.run), Path(scratch) / "run")
        started = time.perf_counter()
        summary = run_explain(ExplainConfig(run=str(run), features=args.features))
        seconds = time.perf_counter() - started
        n_texts = embedded_texts(run / "saes" / "default" / "explanations.duckdb")
    floor = baseline_seconds(n_texts)
    print(summary.report)
    print(
        f"\nexplained {summary.n_explained} features in {seconds:.1f}s ({summary.n_explained / seconds:.1f} features/s)"
    )
    print(f"baseline: MiniLM alone on the {n_texts:,} texts the job embedded: {floor:.1f}s")
    print(f"job / embedding-alone: {seconds / floor:.2f}x")
    print(f"job / target ({TARGET_SECONDS:.0f}s): {seconds / TARGET_SECONDS:.2f}")


if __name__ == "__main__":
    main()
