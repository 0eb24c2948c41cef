"""Saved attribution graphs of a run and the supernodes a person groups their nodes into.

Graphs are ``RUN/graphs/NAME.json`` (Neuronpedia's graph-file JSON, written by
the tracing job), and beside each the unpruned graph ``RUN/graphs/NAME.safetensors``
(adjacency, node table, activations, logits: ``pipeline.tracing.graph_tensors`` says
which tensors), both written atomically. Supernodes of a graph live beside it in
``RUN/graphs/NAME.supernodes.json``, written atomically:

    {"format_version": 1, "graph": NAME, "supernodes": [[name, node_id, ...], ...]}

Each entry is a group's name followed by its members' node ids, the shape of
``qParams.supernodes`` in Neuronpedia's graph files.

A graph name is one unit: ``NAME.json``, ``NAME.safetensors`` (the unpruned graph) and
``NAME.supernodes.json`` are found (``graph_files``), refused and removed (``remove_graph``)
together, so a replaced graph never inherits another graph's supernodes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save as save_safetensors_bytes

from storage.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from storage.constants import FORMAT_VERSION, GRAPHS_DIR
from storage.sae_store import check_name

GRAPH_SUFFIX = ".json"
TENSORS_SUFFIX = ".safetensors"
SUPERNODES_SUFFIX = ".supernodes.json"
UNPRUNED_SUFFIX = TENSORS_SUFFIX
UNIT_SUFFIXES = (SUPERNODES_SUFFIX, UNPRUNED_SUFFIX, GRAPH_SUFFIX)
"""Every file of one graph name, the graph file itself last (the order ``remove_graph`` deletes in)."""


def graphs_dir(run: Path) -> Path:
    return Path(run) / GRAPHS_DIR


def check_graph_name(name: str) -> str:
    """The name if it is a valid run name (``sae_store.check_name``) that no other graph file could end in,
    else a ValueError naming ``--name``."""
    check_name(name, "graph")
    if name.endswith(SUPERNODES_SUFFIX.removesuffix(GRAPH_SUFFIX)):
        raise ValueError(f"--name {name!r} is not a valid graph name: it may not end in '.supernodes'")
    return name


def graph_name_for(prompt: str) -> str:
    """A file stem from the prompt: lowercase words joined by '-', at most 48 characters."""
    stem = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].strip("-")
    return stem or "graph"


def graph_names(run: Path) -> list[str]:
    """Names of the run's saved graphs (sorted), supernode files excluded."""
    folder = graphs_dir(run)
    if not folder.is_dir():
        return []
    stems = (p.name.removesuffix(GRAPH_SUFFIX) for p in folder.glob(f"*{GRAPH_SUFFIX}"))
    return sorted(s for s in stems if not s.startswith(".") and not s.endswith(".supernodes"))


def graph_path(run: Path, name: str) -> Path:
    return graphs_dir(run) / f"{check_graph_name(name)}{GRAPH_SUFFIX}"


def read_graph_json(run: Path, name: str) -> dict:
    """The graph file as a dict; ValueError that names the file when it is missing or not a JSON object."""
    path = graph_path(run, name)
    if not path.is_file():
        raise ValueError(f"no graph {name!r} in {graphs_dir(run)}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a graph file: expected a JSON object")
    return data


def write_graph_json(run: Path, name: str, text: str) -> Path:
    """Publish a graph file atomically; returns its path."""
    path = graph_path(run, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path


def tensors_path(run: Path, name: str) -> Path:
    return graphs_dir(run) / f"{check_graph_name(name)}{TENSORS_SUFFIX}"


def write_graph_tensors(run: Path, name: str, tensors: dict, metadata: dict[str, str]) -> Path:
    """Publish the unpruned graph's tensors (CPU, contiguous) and string metadata atomically; returns the path."""
    path = tensors_path(run, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save_safetensors_bytes(tensors, metadata=metadata))
    return path


def read_graph_tensors(run: Path, name: str) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of a saved unpruned graph; ValueError naming the file when it is missing."""
    path = tensors_path(run, name)
    if not path.is_file():
        raise ValueError(f"no unpruned graph {name!r} in {graphs_dir(run)}: trace the prompt again to write it")
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})


def graph_files(run: Path, name: str) -> list[Path]:
    """The files of graph ``name`` that exist (graph, unpruned graph, supernodes), in removal order."""
    stem = graphs_dir(run) / check_graph_name(name)
    return [path for path in (stem.with_name(stem.name + suffix) for suffix in UNIT_SUFFIXES) if path.is_file()]


def remove_graph(run: Path, name: str) -> list[Path]:
    """Delete every file of graph ``name`` (supernodes first, the graph file last); returns what was removed."""
    removed = graph_files(run, name)
    for path in removed:
        path.unlink()
    return removed


def supernodes_path(run: Path, name: str) -> Path:
    return graphs_dir(run) / f"{check_graph_name(name)}{SUPERNODES_SUFFIX}"


def read_supernodes(run: Path, name: str) -> list[tuple[str, list[str]]]:
    """(group name, member node ids) of the graph's saved supernodes; [] when none are saved."""
    path = supernodes_path(run, name)
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["supernodes"]
        return [(str(entry[0]), [str(n) for n in entry[1:]]) for entry in entries]
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise ValueError(f"{path} is damaged ({error}): delete it to start the groups again") from error


def write_supernodes(run: Path, name: str, groups: list[tuple[str, list[str]]]) -> Path:
    """Replace the graph's supernodes with ``groups`` (atomically); a group needs a name and a member."""
    for group, members in groups:
        if not group.strip() or not members:
            raise ValueError("a supernode needs a name and at least one node")
    path = supernodes_path(run, name)
    payload = {"format_version": FORMAT_VERSION, "graph": name, "supernodes": [[g, *m] for g, m in groups]}
    atomic_write_json(path, payload)
    return path
