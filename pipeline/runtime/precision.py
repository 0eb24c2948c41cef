"""Choose a compute dtype from a measurement, not a guess.

bfloat16 matrix products are ~3x faster than float32 on CPUs with AMX or
AVX-512-BF16 and on recent GPUs, but 5-100x *slower* on CPUs without them
(an AVX2-only AMD EPYC here: ~130 vs ~19 GFLOP/s). ``choose_dtype("auto")``
times one ``F.linear`` of a transformer-like shape in both dtypes on the
target device and picks bfloat16 only when it is clearly faster.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BF16_MIN_SPEEDUP = 1.3


@dataclass(frozen=True)
class DtypeChoice:
    """A resolved compute dtype and why it was chosen."""

    name: str
    """"float32" or "bfloat16"."""
    reason: str
    """One line: requested explicitly, or the measured speeds."""
    gflops: dict[str, float] | None = None
    """Measured GFLOP/s per dtype when "auto" measured them."""

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def as_dict(self) -> dict:
        return {"name": self.name, "reason": self.reason, "gflops": self.gflops}


def resolve_device(device: str) -> torch.device:
    """ "auto" -> cuda if available else cpu; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available (use --device cpu)")
    return resolved


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def linear_gflops(dtype: torch.dtype, device: torch.device, min_seconds: float = 0.05) -> float:
    """GFLOP/s of F.linear([256, 576] x [1536, 576]^T) in ``dtype`` on ``device``."""
    rows, d_in, d_out = 256, 576, 1536
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d_in, generator=generator).to(device=device, dtype=dtype)
    w = torch.randn(d_out, d_in, generator=generator).to(device=device, dtype=dtype)
    F.linear(x, w)
    _synchronize(device)
    reps, start = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < min_seconds:
        F.linear(x, w)
        reps += 1
    _synchronize(device)
    elapsed = time.perf_counter() - start
    return 2.0 * rows * d_in * d_out * reps / elapsed / 1e9


def measure_speeds(device: torch.device) -> dict[str, float]:
    """GFLOP/s of the reference product in float32 and bfloat16 on ``device``."""
    return {"float32": linear_gflops(torch.float32, device), "bfloat16": linear_gflops(torch.bfloat16, device)}


def decide_dtype(speeds: dict[str, float]) -> DtypeChoice:
    """The "auto" rule as a pure function of a measurement: bfloat16 only if >= 1.3x faster."""
    fp32, bf16 = speeds["float32"], speeds["bfloat16"]
    rounded = {"float32": round(fp32, 1), "bfloat16": round(bf16, 1)}
    if bf16 >= BF16_MIN_SPEEDUP * fp32:
        return DtypeChoice("bfloat16", f"bfloat16 measured {bf16 / fp32:.1f}x faster than float32", rounded)
    return DtypeChoice("float32", f"bfloat16 measured {bf16 / fp32:.2f}x the speed of float32", rounded)


def choose_dtype(
    requested: str, device: torch.device, measure: Callable[[torch.device], dict[str, float]] | None = None
) -> DtypeChoice:
    """Resolve "float32" | "bfloat16" | "auto" to a concrete compute dtype on ``device``.

    ``measure`` (default ``measure_speeds``) supplies the speeds "auto" decides from.
    """
    if requested in ("float32", "bfloat16"):
        return DtypeChoice(requested, "requested explicitly")
    if requested != "auto":
        raise ValueError(f"unknown compute dtype {requested!r}: use float32, bfloat16 or auto")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return DtypeChoice("float32", "this GPU has no bfloat16 support")
    return decide_dtype((measure or measure_speeds)(device))
