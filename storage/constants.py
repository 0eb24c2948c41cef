"""File and folder names of a run directory, in one place."""

FORMAT_VERSION = 1

RUN_CONFIG = "run.toml"
ACTIVATIONS_DIR = "activations"
MANIFEST = "manifest.json"
SHARD_SUFFIX = ".safetensors"

SAES_DIR = "saes"
DEFAULT_SAE_NAME = "default"
SAE_WEIGHTS = "sae_weights.safetensors"
SAE_CFG = "cfg.json"
SAE_METRICS = "metrics.json"
TRAIN_LOG = "train_log.jsonl"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_TENSORS = "state.safetensors"
CHECKPOINT_META = "state.json"
FEATURE_INDEX = "features.duckdb"
EXPLANATIONS = "explanations.duckdb"
CACHE_LOCK = ".cache.lock"
TRAIN_LOCK = ".train.lock"
INDEX_LOCK = ".index.lock"
EXPLAIN_LOCK = ".explain.lock"

TRANSCODERS_DIR = "transcoders"
TRANSCODER_SET = "set.json"
GRAPHS_DIR = "graphs"
