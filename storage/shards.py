"""Activation shards and the manifest that lists them.

A shard is one safetensors file holding ``activations`` [n_ctx, ctx_len, d_model]
(float16, bfloat16 or float32) and ``tokens`` [n_ctx, ctx_len] int32. A cache of
several hook points (``saescope cache --hooks ... --layers ...``) stores one tensor
per point instead, keyed by its TransformerLens name, with each tensor's sha256 in
the file's metadata (``POINTS_METADATA``): a reader of one point reads (and checks) only that tensor.
``provenance["hooks"]`` lists the points; ``provenance["hook"]`` is the one a
reader picked (``CacheManifest.select``; the cache's primary point until then). Its name
carries a writer prefix (``w00-000003.safetensors``) so several processes can
share one folder. ``manifest.json`` records provenance, shapes, dtype, and per
shard the file name, context range and sha256; it is rewritten atomically after
each shard, so a killed job never leaves a half shard listed.

Shape legend: C contexts, T positions, D d_model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from storage.atomic import atomic_write_bytes, atomic_write_json
from storage.constants import ACTIVATIONS_DIR, FORMAT_VERSION, MANIFEST, SHARD_SUFFIX
from storage.errors import first_line

POINTS_METADATA = "saescope.points"
"""Metadata key of a shard of several points: JSON {first_context, sha256: {hook name: hex}}."""
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


REPAIR = "; `saescope verify` lists bad shards: delete the activations folder and re-run `saescope cache`"


class CacheError(ValueError):
    """The activation cache is missing, inconsistent or damaged."""


class CorruptShardError(CacheError):
    """A shard's bytes do not match the manifest (truncated, altered or unreadable)."""


@dataclass(frozen=True)
class ShardRecord:
    """One finished shard as listed in the manifest."""

    file: str
    """File name inside the activations folder."""
    writer: str
    """Prefix of the process that wrote it."""
    index: int
    """Shard number within its writer."""
    first_context: int
    """Global index of its first context."""
    n_ctx: int
    """Number of contexts it holds."""
    sha256: str
    """Hex sha256 of the whole file."""
    n_bytes: int
    """File size in bytes."""


