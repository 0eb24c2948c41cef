"""`saescope import-sae` for transcoder sets: circuit-tracer (per-layer and cross-layer), SAELens, Gemma Scope.

A circuit-tracer folder (``config.yaml``: a ``transcoder_set`` of TopK / JumpReLU / ReLU
transcoders with or without W_skip, or a ``cross_layer_transcoder``), or a folder of SAELens /
Gemma Scope transcoder folders, local or ``hf://owner/repo[/sub]`` (``storage.transcoder_sources``
reads them), becomes a transcoder set of the run that `saescope trace --transcoders NAME` traces:
per-layer sets in saescope's layout (``transcoders/NAME/layer-LL``), a cross-layer transcoder
in circuit-tracer's CLT layout (``storage.transcoder_store``).
Everything is read and checked before anything is written: the hooks (the MLP's normalized
input and its output), each transcoder's width against the model's d_model, its layer
against the model's layers (a circuit-tracer set or a CLT covers exactly the model's layers),
finite weights, one width for the whole set, and a free ``--name`` (or ``--force``). The set
is then filled in a hidden folder and renamed into place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from jobs.export_transcoders import yaml_text
from jobs.run import saelens_meta
from pipeline.lm.hook_points import HookPoint
from pipeline.sae.circuit_tracer_format import check_mlp_hooks, transcoder_from_circuit_tracer
from pipeline.sae.cross_layer import CrossLayerTranscoder
from pipeline.sae.cross_layer_format import MODEL_KIND, clt_config, clt_file_tensors, clt_from_circuit_tracer
from pipeline.sae.transcoder import Transcoder
from pipeline.sae.transcoder_format import (
    transcoder_cfg_dict,
    transcoder_from_gemma_scope,
    transcoder_from_saelens,
    transcoder_layer,
    transcoder_tensors,
)
from storage.constants import TRANSCODER_SET
from storage.sae_store import SaeStoreError, save_sae
from storage.transcoder_sources import (
    read_clt_layers,
    read_config_yaml,
    read_transcoder_folder,
    read_weights,
    set_layer_files,
    transcoder_folders,
)
from storage.transcoder_store import CROSS_LAYER, layer_dir, publish_set, save_clt_files, set_dir, write_set

TOPK_NOTE = (
    "note: circuit-tracer's TopK keeps the k largest pre-activations even where negative; saescope's applies a "
    "ReLU to them (the same wherever those k are positive)"
)
HF_NORM_INPUTS = ("post_attention_layernorm.output", "pre_feedforward_layernorm.output")
"""Hugging Face module outputs that are the MLP's normalized input (Gemma Scope 2's ``hf_hook_point_in``)."""


@dataclass(frozen=True)
class ImportedSet:
    """What a source folder held, built but not yet checked against the run."""

    transcoders: dict[int, Transcoder]
    """Layer -> transcoder (empty for a CLT)."""
    clt: CrossLayerTranscoder | None
    source_format: str
    """``circuit-tracer``, ``circuit-tracer-clt``, ``saelens`` or ``gemma-scope``."""

    @property
    def layers(self) -> list[int]:
        return list(range(self.clt.cfg.n_layers)) if self.clt is not None else sorted(self.transcoders)


def _named(where, error: ValueError) -> SaeStoreError:
    return SaeStoreError(f"{where}: {error}")


def _check_finite(tensors: dict[str, torch.Tensor], where) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise SaeStoreError(f"{where}: {name} holds {bad} NaN or infinite value(s): the weights are damaged")


def read_circuit_tracer(folder: Path) -> ImportedSet:
    """A circuit-tracer ``transcoder_set`` or ``cross_layer_transcoder`` folder, built and checked on its own."""
    config = read_config_yaml(folder)
    kind = config.get("model_kind", "transcoder_set")
    try:
        check_mlp_hooks(config)
    except ValueError as error:
        raise _named(folder / "config.yaml", error) from error
    if kind == MODEL_KIND:
        layers = read_clt_layers(folder)
        for i, tensors in enumerate(layers):
            _check_finite(tensors, f"{folder} (layer {i})")
        try:
            return ImportedSet({}, clt_from_circuit_tracer(layers, config), "circuit-tracer-clt")
        except ValueError as error:
            raise _named(folder, error) from error
    if kind != "transcoder_set":
        raise SaeStoreError(f"{folder / 'config.yaml'}: model_kind {kind!r} is not supported "
                            f"(transcoder_set, {MODEL_KIND})")  # fmt: skip
    tcs = {}
    for layer, path in enumerate(set_layer_files(folder, config)):
        tensors = read_weights(path)
        _check_finite(tensors, path)
        try:
            if path.suffix == ".npz":
                tcs[layer] = transcoder_from_gemma_scope(tensors)
            else:
                tcs[layer] = transcoder_from_circuit_tracer(tensors, config)
        except ValueError as error:
            raise _named(path, error) from error
    if not tcs:
        raise SaeStoreError(f"{folder} lists no transcoders (`transcoders` in config.yaml, or layer_{{i}}.safetensors)")
    return ImportedSet(tcs, None, "circuit-tracer")


def _check_reads_mlp(cfg: dict, folder: Path) -> None:
    """A transcoder's recorded hooks, where it records them, must be the MLP's normalized input and its output."""
    meta = cfg.get("meta") or {}
    for key, kind in (("hook_name", "mlp-in"), ("hook_name_out", "mlp-out")):
        name = meta.get(key, cfg.get(key))
        if name is None:
            continue
        try:
            point = HookPoint.from_name(str(name))
        except ValueError:
            point = None
        if point is None or point.kind != kind:
            wanted = HookPoint(0, kind).name.replace(".0.", ".L.")
            raise SaeStoreError(f"{folder}: {key} {name!r} is not {wanted}, the MLP hook saescope traces")
    hf_in = cfg.get("hf_hook_point_in")
    if hf_in is not None and not str(hf_in).endswith(HF_NORM_INPUTS):
        raise SaeStoreError(f"{folder}: hf_hook_point_in {hf_in!r} is not the MLP's normalized input "
                            f"(model.layers.L.{HF_NORM_INPUTS[0]})")  # fmt: skip


def read_saelens(root: Path) -> ImportedSet:
    """Every SAELens / Gemma Scope transcoder folder under ``root``, one per layer."""
    tcs, layouts = {}, set()
    for folder in transcoder_folders(root):
        tensors, cfg, layout = read_transcoder_folder(folder)
        _check_finite(tensors, folder)
        _check_reads_mlp(cfg, folder)
        layer = transcoder_layer(cfg, folder.relative_to(root).parts if folder != root else (folder.name,))
        if layer is None:
            raise SaeStoreError(f"{folder}: its layer is not recorded (cfg.json hook_layer / hook_name) nor in its "
                                "path (layer_L): rename the folder layer_L")  # fmt: skip
        if layer in tcs:
            raise SaeStoreError(f"{root} holds two transcoders for layer {layer} (one is {folder}): "
                                "point at a folder with one transcoder per layer")  # fmt: skip
        try:
            tcs[layer] = transcoder_from_gemma_scope(tensors) if layout == "gemma-scope" else transcoder_from_saelens(
                tensors, cfg)  # fmt: skip
        except ValueError as error:
            raise _named(folder, error) from error
        layouts.add(layout)
    if not tcs:
        raise SaeStoreError(f"{root} holds no SAELens or Gemma Scope transcoder folders")
    return ImportedSet(tcs, None, "gemma-scope" if layouts == {"gemma-scope"} else "saelens")


def check_fits_model(imported: ImportedSet, manifest, source: str) -> None:
    """The set's width, layers and d_sae against the run's model (SaeStoreError naming what differs)."""
    model = manifest.provenance["model"]
    n_layers, d_model = int(model["n_layers"]), int(model.get("d_model") or manifest.d_model)
    if imported.clt is not None:
        cfg = imported.clt.cfg
        if cfg.d_model != d_model:
            raise SaeStoreError(f"{source} reads d_model={cfg.d_model} but the run's model has {d_model}")
        if cfg.n_layers != n_layers:
            raise SaeStoreError(f"{source} is a cross-layer transcoder over {cfg.n_layers} layers but the run's model "
                                f"has {n_layers}")  # fmt: skip
        return
    tcs = imported.transcoders
    for layer, tc in sorted(tcs.items()):
        if tc.cfg.d_in != d_model:
            raise SaeStoreError(f"{source} layer {layer} reads d_model={tc.cfg.d_in} but the run's model has {d_model}")
    beyond = [layer for layer in tcs if layer >= n_layers]
    if beyond:
        raise SaeStoreError(f"{source} has a transcoder for layer {max(beyond)} but the run's model has {n_layers} "
                            f"layers (0-{n_layers - 1})")  # fmt: skip
    if imported.source_format == "circuit-tracer" and len(tcs) != n_layers:
        raise SaeStoreError(f"{source} is a circuit-tracer set of {len(tcs)} layers but the run's model has {n_layers}")
    widths = {layer: tc.cfg.d_sae for layer, tc in sorted(tcs.items())}
    if len(set(widths.values())) > 1:
        shown = ", ".join(f"layer {layer}: {width}" for layer, width in widths.items())
        raise SaeStoreError(f"{source}: a transcoder set has one width, but these layers differ ({shown}): "
                            "import the layers of one width into a folder of their own")  # fmt: skip


def _record(imported: ImportedSet, source: str, manifest) -> dict:
    return {"format_version": 1, "imported_from": source, "source_format": imported.source_format,
            "model": manifest.provenance["model"]["name"], "layers": imported.layers, "metrics": {}}  # fmt: skip


def publish_clt(run_dir: Path, name: str, clt: CrossLayerTranscoder, record: dict, manifest) -> Path:
    """Publish an inference CLT (raw units) as the cross-layer set ``transcoders/NAME``, ``record`` in its set.json."""
    model = str(manifest.provenance["model"]["name"])
    config = clt_config(clt, model, f"{model.split('/')[-1]}/{name}")

    def fill(folder: Path) -> None:
        save_clt_files(folder, clt_file_tensors(clt), yaml_text(config))
        write_set(folder, {**record, "kind": CROSS_LAYER, "layers": list(range(clt.cfg.n_layers)),
                           "d_sae": clt.cfg.d_sae, "architecture": clt.cfg.architecture})  # fmt: skip

    return publish_set(run_dir, name, fill)


def write_imported(run_dir: Path, name: str, imported: ImportedSet, source: str, manifest) -> Path:
    """Publish the checked set as ``transcoders/NAME``."""
    record = _record(imported, source, manifest)
    if imported.clt is not None:
        return publish_clt(run_dir, name, imported.clt, record, manifest)
    meta = saelens_meta(manifest)

    def fill_layers(folder: Path) -> None:
        for layer, tc in sorted(imported.transcoders.items()):
            cfg = transcoder_cfg_dict(tc, layer, meta, {k: v for k, v in record.items() if k != "layers"})
            save_sae(layer_dir(folder, layer), transcoder_tensors(tc), cfg)
        write_set(folder, {**record, "d_sae": next(iter(imported.transcoders.values())).cfg.d_sae})

    return publish_set(run_dir, name, fill_layers)


def import_transcoder_set(
    folder: Path, layout: str, source: str, run_dir: Path, manifest, name: str, force: bool
) -> int:
    """Read, check and publish a circuit-tracer or SAELens / Gemma Scope set (``source``: as the user named it)."""
    target = set_dir(run_dir, name)
    if (target / TRANSCODER_SET).is_file() and not force:
        raise SaeStoreError(f"{run_dir} already has a transcoder set named {name!r}: pass --name or --force")
    imported = read_circuit_tracer(folder) if layout == "circuit-tracer" else read_saelens(folder)
    check_fits_model(imported, manifest, source)
    written = write_imported(run_dir, name, imported, source, manifest)
    layers = imported.layers
    what = f"{len(layers)} {imported.source_format} transcoders"
    what = "a cross-layer transcoder" if imported.clt is not None else what
    print(f"imported {what} (layers {layers[0]}-{layers[-1]}) as {written}")
    topk = any(tc.cfg.architecture == "topk" for tc in imported.transcoders.values())
    if imported.source_format == "circuit-tracer" and topk:
        print(TOPK_NOTE)
    print(f"next: saescope trace --run {run_dir} --transcoders {name} --prompt 'The capital of France is'")
    return 0


def looks_like_transcoders(root: Path) -> bool:
    """Whether SAELens-layout folders under ``root`` are transcoders (by cfg.json alone), or Gemma Scope's.

    An unreadable cfg.json says no: the SAE reader names the damage in its own words."""
    for folder in transcoder_folders(root):
        try:
            _, cfg, layout = read_transcoder_folder(folder, weights=False)
        except SaeStoreError:
            continue
        meta = cfg.get("meta") or {}
        if layout == "gemma-scope" or "transcoder" in str(cfg.get("architecture", "")) or "hook_name_out" in meta:
            return True
    return False
