"""`saescope export-transcoders`: write a run's transcoder set in circuit-tracer's layout.

The set (``runs/R/transcoders/NAME``, SAELens layout) is read and checked whole
first: every layer of the model must be there (a missing one is named) with one
activation (and one k for TopK), which circuit-tracer needs. ``--out`` is checked
before anything is written: a folder that can be made or written, empty unless
``--force``, and never the set's own folder, a folder inside it or one holding it
(resolved paths), so an export can never overwrite the set it reads. Then ``--out``
gets ``layer_{i}.safetensors`` per layer and ``config.yaml`` last
(``pipeline.sae.circuit_tracer_format`` has the fields), each written atomically,
so a killed export leaves no config pointing at missing files. ``config.yaml``
lists the files by absolute path (circuit-tracer's ``load_transcoders`` opens them
as given); drop that list to publish the folder on the Hub, where circuit-tracer
finds ``layer_*.safetensors`` by itself.
A cross-layer set is already in circuit-tracer's CLT layout: it is read, checked and
written again (``W_enc_{i}`` / ``W_dec_{i}`` files, then ``config.yaml`` with the model's hub id).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save as save_safetensors_bytes

from jobs.options import ConfigError, add_config_arguments, check_can_create, config_from_args, option
from pipeline.lm.models import DEFAULT_MODEL
from pipeline.sae.circuit_tracer_format import circuit_tracer_config, circuit_tracer_tensors, layer_file
from pipeline.sae.cross_layer_format import clt_config, clt_file_tensors, clt_from_circuit_tracer
from pipeline.sae.transcoder import Transcoder
from pipeline.sae.transcoder_format import transcoder_from_saelens
from storage.atomic import atomic_write_bytes, atomic_write_text
from storage.sae_store import SaeStoreError
from storage.shards import activations_dir, read_manifest
from storage.transcoder_store import is_cross_layer, load_clt_files, load_layer_files, read_set, resolve_set

DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The hub id of the model the default GGUF file holds (circuit-tracer loads models by hub id)."""
CONFIG = "config.yaml"
TOPK_NOTE = (
    "note: TopK sets need a circuit-tracer that reads `activation: topk` (its main branch does; 0.5.0 on PyPI "
    "would apply ReLU to every latent): train with --arch batchtopk for a JumpReLU set every release reads"
)


@dataclass(frozen=True)
class ExportConfig:
    """Options of `saescope export-transcoders`."""

    run: str = option(help="run directory holding a trained transcoder set")
    out: str = option(help="folder to write config.yaml and layer_{i}.safetensors into")
    transcoders: str | None = option(None, "transcoder set to export (default: the run's only one)")
    force: bool = option(False, "write into --out even if it already holds files")


def register(subparsers) -> None:
    parser = subparsers.add_parser("export-transcoders", help="write a transcoder set in circuit-tracer's layout")
    add_config_arguments(parser, ExportConfig)
    parser.set_defaults(handler=lambda args: command(config_from_args(ExportConfig, args)))


def check_set_layers(folder: Path, layers: list[int], n_layers: int, run_dir: Path) -> None:
    """circuit-tracer loads one transcoder per layer of the model: name the layers the set lacks."""
    missing = sorted(set(range(n_layers)) - set(layers))
    if missing:
        raise ConfigError(
            f"transcoder set {folder.name!r} lacks layer{'s' * (len(missing) > 1)} "
            f"{', '.join(map(str, missing))} of the model's 0-{n_layers - 1}: circuit-tracer needs a transcoder at "
            f"every layer from 0; retrain it with `saescope train --run {run_dir} --transcoder --name {folder.name} "
            "--layers all --force`"
        )


def load_set(folder: Path) -> dict[int, Transcoder]:
    """Every layer's transcoder of the set (SaeStoreError naming a bad layer)."""
    tcs = {}
    for layer in read_set(folder)["layers"]:
        try:
            tcs[layer] = transcoder_from_saelens(*load_layer_files(folder, layer))
        except ValueError as error:
            raise SaeStoreError(f"{folder} layer {layer}: {error}") from error
    return tcs


