"""Many SAEs from one read of the cache: the grid's shared batch loop, its progress and table.

Comma lists in ``--arch``, ``--k``, ``--d-sae``/``--expansion`` and ``--lr`` make a
grid: every combination is one member, an SAE in its own folder with its own
checkpoints, log and artifact. Members of a grid share the data path only: the
stream is read, decoded, shuffled and normalized once per batch and each member
takes its own ``train_step`` on it, so a member ends exactly where the same SAE
trained alone ends. ``k`` is ignored by relu and jumprelu, so those members are
made once per size and lr; ``--matryoshka-widths`` applies to the matryoshka members only.
The members and their names come from ``jobs.training.config.grid_members``.
"""

from __future__ import annotations

import time

from jobs.console import human_count, progress
from jobs.options import ConfigError
from jobs.training.config import TrainJobConfig
from jobs.training.results import TrainSummary
from jobs.training.start import Member, weights_config
from pipeline.runtime.distributed import Group
from pipeline.sae.model import SPARSE_ARCHITECTURES
from pipeline.sae.training import StepStats, Trainee, TrainState, state_tree, train_many
from storage.checkpoints import save_checkpoint
from storage.constants import CHECKPOINTS_DIR
from storage.train_log import append_log
from storage.training_data import TrainingStream


def announce(cfg: TrainJobConfig, stream: TrainingStream, compute, group: Group, say, grid: bool, first: bool) -> None:
    """Say what one member trains on (its name only in a grid; the data-parallel split once)."""
    per_epoch = stream.batches_per_epoch() * cfg.batch_size
    what = f"{cfg.name!r} " if grid else ""
    say(
        f"training {what}on {human_count(cfg.tokens)} tokens: {cfg.tokens / per_epoch:.1f} passes over the cache's "
        f"{human_count(per_epoch)} training tokens ({cfg.heldout_contexts} contexts held out); "
        f"lr {cfg.lr:.2e}, compute {compute.name} ({compute.reason})"
    )
    if group.distributed and first:
        say(
            f"data-parallel over {group.world} ranks: each computes {human_count(cfg.batch_size // group.world)} "
            f"of every batch's {human_count(cfg.batch_size)} tokens"
        )


def log_line(stats: StepStats, state: TrainState, dead_window: int, started: float) -> dict:
    return {
        **stats._asdict(),
        "tokens": state.tokens_seen,
        "seconds": round(time.perf_counter() - started, 2),
        "dead_fraction": state.dead_fraction(dead_window),
    }


class GridProgress:
    """One progress bar: an SAE's tokens when alone (as before grids), the stream's tokens for a grid."""

    def __init__(self, members: list[Member], group: Group):
        self.members, self.last = members, {}
        cfg, steps = members[0].cfg, members[0].tcfg.total_steps
        desc = f"train {cfg.name}" if len(members) == 1 else f"train {len(members)} SAEs"
        initial = min(m.state.tokens_seen for m in members)
        self.bar = progress(steps * cfg.batch_size, desc, initial=initial, disable=not group.is_main)

    def update(self, member: Member, stats: StepStats, state: TrainState) -> None:
        self.last[member.cfg.name] = stats
        self.bar.update(min(m.state.tokens_seen for m in self.members) - self.bar.n)
        if len(self.members) == 1:
            dead = state.dead_fraction(member.cfg.dead_window)
            postfix = dict(
                loss=f"{stats.loss:.3g}", fvu=f"{stats.fvu:.3f}", l0=f"{stats.l0:.1f}", dead=f"{100 * dead:.1f}%"
            )
        else:
            fvus, l0s = [s.fvu for s in self.last.values()], [s.l0 for s in self.last.values()]
            postfix = dict(fvu=f"{min(fvus):.3f}-{max(fvus):.3f}", l0=f"{min(l0s):.1f}-{max(l0s):.1f}")
        self.bar.set_postfix(**postfix, refresh=False)


