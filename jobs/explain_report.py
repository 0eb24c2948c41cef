"""The end-of-run report of `saescope explain`: each score's distribution beside its control, best and worst."""

from __future__ import annotations

import numpy as np

MARGIN = 0.1
"""A score "beats its control" when it exceeds the control's value by at least this much."""


def _line(name: str, values: np.ndarray, controls: np.ndarray) -> str:
    paired = ~np.isnan(controls)
    beats = float((values[paired] >= controls[paired] + MARGIN).mean()) if paired.any() else float("nan")
    control = f"{np.median(controls[paired]):.3f}" if paired.any() else "-"
    return (
        f"  {name:<24} median {np.median(values):.3f}  control {control}  "
        f"beats control by >= {MARGIN}: {beats:.0%}  (n={len(values)})"
    )


def format_report(rows: list[dict], settings, shown: int = 5) -> str:
    """Median score and control per (scorer, metric), the share beating the control, best and worst features."""
    if not rows:
        return "no scores yet"
    lines = [f"scores of the {settings.explainer} explainer (median over features; control = another feature's label):"]
    by_metric: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        by_metric.setdefault((row["scorer"], row["metric"]), []).append(row)
    for (scorer, metric), group in sorted(by_metric.items()):
        values = np.array([r["value"] for r in group], dtype=np.float64)
        controls = np.array([np.nan if r["control_value"] is None else r["control_value"] for r in group])
        lines.append(_line(f"{scorer} {metric}", values, controls))
    key = ("simulation", "auroc") if ("simulation", "auroc") in by_metric else sorted(by_metric)[0]
    ranked = sorted(by_metric[key], key=lambda r: (-r["value"], r["feature"]))
    for title, chosen in (("best", ranked[:shown]), ("worst", ranked[::-1][:shown])):
        lines.append(f"{title} explained ({key[0]} {key[1]}):")
        lines += [f"  feature {r['feature']:>6}  {r['value']:.3f}  {r['text'][:80]}" for r in chosen]
    return "\n".join(lines)
