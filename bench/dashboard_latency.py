"""Benchmark: how fast the dashboard answers, measured in a real browser (Debian's Chromium).

Feature pages: warm time from navigation to the final render (the last section's text
and the shaded tokens present), p50 and p95 over random features, on
  * the demo run (`saescope demo` first), and
  * a synthetic 1M-token x 16k-feature index built the way bench/index_speed.py builds
    it, wrapped in a run folder with random SAE weights so the app accepts it.
Steering: one request of 40 new tokens in the dashboard (warm: model already loaded)
against the same request through `saescope steer` (its wall time, model load included,
and the generation alone); the target is dashboard <= 1.5x the CLI.

    python bench/dashboard_latency.py [--run runs/demo] [--pages 30] [--only pages|steer|large]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]  # fmt: skip
SAESCOPE = [str(Path(sys.executable).with_name("saescope"))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`saescope serve` in the background for the duration of a with-block."""

    def __init__(self, run: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [*SAESCOPE, "serve", "--run", str(run), "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )

    def __enter__(self) -> Server:
        for _ in range(600):
            if self.process.poll() is not None:
                raise RuntimeError(f"saescope serve exited with status {self.process.returncode}")
            try:
                with urllib.request.urlopen(self.url + "/_stcore/health", timeout=2) as reply:
                    if reply.read().strip() == b"ok":
                        return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the dashboard did not start")

    def __exit__(self, *exc) -> None:
        os.killpg(self.process.pid, 2)
        self.process.wait(timeout=30)


def page_times(browser, url: str, features: list[int]) -> list[float]:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{url}/feature?id={features[0]}")  # warm-up: first connection, caches
    page.get_by_text("Nearest features by decoder cosine").wait_for(timeout=120_000)
    times = []
    for feature in features:
        start = time.perf_counter()
        page.goto(f"{url}/feature?id={feature}")
        page.get_by_role("heading", name=f"Feature {feature}").wait_for(timeout=60_000)
        page.get_by_text("Nearest features by decoder cosine").wait_for(timeout=60_000)
        page.locator("span.tok").first.wait_for(timeout=60_000)
        times.append(time.perf_counter() - start)
    page.close()
    return times


def summary(times: list[float]) -> str:
    ordered = sorted(times)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(ordered):.3f}s  p95 {p95:.3f}s  (n={len(ordered)})"


def live_features(run: Path, count: int, seed: int = 0) -> list[int]:
    from storage.index_queries import FeatureIndex

    with FeatureIndex(run / "saes" / "default" / "features.duckdb") as index:
        live = [row["feature"] for row in index.list_features("id", False, False, limit=index.n_features)]
    return random.Random(seed).sample(live, min(count, len(live)))


def large_run(folder: Path, n_tokens: int, n_features: int) -> Path:
    """A run folder around a synthetic index (see bench/index_speed.py), accepted by the app."""
    sys.path.insert(0, str(Path(__file__).parent))
    import index_speed
    from safetensors.torch import save_file

    from storage.index_builder import IndexBuilder  # noqa: F401  (the builder index_speed uses)
    from storage.sae_store import weights_fingerprint

    sae_folder = folder / "saes" / "default"
    sae_folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    d = index_speed.D_MODEL
    save_file(
        {"W_enc": torch.randn(d, n_features, generator=g), "b_enc": torch.zeros(n_features),
         "W_dec": torch.randn(n_features, d, generator=g), "b_dec": torch.zeros(d)},
        sae_folder / "sae_weights.safetensors",
    )  # fmt: skip
    cfg = {"architecture": "topk", "d_in": d, "d_sae": n_features, "k": 32, "meta": {"model_name": "synthetic"}}
    (sae_folder / "cfg.json").write_text(json.dumps(cfg))
    print(f"building a synthetic {n_tokens:,}-token x {n_features:,}-feature index (a few minutes)…", flush=True)
    index_speed.build(sae_folder, n_tokens, n_features)
    import duckdb

    con = duckdb.connect(str(sae_folder / "features.duckdb"))
    sae_meta = json.dumps({"name": "default", "weights_sha256": weights_fingerprint(sae_folder)})
    con.execute("INSERT INTO metadata VALUES ('sae', ?)", [sae_meta])
    con.close()
    from storage.shards import CacheManifest, activations_dir, write_manifest

    provenance = {
        "model": {"spec": "synthetic", "name": "synthetic", "revision": "none", "n_layers": 1},
        "hook": {"layer": 0, "name": "synthetic"},
        "corpus": {"description": "synthetic"},
        "model_dtype": {"name": "float32"},
    }
    manifest = CacheManifest(provenance, d, index_speed.CTX_LEN, "float16", (), 1, complete=True)
    write_manifest(activations_dir(folder), manifest)  # an empty cache: the app reads only the index
    return folder


def steering_times(browser, url: str, run: Path, feature: int) -> tuple[float, float]:
    prompt = "The function returns"
    start = time.perf_counter()
    subprocess.run(
        [*SAESCOPE, "steer", "--run", str(run), "--feature", str(feature), "--value", "4x", "--prompt", prompt,
         "--max-new-tokens", "40", "--device", "cpu"], check=True, capture_output=True,
    )  # fmt: skip
    cli = time.perf_counter() - start
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{url}/steer?feature={feature}")
    form_ready = page.get_by_text("Generate")
    form_ready.wait_for(timeout=120_000)
    page.get_by_role("textbox", name="value").fill("4x")
    page.get_by_label("max new tokens").fill("6")
    page.get_by_text("Generate").click()  # warm-up: loads the model once per server
    page.get_by_text("mean KL(default").wait_for(timeout=300_000)
    page.get_by_label("max new tokens").fill("40")
    running = page.locator('[data-testid="stStatusWidget"]')
    start = time.perf_counter()
    page.get_by_text("Generate").click()
    running.wait_for(state="visible", timeout=60_000)
    running.wait_for(state="hidden", timeout=300_000)
    page.get_by_text("mean KL(default").wait_for(timeout=60_000)
    dashboard = time.perf_counter() - start
    page.close()
    return cli, dashboard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--pages", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=16384)
    parser.add_argument(
        "--only", choices=["pages", "steer", "large"], action="append", help="parts to run (default: all)"
    )
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    run = Path(args.run)
    parts = set(args.only or ["pages", "steer", "large"])
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS, headless=True)
        with Server(run) as server:
            if "pages" in parts:
                demo = page_times(browser, server.url, live_features(run, args.pages))
                print(f"feature page, {run}: {summary(demo)}   target p95 < 1 s", flush=True)
            if "steer" in parts:
                cli, dashboard = steering_times(browser, server.url, run, live_features(run, 1, seed=1)[0])
                print(
                    f"steering, 40 new tokens: dashboard {dashboard:.2f}s (warm) vs CLI {cli:.2f}s "
                    f"(wall, model load included): ratio {dashboard / cli:.2f}   target <= 1.5",
                    flush=True,
                )
        if "large" in parts:
            with tempfile.TemporaryDirectory() as scratch:
                big = large_run(Path(scratch) / "run", args.tokens, args.features)
                from storage.index_queries import FeatureIndex

                with FeatureIndex(big / "saes" / "default" / "features.duckdb") as index:
                    n = index.n_features
                features = random.Random(0).sample(range(n), args.pages)
                with Server(big) as server:
                    large = page_times(browser, server.url, features)
                print(f"feature page, {args.tokens:,} tokens x {n:,} features: {summary(large)}   target p95 < 2 s")
        browser.close()


if __name__ == "__main__":
    main()
