"""The transcoder latents that saved graphs are made of: what `saescope explain --transcoders --graphs` explains.

A whole set is 30 x 2304 latents; a graph's feature nodes are a few hundred (layer,
latent) pairs, which is what its labels need.
"""

from __future__ import annotations

from pathlib import Path

from jobs.options import ConfigError
from storage.graph_groups import graph_names, read_graph_json

FEATURE_NODE = "cross layer transcoder"
"""``feature_type`` of a latent's node in a graph file."""


def graph_latents(run_dir: Path, names: str, set_name: str) -> dict[int, set[int]]:
    """layer -> the latents of the named graphs' feature nodes (``all``: every graph traced with ``set_name``)."""
    saved = graph_names(run_dir)
    wanted = saved if names.strip() == "all" else [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in saved]
    if unknown or not wanted:
        raise ConfigError(f"--graphs: no graph {unknown[0] if unknown else names!r} in {run_dir / 'graphs'} "
                          f"(saved: {', '.join(saved) or 'none'}; trace one with `saescope trace`)")  # fmt: skip
    latents: dict[int, set[int]] = {}
    for name in wanted:
        document = read_graph_json(run_dir, name)
        traced_with = (document.get("saescope") or {}).get("transcoders")
        if traced_with != set_name:
            if names.strip() == "all":
                continue
            raise ConfigError(f"--graphs: graph {name!r} was traced with transcoder set {traced_with!r}, "
                              f"not {set_name!r}")  # fmt: skip
        for node in document["nodes"]:
            if node.get("feature_type") == FEATURE_NODE:
                latents.setdefault(int(node["layer"]), set()).add(int(str(node["node_id"]).split("_")[1]))
    return latents
