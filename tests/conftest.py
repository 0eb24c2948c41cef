"""Shared fixtures: a tiny random Llama and a character-level tokenizer, built in code.

Nothing here touches the network; the real default model is only used by tests
marked ``slow``.
"""

from __future__ import annotations

import os
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SPECIALS = ["<unk>", "<bos>", "<eos>", "<pad>"]
CHARS = list(string.ascii_letters + string.digits + string.punctuation + " \n")

TEXTS = [
    "The cat sat on the mat. The dog sat on the log.",
    "Sparse autoencoders split activations into features.",
    "Every context starts with a beginning-of-sequence token.",
    "Residual streams carry information between blocks.",
    "A killed job resumes at the next unfinished shard.",
    "Python ships its own documentation as docstrings.",
] * 12


def pytest_addoption(parser):
    parser.addoption(
        "--force-dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="make --model-dtype/--dtype auto resolve to this dtype, as on a CPU where it is the faster one; "
        "the end-to-end tests then cache and train in it",
    )


def pytest_configure(config):
    """Offline before anything imports huggingface_hub (it reads these once, at import)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"


def make_tokenizer():
    """A character-level fast tokenizer with <unk>, <bos>, <eos>, <pad>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )


def make_tiny_llama(vocab_size: int, n_layers: int = 4, d_model: int = 32, seed: int = 0):
    """A random Llama small enough to run in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    return make_tiny_llama(len(tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer, tiny_model) -> Path:
    """The tiny model and tokenizer saved as a local model folder (a model spec)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A local .txt corpus (one document)."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(TEXTS), encoding="utf-8")
    return path


def synthetic_corpus(n_words: int, seed: int = 0) -> str:
    """Deterministic pseudo-English: words from a small vocabulary in short sentences."""
    import random

    words = (
        "the cat dog sat ran on under mat log sparse feature model token layer block reads writes "
        "quickly slowly red blue green and or but then"
    ).split()
    rng = random.Random(seed)
    sentences = []
    while sum(len(s.split()) for s in sentences) < n_words:
        sentences.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + ".")
    return "\n\n".join(" ".join(sentences[i : i + 5]) for i in range(0, len(sentences), 5))