OFFLINE_MODEL_HUB_IDS = {DEFAULT_MODEL: DEFAULT_MODEL_HUB_ID, "gemma3-270m": "google/gemma-3-270m"}
"""The hub id of each offline model spec. Both ship quantised GGUFs (SmolLM2 in Q4_1, Gemma 3 270M in Q4_K_M):
circuit-tracer loads the full-precision hub weights, close to but not the weights the set was trained on."""


def hub_model_name(spec: str, name: str) -> str:
    """What circuit-tracer should load: an offline model's hub id, a hub id as given, else the model's name."""
    if spec in OFFLINE_MODEL_HUB_IDS:
        return OFFLINE_MODEL_HUB_IDS[spec]
    return spec if spec.count("/") == 1 and not Path(spec).exists() else name


def yaml_text(config: dict) -> str:
    """``config`` (strings, integers, one list of strings) as block YAML with JSON-quoted strings."""
    lines = []
    for key, value in config.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"  - {json.dumps(item)}" for item in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def check_out(out: Path, set_folder: Path, force: bool) -> None:
    """``--out`` must be a writable folder apart from the set, and empty unless ``force``; nothing is made here."""
    target, source = out.resolve(), set_folder.resolve()
    if target == source or source in target.parents or target in source.parents:
        where = "is" if target == source else "is inside" if source in target.parents else "holds"
        raise ConfigError(
            f"--out {out} {where} the transcoder set {set_folder} it exports: choose a folder outside the set"
        )
    check_can_create("--out", out)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out {out} already holds files: choose an empty folder, or pass --force")


def command(args: ExportConfig) -> int:
    run_dir, out = Path(args.run), Path(args.out)
    manifest = read_manifest(activations_dir(run_dir))
    folder = resolve_set(run_dir, args.transcoders)
    check_set_layers(folder, read_set(folder)["layers"], int(manifest.provenance["model"]["n_layers"]), run_dir)
    check_out(out, folder, args.force)
    model = hub_model_name(manifest.model_spec, str(manifest.provenance["model"]["name"]))
    if is_cross_layer(read_set(folder)):
        return export_clt(folder, out, model)
    tcs = load_set(folder)
    files = [str((out / layer_file(layer)).resolve()) for layer in sorted(tcs)]
    try:
        config = circuit_tracer_config(tcs, model, f"{model.split('/')[-1]}/{folder.name}", files)
    except ValueError as error:
        raise SaeStoreError(f"{folder}: {error}") from error
    out.mkdir(parents=True, exist_ok=True)
    for layer, path in zip(sorted(tcs), files, strict=True):
        atomic_write_bytes(Path(path), save_safetensors_bytes(circuit_tracer_tensors(tcs[layer])))
    atomic_write_text(out / CONFIG, yaml_text(config))
    arch = config.get("activation", "jumprelu")
    print(f"exported {len(tcs)} layers of {folder} ({arch}) to {out} for circuit-tracer ({model})")
    if arch == "topk":
        print(TOPK_NOTE)
    print(f"load with: circuit_tracer.utils.hf_utils.load_transcoders(yaml.safe_load(open('{out / CONFIG}')))")
    return 0


def export_clt(folder: Path, out: Path, model: str) -> int:
    """A cross-layer set, checked by loading it, written again in circuit-tracer's CLT layout."""
    try:
        clt = clt_from_circuit_tracer(*load_clt_files(folder))
        config = clt_config(clt, model, f"{model.split('/')[-1]}/{folder.name}")
    except ValueError as error:
        raise SaeStoreError(f"{folder}: {error}") from error
    out.mkdir(parents=True, exist_ok=True)
    for name, tensors in clt_file_tensors(clt).items():
        atomic_write_bytes(out / name, save_safetensors_bytes(tensors))
    atomic_write_text(out / CONFIG, yaml_text(config))
    print(f"exported the cross-layer transcoder {folder} ({clt.cfg.architecture}) to {out} for circuit-tracer")
    if clt.cfg.architecture == "topk" or clt.cfg.skip:
        print("note: circuit-tracer's CLT has no TopK (it would run this one as ReLU) and reads no skip path")
    print(f"load with: circuit_tracer.transcoder.cross_layer_transcoder.load_clt('{out}', "
          "feature_input_hook='mlp.hook_in', feature_output_hook='hook_mlp_out')")  # fmt: skip
    return 0
