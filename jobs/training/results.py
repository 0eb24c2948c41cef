"""What a `saescope train` job reports back: one ``TrainSummary`` per SAE it trained, resumed or skipped.

Shared by the grid's table (jobs.training.grid) and the verb (jobs.train), so it sits
below both; it imports only the job config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jobs.training.config import TrainJobConfig


@dataclass(frozen=True)
class TrainSummary:
    folder: Path
    config: TrainJobConfig
    metrics: dict
    already_done: bool
    resumed_from: int
    seconds: float
    epochs: float
