"""Compute-dtype choice: explicit requests pass through, auto measures and records why."""

import pytest
import torch

from pipeline.precision import choose_dtype, resolve_device


def test_explicit_dtypes_pass_through():
    assert choose_dtype("float32", torch.device("cpu")).dtype == torch.float32
    assert choose_dtype("bfloat16", torch.device("cpu")).dtype == torch.bfloat16


def test_auto_measures_both_and_picks_the_faster_enough_one():
    choice = choose_dtype("auto", torch.device("cpu"))
    speeds = choice.gflops
    assert set(speeds) == {"float32", "bfloat16"} and all(v > 0 for v in speeds.values())
    expected = "bfloat16" if speeds["bfloat16"] >= 1.3 * speeds["float32"] else "float32"
    assert choice.name == expected
    assert "measured" in choice.reason


def test_unknown_dtype_and_missing_cuda_are_errors():
    with pytest.raises(ValueError, match="unknown compute dtype"):
        choose_dtype("int4", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
