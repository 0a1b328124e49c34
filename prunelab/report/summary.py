"""The summary table printed at the end of a run (rich)."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def print_summary(results: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="prunelab: final", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    nonfinite = results["final"].get("nonfinite") or {}
    for k, v in results["final"].items():
        if k == "nonfinite" or isinstance(v, (dict, list)):
            continue
        if v is None and k in nonfinite:  # a stored result: JSON null + flag
            v = float(nonfinite[k])
        if v is not None:
            table.add_row(k, _fmt(v))
    console.print(table)
    stages = Table(title="stages", show_header=True, header_style="bold")
    for col in ("stage", "test acc", "cached", "time (s)", "recipe"):
        stages.add_column(col)
    for name, rec in results.get("stages", {}).items():
        m = rec.get("metrics", {})
        t = m.get(f"{name}/train_time_s", m.get(f"{name}/time_s", rec.get("train_time_s")))
        # recipe: which section's epochs / optimizer / scheduler a training stage used (pretrain, finetune)
        stages.add_row(name, _fmt(m.get(f"{name}/test/acc")), str(rec.get("cached", False)), _fmt(t),
                       str(rec.get("recipe", "")))
    console.print(stages)
    if "results_file" in results:
        console.print(f"results: [bold]{results['results_file']}[/bold]")
