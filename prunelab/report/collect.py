"""Collect ``results.json`` files of runs and multiruns into one pandas table.

Each row is one run: its final metrics (``final.*`` flattened), the config values that vary across the
collected runs (dotted keys such as ``method._target_`` shortened to ``method``), and bookkeeping (path,
status). Job folders without ``results.json`` are reported as missing or failed (a job that crashed leaves
``error.txt`` or a Hydra log with a traceback).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

SHORT = {
    "data._target_": "data", "model.name": "model", "method._target_": "method", "allocation._target_": "allocation",
    "schedule._target_": "schedule", "finetune._target_": "finetune",
}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, list):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def _num(v: Any) -> Any:
    if v in ("inf", "-inf", "nan"):
        return float(v)
    return v


def _short_target(v: Any) -> Any:
    """``prunelab.pruning.scorers.snip.SNIPScorer`` -> ``snip``: the module name says which option it is."""
    if isinstance(v, str) and v.count(".") >= 2:
        parts = v.split(".")
        if parts[-2] not in ("allocation", "schedules", "base"):
            return parts[-2]
        name = re.sub(r"(Allocation|Scorer)$", "", parts[-1])  # GlobalAllocation -> global, UniformPlus -> uniform_plus
        return re.sub(r"(?<=[a-z])(?=[A-Z])", "_", name).lower()
    return v


def find_jobs(dirs: Iterable[str | Path]) -> list[Path]:
    """Job folders: any folder holding ``results.json``, ``run.json`` or a Hydra ``.hydra`` folder."""
    jobs: set[Path] = set()
    for d in dirs:
        d = Path(d)
        for marker in ("results.json", "run.json", ".hydra/config.yaml"):
            for p in d.rglob(marker):
                job = p.parent if marker != ".hydra/config.yaml" else p.parent.parent
                if "checkpoints" not in job.parts:
                    jobs.add(job)
    return sorted(jobs)


def job_status(job: Path) -> str:
    if (job / "results.json").exists():
        return "done"
    if (job / "error.txt").exists():
        return "failed"
    logs = list(job.glob("*.log"))
    if any("Traceback" in p.read_text(errors="ignore") for p in logs):
        return "failed"
    return "missing"


def collect(dirs: Iterable[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, problems): one row per finished run; one row per job without results (status and path)."""
    rows, problems = [], []
    for job in find_jobs(dirs):
        status = job_status(job)
        if status != "done":
            err = (job / "error.txt").read_text(errors="ignore").strip().splitlines()[-1:] if (job / "error.txt").exists() else []
            problems.append({"path": str(job), "status": status, "error": err[0] if err else ""})
            continue
        res = json.loads((job / "results.json").read_text())
        row = {f"final.{k}": _num(v) for k, v in res.get("final", {}).items()}
        row.update({f"config.{k}": v for k, v in _flatten(res.get("config", {})).items()})
        row["path"] = str(job)
        row["run_id"] = res.get("run_id")
        rows.append(row)
    runs = pd.DataFrame(rows)
    if not runs.empty:
        for long, short in SHORT.items():
            col = f"config.{long}"
            if col in runs:
                runs[short] = runs[col].map(_short_target)
    return runs, pd.DataFrame(problems, columns=["path", "status", "error"])


def varied_columns(runs: pd.DataFrame, exclude: Iterable[str] = ("config.seed", "config.paths", "config.name")) -> list[str]:
    """Config columns whose value differs across runs (the sweep's axes), seeds excluded."""
    cols = []
    for c in runs.columns:
        if not c.startswith("config.") or any(c.startswith(e) for e in exclude):
            continue
        if c.endswith(("data_dir", "cache_dir", "output_dir", "root")):
            continue
        if runs[c].astype(str).nunique(dropna=False) > 1:
            cols.append(c)
    return cols


def aggregate(runs: pd.DataFrame, by: list[str], metrics: list[str]) -> pd.DataFrame:
    """Mean, std and count of each metric per group (seeds aggregated)."""
    metrics = [m for m in metrics if m in runs]
    if not by:
        runs = runs.assign(_all="all")
        by = ["_all"]
    num = runs[by + metrics].copy()
    for m in metrics:
        num[m] = pd.to_numeric(num[m], errors="coerce")
    g = num.groupby(by, dropna=False, sort=True)
    out = g[metrics].agg(["mean", "std", "count"])
    out.columns = [f"{m}_{stat}" for m, stat in out.columns]
    return out.reset_index()


def mean_pm_std(table: pd.DataFrame, metrics: list[str], digits: int = 4) -> pd.DataFrame:
    """A display table with ``mean ± std (n)`` cells."""
    disp = table[[c for c in table.columns if not any(c.startswith(m + "_") for m in metrics)]].copy()
    for m in metrics:
        if f"{m}_mean" not in table:
            continue

        def cell(r, m=m):
            mean, std, n = r[f"{m}_mean"], r[f"{m}_std"], int(r[f"{m}_count"])
            if mean is None or (isinstance(mean, float) and math.isnan(mean)):
                return "–"
            s = f"{mean:.{digits}g}"
            if n > 1 and not math.isnan(std):
                s += f" ± {std:.2g}"
            return f"{s} ({n})"

        disp[m] = table.apply(cell, axis=1)
    return disp