@dataclass(frozen=True)
class CacheManifest:
    """Everything a reader needs to trust and interpret the shards."""

    provenance: dict
    """Model, tokenizer, hook, corpus and compute dtype that produced the activations."""
    d_model: int
    ctx_len: int
    dtype: str
    """Storage dtype of ``activations``."""
    special_token_ids: tuple[int, ...]
    """Token ids whose positions are masked out of training and indexing."""
    shard_contexts: int
    """Contexts per shard (the last shard may hold fewer)."""
    shards: tuple[ShardRecord, ...] = ()
    complete: bool = False
    """True once the job reached its token target or the end of the corpus."""
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)
    """Job notes (e.g. the token target and whether the corpus ran out)."""

    @property
    def n_contexts(self) -> int:
        return sum(record.n_ctx for record in self.shards)

    @property
    def layer(self) -> int:
        """The block holding the hook point the activations were read at."""
        return int(self.provenance["hook"]["layer"])

    @property
    def hook_kind(self) -> str:
        """Which point of that block: resid-post, attn-out, mlp-in or mlp-out (caches made before kinds: resid-post)."""
        return str(self.provenance["hook"].get("kind", "resid-post"))

    @property
    def hook_points(self) -> tuple[dict, ...]:
        """Every point the shards hold, as {layer, name, kind} (one for caches of one point)."""
        return tuple(self.provenance.get("hooks", [self.provenance["hook"]]))

    @property
    def tensor_keys(self) -> tuple[str, ...]:
        """The safetensors keys of every point: ``activations`` in a one-point cache, else the hook names."""
        hooks = self.provenance.get("hooks")
        return ("activations",) if hooks is None else tuple(str(point["name"]) for point in hooks)

    @property
    def tensor_key(self) -> str:
        """The safetensors key of the selected point: ``activations`` in a one-point cache, else its hook name."""
        return "activations" if "hooks" not in self.provenance else self.hook_name

    def select(self, layer: int | None = None, kind: str | None = None) -> CacheManifest:
        """This manifest reading the point at ``layer`` and ``kind`` (None: the selected one's); CacheError if none."""
        layer = self.layer if layer is None else layer
        kind = self.hook_kind if kind is None else kind
        for point in self.hook_points:
            if point["layer"] == layer and point.get("kind", "resid-post") == kind:
                return replace(self, provenance={**self.provenance, "hook": dict(point)})
        raise CacheError(
            f"the activation cache holds no {kind} at layer {layer}: it holds {describe_points(self.hook_points)}; "
            "pick one with --hook and --layer, or cache that point"
        )

    @property
    def hook_name(self) -> str:
        """TransformerLens name of the hook point, e.g. ``blocks.3.hook_mlp_out``."""
        return str(self.provenance["hook"]["name"])

    @property
    def model_spec(self) -> str:
        """What `--model` named (default, a hub id, a folder or a .gguf file)."""
        return str(self.provenance["model"]["spec"])

    @property
    def model_revision(self) -> str:
        """The model's commit or file hash when the cache was made."""
        return str(self.provenance["model"]["revision"])

    @property
    def model_dtype(self) -> str:
        """The dtype the model computed in."""
        return str(self.provenance["model_dtype"]["name"])

    @property
    def n_tokens(self) -> int:
        return self.n_contexts * self.ctx_len

    def with_shard(self, record: ShardRecord) -> CacheManifest:
        if record.first_context != self.n_contexts:
            raise CacheError(
                f"shard {record.file} starts at context {record.first_context}, expected {self.n_contexts}"
            )
        return replace(self, shards=(*self.shards, record))

    def to_dict(self) -> dict:
        payload = asdict(self)
        payload["special_token_ids"] = list(self.special_token_ids)
        payload["n_contexts"] = self.n_contexts
        payload["n_tokens"] = self.n_tokens
        return payload

    @classmethod
    def from_dict(cls, payload: dict) -> CacheManifest:
        """The manifest of a parsed ``manifest.json``; ValueError naming the first missing or mistyped key."""
        if not isinstance(payload, dict):
            raise ValueError("not a JSON object")
        payload = dict(payload)
        payload.pop("n_contexts", None)
        payload.pop("n_tokens", None)
        version = payload.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"format version {version!r} is not supported (expected {FORMAT_VERSION})")
        _check_fields(payload)
        payload["shards"] = tuple(ShardRecord(**_checked_record(record)) for record in payload["shards"])
        payload["special_token_ids"] = tuple(payload["special_token_ids"])
        return cls(**payload)


MANIFEST_TYPES = {
    "provenance": dict,
    "d_model": int,
    "ctx_len": int,
    "dtype": str,
    "special_token_ids": list,
    "shard_contexts": int,
    "shards": list,
    "complete": bool,
    "extra": dict,
}
"""Every top-level key of manifest.json and its JSON type (all are written by every writer)."""
PROVENANCE_KEYS = {
    "model": {"spec": str, "name": str, "revision": str, "n_layers": int},
    "hook": {"layer": int, "name": str},
    "corpus": {"description": str},
    "model_dtype": {"name": str},
}
"""The provenance every reader relies on: (part, key) -> JSON type."""
RECORD_TYPES = {"file": str, "writer": str, "index": int, "first_context": int, "n_ctx": int, "sha256": str,
                "n_bytes": int}  # fmt: skip


def _is_a(value, kind: type) -> bool:
    """JSON type check (an int is not a bool; a list may come as a tuple from ``asdict``)."""
    if kind is list:
        return isinstance(value, list | tuple)
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _check_fields(payload: dict) -> None:
    unknown = sorted(set(payload) - set(MANIFEST_TYPES) - {"format_version"})
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}")
    for key, kind in MANIFEST_TYPES.items():
        if key not in payload:
            raise ValueError(f"missing key {key!r}")
        if not _is_a(payload[key], kind):
            raise ValueError(f"{key!r} is {payload[key]!r}, not a JSON {kind.__name__}")
    for part, keys in PROVENANCE_KEYS.items():
        table = payload["provenance"].get(part)
        for key, kind in keys.items():
            if not isinstance(table, dict) or not _is_a(table.get(key), kind):
                raise ValueError(f"provenance.{part}.{key} is missing or not a JSON {kind.__name__}")
    if payload["dtype"] not in STORAGE_DTYPES:
        raise ValueError(f"dtype {payload['dtype']!r} is not one of {', '.join(STORAGE_DTYPES)}")


