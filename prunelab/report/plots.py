"""PNG plots of a collected sweep (matplotlib, Agg backend): accuracy vs compression (direct and effective),
effective vs direct compression, per-layer sparsity profiles."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _label(keys, values) -> str:
    if not isinstance(values, tuple):
        values = (values,)
    return ", ".join(f"{v}" for k, v in zip(keys, values))


def _finite(s: pd.Series) -> pd.Series:
    return pd.to_numeric(s, errors="coerce").replace([np.inf, -np.inf], np.nan)


def accuracy_vs_compression(runs: pd.DataFrame, by: list[str], out: Path, kind: str = "effective") -> Path | None:
    x, y = f"final.compression_{kind}", "final.test_acc"
    if x not in runs or y not in runs:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    groups = runs.groupby(by, dropna=False) if by else [(("all",), runs)]
    for key, g in groups:
        d = pd.DataFrame({"x": _finite(g[x]), "y": _finite(g[y]), "c": _finite(g["final.compression_direct"])})
        d = d.dropna().groupby("c").agg(x=("x", "mean"), y=("y", "mean"), sd=("y", "std")).sort_values("x")
        if d.empty:
            continue
        ax.errorbar(d["x"], d["y"], yerr=d["sd"].fillna(0), marker="o", capsize=2, label=_label(by, key))
    ax.set_xscale("log")
    ax.set_xlabel(f"{kind} compression (total / remaining)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = out / f"accuracy_vs_{kind}_compression.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def effective_vs_direct(runs: pd.DataFrame, by: list[str], out: Path) -> Path | None:
    x, y = "final.compression_direct", "final.compression_effective"
    if x not in runs or y not in runs:
        return None
    fig, ax = plt.subplots(figsize=(5, 5))
    groups = runs.groupby(by, dropna=False) if by else [(("all",), runs)]
    lo, hi = np.inf, 0
    for key, g in groups:
        d = pd.DataFrame({"x": _finite(g[x]), "y": _finite(g[y])}).dropna()
        d = d.groupby("x").mean().reset_index()
        if d.empty:
            continue
        lo, hi = min(lo, d["x"].min()), max(hi, d[["x", "y"]].max().max())
        ax.plot(d["x"], d["y"], marker="o", label=_label(by, key))
    if hi > 0:
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="effective = direct")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("direct compression")
    ax.set_ylabel("effective compression")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = out / "effective_vs_direct_compression.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def layer_profiles(runs: pd.DataFrame, by: list[str], out: Path, max_lines: int = 12) -> Path | None:
    """Per-layer direct (solid) and effective (dashed) sparsity of one run per group (the first seed)."""
    if "path" not in runs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    groups = runs.groupby(by, dropna=False) if by else [(("all",), runs)]
    n = 0
    for key, g in groups:
        if n >= max_lines:
            break
        res = json.loads((Path(g["path"].iloc[0]) / "results.json").read_text())
        layers = res.get("layers", [])
        if not layers:
            continue
        direct = [1 - r["remaining"] / r["numel"] for r in layers]
        line = ax.plot(range(len(layers)), direct, marker=".", label=_label(by, key))[0]
        if all(r.get("effective_remaining") is not None for r in layers):
            eff = [1 - r["effective_remaining"] / r["numel"] for r in layers]
            ax.plot(range(len(layers)), eff, ls="--", color=line.get_color())
        n += 1
    if n == 0:
        plt.close(fig)
        return None
    ax.set_xlabel("prunable layer (order in the model)")
    ax.set_ylabel("sparsity (solid: direct, dashed: effective)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = out / "layer_sparsity_profiles.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
