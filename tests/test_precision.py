"""Compute-dtype choice: explicit requests pass through; "auto" is a rule over a measurement.

The rule is tested with hand-written measurements for both outcomes, so both
branches run on every CPU whatever its real bfloat16 speed.
"""

import pytest
import torch

from pipeline.runtime.precision import choose_dtype, decide_dtype, measure_speeds, resolve_device


def test_explicit_dtypes_pass_through():
    assert choose_dtype("float32", torch.device("cpu")).dtype == torch.float32
    assert choose_dtype("bfloat16", torch.device("cpu")).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("fp32", "bf16", "expected"),
    [
        (100.0, 180.0, "bfloat16"),  # an AVX-512-BF16 CPU: 1.8x
        (100.0, 130.0, "bfloat16"),  # exactly the 1.3x threshold
        (100.0, 129.0, "float32"),  # just below it
        (130.0, 19.0, "float32"),  # an AVX2-only CPU: bfloat16 7x slower
    ],
)
def test_auto_rule_on_given_measurements(fp32, bf16, expected):
    choice = decide_dtype({"float32": fp32, "bfloat16": bf16})
    assert choice.name == expected
    assert choice.gflops == {"float32": fp32, "bfloat16": bf16}
    assert "measured" in choice.reason


def test_auto_uses_the_measurement_it_is_given():
    fast_bf16 = choose_dtype("auto", torch.device("cpu"), measure=lambda _: {"float32": 10.0, "bfloat16": 40.0})
    slow_bf16 = choose_dtype("auto", torch.device("cpu"), measure=lambda _: {"float32": 40.0, "bfloat16": 10.0})
    assert (fast_bf16.dtype, slow_bf16.dtype) == (torch.bfloat16, torch.float32)


def test_real_measurement_reports_both_speeds():
    speeds = measure_speeds(torch.device("cpu"))
    assert set(speeds) == {"float32", "bfloat16"} and all(v > 0 for v in speeds.values())


def test_unknown_dtype_and_device_are_errors():
    with pytest.raises(ValueError, match="unknown compute dtype"):
        choose_dtype("int4", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