def _checked_record(record) -> dict:
    if not isinstance(record, dict) or set(record) != set(RECORD_TYPES):
        raise ValueError(f"shard entry {record!r} does not hold exactly {', '.join(RECORD_TYPES)}")
    for key, kind in RECORD_TYPES.items():
        if not _is_a(record[key], kind):
            shown = f"{key} is {record[key]!r}, not a JSON {kind.__name__}"
            raise ValueError(f"shard entry {record.get('file')!r}: {shown}")
    return record


def describe_points(points: tuple[dict, ...]) -> str:
    """``mlp-in, mlp-out at layers 0-2`` style summary of a cache's points."""
    by_kind: dict[str, list[int]] = {}
    for point in points:
        by_kind.setdefault(point.get("kind", "resid-post"), []).append(int(point["layer"]))
    return "; ".join(f"{kind} at {_layer_ranges(layers)}" for kind, layers in by_kind.items())


def _layer_ranges(layers: list[int]) -> str:
    runs: list[list[int]] = []
    for layer in sorted(set(layers)):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    text = ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
    return ("layer " if len(layers) == 1 else "layers ") + text


@dataclass(frozen=True)
class Shard:
    """The tensors of one shard."""

    activations_CTD: torch.Tensor
    tokens_CT: torch.Tensor
    record: ShardRecord


def activations_dir(run_dir: Path) -> Path:
    return Path(run_dir) / ACTIVATIONS_DIR


def shard_name(writer: str, index: int) -> str:
    return f"{writer}-{index:06d}{SHARD_SUFFIX}"


def read_manifest(folder: Path, check_files: bool = False) -> CacheManifest:
    """Read and validate ``manifest.json`` in an activations folder.

    With ``check_files`` (the verbs that read the whole cache: train, and cache when it
    extends one) every listed shard must exist at its recorded size, one ``stat`` each, so a
    deleted or truncated shard stops the job before it starts, even one that would stop
    before reaching that shard. Verbs that read no shard (the browser, steer, features) work
    on a run copied without its activations; every shard a verb reads is checked as it is
    read (size, and sha256 where the whole shard is read), and `verify` checks them all.
    """
    path = Path(folder) / MANIFEST
    run_dir = Path(folder).parent
    if not run_dir.exists():
        raise CacheError(f"run folder {run_dir} does not exist: check --run, or create it with `saescope cache`")
    if not run_dir.is_dir():
        raise CacheError(f"--run {run_dir} is a file, not a run folder")
    if not path.is_file():
        raise CacheError(f"no activation cache at {folder} (missing {MANIFEST}); run `saescope cache` first")
    manifest = parse_manifest_file(path)
    if check_files:
        check_shard_sizes(folder, manifest)
    return manifest


def check_shard_sizes(folder: Path, manifest: CacheManifest) -> None:
    """CorruptShardError naming the first listed shard that is missing or not of its recorded size."""
    for record in manifest.shards:
        _check_size(Path(folder) / record.file, record)


def parse_manifest_file(path: Path) -> CacheManifest:
    """One manifest file (the merged one or a writer's), or a CacheError naming it."""
    try:
        return CacheManifest.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    except (ValueError, TypeError, KeyError, AttributeError) as error:  # JSON and Unicode errors are ValueErrors
        raise CacheError(
            f"{path} is unreadable ({error}); delete the activations folder and re-run `saescope cache`"
        ) from error


def write_manifest(folder: Path, manifest: CacheManifest) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(folder) / MANIFEST, manifest.to_dict())


