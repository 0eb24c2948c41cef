"""How long the /trace page takes to draw a large graph: 2,000 nodes and 20,000 links (target: warm <= 2 s).

Writes a synthetic graph file (circuit-tracer's node/link fields) into a temp run,
runs the page under Streamlit's AppTest once cold and several times warm, and
prints each time: the server-side work (parse, layout, chart spec, Arrow
serialisation). The browser's own drawing is not measured here.

    PYTHONPATH=$PWD python bench/trace_page.py [--nodes 2000] [--links 20000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path


def synthetic_graph(n_nodes: int, n_links: int, n_layers: int = 12, n_tokens: int = 24, seed: int = 0) -> dict:
    """Embeddings per token, features and error nodes spread over layers and positions, a few logits."""
    rng = random.Random(seed)
    nodes = [{"node_id": f"E_{t}_{t}", "feature": t, "layer": "E", "ctx_idx": t, "feature_type": "embedding",
              "clerp": f"tok{t}"} for t in range(n_tokens)]  # fmt: skip
    nodes += [{"node_id": f"{n_layers + 1}_{v}_{n_tokens - 1}", "feature": v, "layer": str(n_layers + 1),
               "ctx_idx": n_tokens - 1, "feature_type": "logit", "clerp": f"Output {v}"} for v in range(5)]  # fmt: skip
    nodes = list({n["node_id"]: n for n in nodes}.values())
    by_id = {n["node_id"]: n for n in nodes}
    while len(by_id) < n_nodes:
        layer, pos = rng.randrange(n_layers), rng.randrange(n_tokens)
        error = rng.random() < 0.1
        feature = -1 if error else rng.randrange(16384)
        node = {
            "node_id": f"{layer}_{feature}_{pos}", "feature": feature, "layer": str(layer), "ctx_idx": pos,
            "feature_type": "mlp reconstruction error" if error else "cross layer transcoder",
            "clerp": f"feature <{feature}> *{layer}*", "activation": rng.random() * 5, "influence": rng.random(),
        }  # fmt: skip
        by_id[node["node_id"]] = node
    unique = list(by_id.values())
    ids = list(by_id)
    links = [{"source": rng.choice(ids), "target": rng.choice(ids), "weight": rng.gauss(0, 1)} for _ in range(n_links)]
    meta = {"slug": "bench", "prompt": "x" * n_tokens, "prompt_tokens": [f"t{i}" for i in range(n_tokens)],
            "scan": "bench", "node_threshold": 0.8}  # fmt: skip
    return {"metadata": meta, "qParams": {}, "nodes": unique, "links": links}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--links", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from streamlit.testing.v1 import AppTest

    run = Path(tempfile.mkdtemp()) / "run"
    (run / "graphs").mkdir(parents=True)
    graph = synthetic_graph(args.nodes, args.links)
    (run / "graphs" / "bench.json").write_text(json.dumps(graph), encoding="utf-8")
    os.environ["SAESCOPE_RUN"] = str(run)
    app = AppTest.from_string("from dashboards.views import trace\ntrace.render()\n", default_timeout=300)
    app.query_params["graph"] = "bench"
    for attempt in range(args.repeats + 1):
        start = time.perf_counter()
        app.run()
        elapsed = time.perf_counter() - start
        if app.exception:
            raise SystemExit(f"the page failed: {app.exception}")
        kind = "cold" if attempt == 0 else "warm"
        print(f"{kind} render, {len(graph['nodes'])} nodes / {len(graph['links'])} links: {elapsed:.2f} s")


if __name__ == "__main__":
    main()