def _trainee(member: Member, bar: GridProgress, group: Group, started: float) -> Trainee:
    def on_log(stats: StepStats, st: TrainState) -> None:
        if group.is_main:
            append_log(member.folder, log_line(stats, st, member.cfg.dead_window, started))
        bar.update(member, stats, st)

    def on_checkpoint(st: TrainState, opt) -> None:
        if group.is_main:
            job = {"weights_config": weights_config(member.cfg), "scale": member.scale}
            tree = {"job": job, "trainer": state_tree(member.sae, opt, st)}
            save_checkpoint(member.folder / CHECKPOINTS_DIR, st.step, tree)

    return Trainee(member.sae, member.optimizer, member.state, member.tcfg, on_log, on_checkpoint)


GRID_CHUNK_BYTES = 256 << 20
"""Memory for the batches a grid holds at once, so each member takes several steps in a row."""
GRID_CHUNK_MAX = 16


def grid_chunk(members: list[Member], stream: TrainingStream, group: Group) -> int:
    """Batches held at once: 1 for a lone SAE, else as many as fit GRID_CHUNK_BYTES (at most GRID_CHUNK_MAX)."""
    if len(members) == 1:
        return 1
    batch_bytes = 4 * stream.manifest.d_model * -(-members[0].cfg.batch_size // group.world)
    return max(1, min(GRID_CHUNK_MAX, GRID_CHUNK_BYTES // batch_bytes))


def train_members(members: list[Member], stream: TrainingStream, group: Group) -> None:
    """Read the stream once from the earliest member's step and feed every batch to every member."""
    scales = sorted({m.scale for m in members})
    if len(scales) > 1:
        raise ConfigError(f"the SAEs of this grid were started with different normalization factors {scales}")
    first = min(m.state.step for m in members)
    part = (group.rank, group.world)
    device = members[0].sae.W_dec.device
    batches = (x * scales[0] for x in stream.iter_batches(start=first, device=device, part=part))
    started = time.perf_counter()
    bar = GridProgress(members, group)
    with bar.bar:
        trainees = [_trainee(m, bar, group, started) for m in members]
        train_many(trainees, batches, first, group, chunk=grid_chunk(members, stream, group))


GRID_COLUMNS = ("SAE", "arch", "d_sae", "k", "FVU", "PCA FVU", "L0", "dead %", "CE rec.", "")


def _row(summary: TrainSummary) -> tuple[str, ...]:
    cfg, metrics = summary.config, summary.metrics

    def number(key: str, digits: int, factor: float = 1.0) -> str:
        value = metrics.get(key)
        return "-" if value is None else f"{factor * value:.{digits}f}"

    status = (
        "done before"
        if summary.already_done
        else (f"resumed at {summary.resumed_from}" if summary.resumed_from else "")
    )
    k = str(cfg.k) if cfg.arch in SPARSE_ARCHITECTURES else "-"
    d_sae = str(cfg.d_sae) if cfg.d_sae is not None else f"x{cfg.expansion}"
    return (cfg.name, cfg.arch, d_sae, k, number("fvu", 4), number("pca_fvu", 4), number("l0", 1),
            number("dead_fraction", 1, 100.0), number("ce_loss_recovered", 3), status)  # fmt: skip


def format_grid_summary(summaries: list[TrainSummary], seconds: float) -> str:
    """One table of every member, sorted by L0 (the frontier reads top to bottom)."""
    rows = [_row(s) for s in sorted(summaries, key=lambda s: s.metrics.get("l0", float("inf")))]
    widths = [max(len(r[i]) for r in [GRID_COLUMNS, *rows]) for i in range(len(GRID_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in [GRID_COLUMNS, *rows]
    ]
    trained = [s for s in summaries if not s.already_done]
    tokens = trained[0].config.tokens if trained else 0
    head = (
        f"trained a grid of {len(summaries)} SAEs ({len(trained)} in this job, {human_count(tokens or 0)} tokens each, "
        f"one read of the cache) in {seconds:.0f}s"
    )
    run = summaries[0].config.run
    return "\n".join(
        [head, *lines, f"next: saescope eval --run {run} --sae NAME   |   saescope index --run {run} --sae NAME"]
    )