def tensor_sha256(tensor: torch.Tensor) -> str:
    """Hex sha256 of a CPU tensor's bytes as safetensors stores them (little-endian, row-major)."""
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def write_shard(
    folder: Path,
    writer: str,
    index: int,
    first_context: int,
    activations: torch.Tensor | dict[str, torch.Tensor],
    tokens_CT: torch.Tensor,
    dtype: str,
) -> ShardRecord:
    """Serialize, hash and atomically publish one shard; return its manifest record.

    ``activations`` is one tensor [C, T, D] (stored as ``activations``) or, for a cache
    of several points, {hook name: tensor [C, T, D]} (each tensor's sha256 goes in the metadata).
    """
    if dtype not in STORAGE_DTYPES:
        raise CacheError(f"unknown storage dtype {dtype!r}: use one of {sorted(STORAGE_DTYPES)}")
    named = activations if isinstance(activations, dict) else {"activations": activations}
    tensors = {"tokens": tokens_CT.detach().to(device="cpu", dtype=torch.int32).contiguous()}
    for key, acts_CTD in named.items():
        if acts_CTD.shape[:2] != tokens_CT.shape:
            raise CacheError(f"activations {tuple(acts_CTD.shape)} and tokens {tuple(tokens_CT.shape)} disagree")
        tensors[key] = acts_CTD.detach().to(device="cpu", dtype=STORAGE_DTYPES[dtype]).contiguous()
    metadata = {"first_context": str(first_context)}  # one key: safetensors writes several in no fixed order
    if isinstance(activations, dict):
        hashes = {key: tensor_sha256(tensors[key]) for key in sorted(named)}
        metadata = {POINTS_METADATA: json.dumps({"first_context": first_context, "sha256": hashes}, sort_keys=True)}
    data = save_safetensors_bytes(tensors, metadata=metadata)
    name = shard_name(writer, index)
    atomic_write_bytes(Path(folder) / name, data)
    return ShardRecord(
        file=name,
        writer=writer,
        index=index,
        first_context=first_context,
        n_ctx=int(tokens_CT.shape[0]),
        sha256=hashlib.sha256(data).hexdigest(),
        n_bytes=len(data),
    )


def _read_checked(path: Path, record: ShardRecord) -> bytes:
    if not path.is_file():
        raise CorruptShardError(f"shard {path} is listed in the manifest but missing{REPAIR}")
    data = path.read_bytes()
    if len(data) != record.n_bytes:
        raise CorruptShardError(
            f"shard {path} is truncated or altered: {len(data)} bytes, expected {record.n_bytes}{REPAIR}"
        )
    actual = hashlib.sha256(data).hexdigest()
    if actual != record.sha256:
        raise CorruptShardError(
            f"shard {path} is corrupt: sha256 {actual[:12]}… does not match the manifest's {record.sha256[:12]}…"
            + REPAIR
        )
    return data


def load_shard(folder: Path, manifest: CacheManifest, record: ShardRecord, verify: bool = True) -> Shard:
    """Load one shard's tokens and the selected point's activations, checking size, sha256 and shapes.

    A one-point shard is checked against the manifest's sha256 of the whole file; in a
    shard of several points only the selected tensor is read and checked (its sha256 in
    the file's metadata; the file's size against the manifest).
    """
    path = Path(folder) / record.file
    key = manifest.tensor_key
    try:
        if verify and key == "activations":
            tensors = load_safetensors_bytes(_read_checked(path, record))
        else:
            tensors = _read_tensors(path, record, ("tokens", key), verify)
    except CorruptShardError:
        raise
    except Exception as error:  # safetensors raises its own error types for damaged headers
        raise CorruptShardError(f"shard {path} is unreadable ({first_line(error)}){REPAIR}") from error
    expected = (record.n_ctx, manifest.ctx_len, manifest.d_model)
    acts, tokens = tensors.get(key), tensors.get("tokens")
    if acts is None or tokens is None or tuple(acts.shape) != expected or tuple(tokens.shape) != expected[:2]:
        raise CorruptShardError(f"shard {path} does not hold {key} {expected} and tokens {expected[:2]}")
    return Shard(activations_CTD=acts, tokens_CT=tokens, record=record)


