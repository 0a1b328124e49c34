"""Collect ``results.json`` files of runs and multiruns into one pandas table.

Each row is one run: its final metrics (``final.*``), its flattened config (``config.*``), the option it was
started with for each config group (``method``, ``allocation``, ``schedule``, ``finetune``, ``model``,
``data``, ``trainer``: results.json's ``choices``, e.g. ``method=bmrs_u``) and bookkeeping (``path``,
``run_id``, ``schema_version``). Job folders without ``results.json`` are reported as missing or failed (a
job that crashed leaves ``error.txt`` or a Hydra log with a traceback).

Non-finite numbers are JSON null in results.json (docs/results-schema.md); they are read back as what they
were: ``compression_effective`` of a collapsed network (``layer_collapse: true``) and every key listed in
``final.nonfinite`` become ``inf`` / ``nan`` again, so a collapsed run is never mistaken for a missing one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from prunelab.config import IDENTITY_DEFAULTS, NON_IDENTITY, NON_IDENTITY_SUBKEYS
from prunelab.runinfo import GROUPS


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
    if v in ("inf", "-inf", "nan"):  # results.json written before schema_version 1
        return float(v)
    return v


def read_final(final: dict[str, Any]) -> dict[str, Any]:
    """The ``final`` block with its non-finite values restored (null + flag -> inf / nan)."""
    out = {k: _num(v) for k, v in final.items() if k != "nonfinite"}
    for key, kind in (final.get("nonfinite") or {}).items():
        out[key] = float(kind)
    if out.get("layer_collapse") and out.get("compression_effective") is None:
        out["compression_effective"] = float("inf")
    return out


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
        row: dict[str, Any] = {f"final.{k}": v for k, v in read_final(res.get("final", {})).items()}
        row.update({f"config.{k}": v for k, v in _flatten(res.get("config", {})).items()})
        # the option names the run was started with; runs from before schema_version 1 have none
        row.update({g: v for g, v in (res.get("choices") or {}).items() if g in GROUPS})
        row["path"] = str(job)
        row["run_id"] = res.get("run_id")
        row["schema_version"] = res.get("schema_version")
        rows.append(row)
    runs = pd.DataFrame(rows)
    return runs, pd.DataFrame(problems, columns=["path", "status", "error"])


def _is_seed(col: str) -> bool:
    return col == "config.seed" or col.endswith(".seed")


def _is_path(col: str, values: pd.Series) -> bool:
    """A path-valued setting (data folders, weight files, output folders): by its name or its values."""
    if col.endswith(("_dir", "_path", "_file", ".path", ".root", ".weights", ".dir", ".file")):
        return True
    strings = [v for v in values.dropna() if isinstance(v, str)]
    return bool(strings) and all(("/" in v or "\\" in v or v.startswith("~")) for v in strings)


def _non_identity(col: str) -> bool:
    """Settings that do not change what a run computes (prunelab.config.NON_IDENTITY): paths, logger,
    measurement, names, tags..."""
    parts = col.split(".")
    if len(parts) < 2 or parts[0] != "config":
        return True
    if parts[1] in NON_IDENTITY:
        return True
    return len(parts) > 2 and parts[2] in NON_IDENTITY_SUBKEYS.get(parts[1], ())


def _as_identity(col: str, values: pd.Series) -> pd.Series:
    """An option added after runs existed (prunelab.config.IDENTITY_DEFAULTS) is missing from the older runs,
    which computed its default: read a missing value as the default, so old and new runs of one setting do not
    look like two settings."""
    parts = col.split(".")
    old = IDENTITY_DEFAULTS.get(parts[1], {}) if len(parts) == 3 and parts[0] == "config" else {}
    if parts[-1] not in old:
        return values
    return values.map(lambda v: old[parts[-1]] if v is None or (isinstance(v, float) and v != v) else v)


def varied_columns(runs: pd.DataFrame) -> list[str]:
    """Config columns whose value differs across runs (the sweep's axes): settings that change results only,
    seeds (``seed`` and every ``*.seed``, which follow it) and path-valued settings excluded."""
    cols = []
    for c in runs.columns:
        if _non_identity(c) or _is_seed(c) or _is_path(c, runs[c]):
            continue
        if _as_identity(c, runs[c]).astype(str).nunique(dropna=False) > 1:
            cols.append(c)
    return cols


def default_groups(runs: pd.DataFrame) -> list[str]:
    """The default grouping of a report: the option names that vary (``method``, ``allocation``, ...), then
    every other varied setting (:func:`varied_columns`) except the settings of a group that its option name
    already determines (``config.method.rule`` is implied by ``method=bmrs_u``; ``method.p=4,8`` within one
    method is kept). Seeds are never grouped: they are what the aggregates average over."""
    by = [g for g in GROUPS if g in runs and runs[g].astype(str).nunique(dropna=False) > 1]
    for c in varied_columns(runs):
        group = c.split(".")[1]
        if group in runs and runs[group].notna().all():
            within = runs.groupby(group, dropna=False)[c].agg(lambda s: s.astype(str).nunique(dropna=False))
            if (within <= 1).all():
                continue  # the option name says it
        by.append(c)
    return by


def aggregate(runs: pd.DataFrame, by: list[str], metrics: list[str]) -> pd.DataFrame:
    """Mean, std and count of each metric per group (seeds aggregated); ``collapsed``: the number of runs
    of the group whose network collapsed (their infinite effective compression makes the mean inf)."""
    metrics = [m for m in metrics if m in runs]
    if not by:
        runs = runs.assign(_all="all")
        by = ["_all"]
    num = runs[by + metrics].copy()
    for m in metrics:
        num[m] = pd.to_numeric(num[m], errors="coerce")
    num["collapsed"] = runs["final.layer_collapse"].fillna(False).astype(bool) if "final.layer_collapse" in runs else False
    g = num.groupby(by, dropna=False, sort=True)
    out = g[metrics].agg(["mean", "std", "count"])
    out.columns = [f"{m}_{stat}" for m, stat in out.columns]
    out["collapsed"] = g["collapsed"].sum().astype(int)
    return out.reset_index()