def tiny_cache_config(run: Path, model_dir: Path, corpus: Path, device: str = "cpu"):
    """The cache settings of ``tiny_run`` (~16k tokens, contexts of 32, shards of 1024 tokens, float32)."""
    from jobs.cache import CacheConfig

    return CacheConfig(
        run=str(run),
        model=str(model_dir),
        dataset=str(corpus),
        tokens=16384,
        ctx_len=32,
        batch_size=16,
        shard_tokens=1024,
        dtype="float32",
        model_dtype="float32",
        device=device,
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished activation cache of the tiny model (~16k tokens, layer 2); copy before changing it."""
    from jobs.cache import run_cache

    root = tmp_path_factory.mktemp("tiny-run")
    corpus = root / "corpus.txt"
    corpus.write_text(synthetic_corpus(4000), encoding="utf-8")
    run = root / "run"
    run_cache(tiny_cache_config(run, tiny_model_dir, corpus))
    return run


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny run for tests that write into it."""
    import shutil

    target = tmp_path / "run"
    shutil.copytree(tiny_run, target)
    return target


@pytest.fixture(scope="session")
def forced_dtype(pytestconfig) -> str | None:
    return pytestconfig.getoption("--force-dtype")


@pytest.fixture(autouse=True)
def _auto_dtype(monkeypatch, forced_dtype):
    """With --force-dtype, "auto" sees a measurement where the forced dtype is 4x faster."""
    if forced_dtype is None:
        return
    import pipeline.runtime.precision

    speeds = {"float32": 100.0, "bfloat16": 25.0} if forced_dtype == "float32" else {"float32": 25.0, "bfloat16": 100.0}
    monkeypatch.setattr(pipeline.runtime.precision, "measure_speeds", lambda _device: dict(speeds))


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """Every test runs offline and keeps converted models in its own temp folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("SAESCOPE_HOME", str(tmp_path / "saescope-home"))


def tiny_train_config(run, **overrides):
    """The small float32 CPU training run the tiny-model tests share (64 latents, k 4, 24 batches of 256)."""
    from jobs.training.config import TrainJobConfig

    values = dict(
        run=str(run),
        d_sae=64,
        k=4,
        tokens=256 * 24,
        batch_size=256,
        lm_eval_contexts=0,
        device="cpu",
        dtype="float32",
        checkpoint_every=5,
    )
    return TrainJobConfig(**{**values, **overrides})


@pytest.fixture(scope="session")
def transcoder_run(tmp_path_factory, tiny_run) -> Path:
    """The tiny run with a transcoder set ``tc`` at every layer; copy before writing into it."""
    import shutil

    from jobs.training.transcoders import run_transcoders

    run = tmp_path_factory.mktemp("transcoders") / "run"
    shutil.copytree(tiny_run, run)
    cfg = tiny_train_config(run, transcoder=True, layers="all", name="tc", tokens=256 * 8, lm_eval_contexts=0)
    run_transcoders(cfg, say=lambda _: None)
    return run


@pytest.fixture(scope="session")
def indexed_run(tmp_path_factory, tiny_run):
    """(run folder, index path): the tiny run with a 64-latent TopK SAE and its feature index; copy to change."""
    import shutil

    from jobs.index import IndexConfig, run_index
    from jobs.train import run_train

    run = tmp_path_factory.mktemp("indexed") / "run"
    shutil.copytree(tiny_run, run)
    run_train(tiny_train_config(run, checkpoint_every=None))
    summary = run_index(IndexConfig(run=str(run), device="cpu", top_k=5, window=4, batch_contexts=7))
    return run, summary.path


@pytest.fixture
def indexed_copy(indexed_run, tmp_path) -> Path:
    """A private copy of the indexed tiny run."""
    import shutil

    target = tmp_path / "indexed"
    shutil.copytree(indexed_run[0], target)
    return target


# The real default model (SmolLM2-135M-Instruct): one small run per session, for the slow tests.
CACHE_TOKENS = 8192


def saescope(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run the installed `saescope` console script (falls back to `python -m jobs.cli`)."""
    script = Path(sys.executable).with_name("saescope")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "jobs.cli"]
    env = {**os.environ, "SAESCOPE_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(
            f"saescope {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.fixture(scope="session")
def real_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("saescope-home")


@pytest.fixture(scope="session")
def model_dtype(forced_dtype) -> str:
    """float32 unless the suite runs with --force-dtype: numbers here must not depend on the CPU."""
    return forced_dtype or "float32"


@pytest.fixture(scope="session")
def real_run(tmp_path_factory, real_home, model_dtype) -> Path:
    run = tmp_path_factory.mktemp("real") / "run"
    saescope(
        "cache", "--run", str(run), "--tokens", str(CACHE_TOKENS), "--device", "cpu",
        "--model-dtype", model_dtype, home=real_home,
    )  # fmt: skip
    return run


@pytest.fixture(scope="session")
def real_indexed(real_run, real_home, model_dtype) -> Path:
    saescope(
        "train",
        "--run",
        str(real_run),
        "--d-sae",
        "1152",
        "--batch-size",
        "512",
        "--tokens",
        "15360",
        "--lm-eval-contexts",
        "2",
        "--device",
        "cpu",
        "--dtype",
        model_dtype,
        home=real_home,
    )
    saescope("index", "--run", str(real_run), "--device", "cpu", home=real_home)
    return real_run


@pytest.fixture(scope="session")
def real_traced(real_run, real_home, model_dtype) -> Path:
    """The real run with small transcoders at all 30 layers and one traced graph, ``capital``."""
    saescope(
        "train", "--run", str(real_run), "--transcoder", "--layers", "all", "--name", "tc", "--d-sae", "256",
        "--k", "8", "--batch-size", "512", "--tokens", "2048", "--lm-eval-contexts", "0", "--device", "cpu",
        "--dtype", model_dtype, home=real_home,
    )  # fmt: skip
    saescope(
        "trace", "--run", str(real_run), "--prompt", TRACE_PROMPT, "--name", "capital",
        "--max-feature-nodes", "300", home=real_home,
    )  # fmt: skip
    return real_run


TRACE_PROMPT = "The `capital` of *France* is"