def _read_tensors(path: Path, record: ShardRecord, keys: tuple[str, ...], verify: bool) -> dict[str, torch.Tensor]:
    """Only ``keys`` of a shard; with ``verify``, the file's size and each tensor's recorded sha256 are checked."""
    if verify:
        _check_size(path, record)
    with safe_open(path, framework="pt") as handle:
        present, metadata = set(handle.keys()), handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in keys if key in present}
    hashes = json.loads(metadata[POINTS_METADATA])["sha256"] if POINTS_METADATA in metadata else {}
    for key, tensor in tensors.items():
        expected = hashes.get(key)
        if verify and expected is not None and tensor_sha256(tensor) != expected:
            raise CorruptShardError(f"shard {path} is corrupt: its {key} tensor does not match its sha256{REPAIR}")
    return tensors


def _check_size(path: Path, record: ShardRecord) -> None:
    if not path.is_file():
        raise CorruptShardError(f"shard {path} is listed in the manifest but missing{REPAIR}")
    size = path.stat().st_size
    if size != record.n_bytes:
        raise CorruptShardError(
            f"shard {path} is truncated or altered: {size} bytes, expected {record.n_bytes}{REPAIR}"
        )


def load_tokens(folder: Path, record: ShardRecord) -> torch.Tensor:
    """Only the ``tokens`` tensor of a shard (no checksum; cheap random access)."""
    path = Path(folder) / record.file
    _check_size(path, record)
    try:
        with safe_open(path, framework="pt") as handle:
            return handle.get_tensor("tokens")
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise CorruptShardError(f"shard {path} is unreadable ({first_line(error)}){REPAIR}") from error


def iter_shards(
    folder: Path,
    manifest: CacheManifest,
    records: tuple[ShardRecord, ...] | None = None,
    verify: bool = True,
) -> Iterator[Shard]:
    """Stream shards one at a time (bounded memory: one shard in RAM)."""
    for record in manifest.shards if records is None else records:
        yield load_shard(folder, manifest, record, verify=verify)


def check_whole_shard(folder: Path, manifest: CacheManifest, record: ShardRecord) -> None:
    """CorruptShardError unless the shard's size, sha256 and every tensor's shape match the manifest."""
    _check_whole_shard(Path(folder), manifest, record)


def _check_whole_shard(folder: Path, manifest: CacheManifest, record: ShardRecord) -> None:
    path = folder / record.file
    try:
        tensors = load_safetensors_bytes(_read_checked(path, record))
    except CorruptShardError:
        raise
    except Exception as error:  # safetensors raises its own error types for damaged headers
        raise CorruptShardError(f"shard {path} is unreadable ({first_line(error)}){REPAIR}") from error
    expected = (record.n_ctx, manifest.ctx_len, manifest.d_model)
    for key in ("tokens", *manifest.tensor_keys):
        shape = expected[:2] if key == "tokens" else expected
        if key not in tensors or tuple(tensors[key].shape) != shape:
            raise CorruptShardError(f"shard {path} does not hold {key} {shape}")


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of checking a whole cache."""

    n_shards: int
    problems: tuple[str, ...]
    """One line per missing, truncated or corrupt shard."""
    strays: tuple[str, ...]
    """Shard files not in the manifest (a killed job wrote them; resume overwrites them)."""


def verify_cache(folder: Path) -> VerifyReport:
    """Check every listed shard's size, sha256 and shapes (every point's, in a cache of several)."""
    manifest = read_manifest(folder)
    problems = []
    for record in manifest.shards:
        try:
            _check_whole_shard(Path(folder), manifest, record)
        except CacheError as error:
            problems.append(str(error))
    listed = {record.file for record in manifest.shards}
    strays = sorted(str(p) for p in Path(folder).glob(f"*{SHARD_SUFFIX}") if p.name not in listed)
    return VerifyReport(n_shards=len(manifest.shards), problems=tuple(problems), strays=tuple(strays))
