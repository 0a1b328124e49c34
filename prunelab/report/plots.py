"""PNG plots of a collected sweep (matplotlib, Agg backend): accuracy vs compression (direct and effective),
effective vs direct compression, per-layer sparsity profiles.

Every plot gives each group its own colour (never reused within a plot), labels the legend with keys
(``method=snip, allocation=global``), averages the seeds of a group at each pruning target with error bars
in y (accuracy) and in x where the x value varies across seeds (effective compression), and marks runs
whose network collapsed (infinite effective compression) with an ``x`` instead of dropping them: at their
accuracy, on a dotted line drawn right of every finite point and labelled ``collapsed (inf)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

COLLAPSED_LABEL = "collapsed (effective compression inf)"


def _key_name(col: str) -> str:
    return col.removeprefix("config.").removeprefix("final.")


def _label(keys, values) -> str:
    if not isinstance(values, tuple):
        values = (values,)
    if not keys:
        return "all runs"
    return ", ".join(f"{_key_name(k)}={v}" for k, v in zip(keys, values))


def colors(n: int) -> list:
    """``n`` distinct colours: tab10, tab20, then evenly spaced along a perceptual colormap."""
    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    if n <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(n)]
    return [plt.get_cmap("turbo")(x) for x in np.linspace(0.02, 0.98, n)]


def _groups(runs: pd.DataFrame, by: list[str]) -> list[tuple[str, pd.DataFrame]]:
    if not by:
        return [(_label([], ()), runs)]
    return [(_label(by, key), g) for key, g in runs.groupby(by, dropna=False, sort=True)]


def _num(s: pd.Series) -> pd.Series:
    return pd.to_numeric(s, errors="coerce")


def _collapsed(g: pd.DataFrame) -> pd.Series:
    if "final.layer_collapse" in g:
        return g["final.layer_collapse"].fillna(False).astype(bool)
    return pd.Series(False, index=g.index)


def _target(runs: pd.DataFrame) -> str:
    """The column whose value is the same for the seeds of one point: the pruning target when recorded."""
    if "final.sparsity_target" in runs and _num(runs["final.sparsity_target"]).notna().any():
        return "final.sparsity_target"
    return "final.compression_direct"


def _finish(fig: Figure, ax, path: Path) -> Path:
    ax.grid(alpha=0.3)
    _, labels = ax.get_legend_handles_labels()
    if len(labels) > 6:  # a long legend goes beside the axes instead of over the curves
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    else:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def accuracy_vs_compression_figure(runs: pd.DataFrame, by: list[str], kind: str = "effective") -> Figure | None:
    x, y = f"final.compression_{kind}", "final.test_acc"
    if x not in runs or y not in runs:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    groups = _groups(runs, by)
    target = _target(runs)
    xs = _num(runs[x])
    finite = xs[np.isfinite(xs)]
    x_collapse = (finite.max() if len(finite) else 1.0) * 1.5
    any_collapse = False
    for color, (label, g) in zip(colors(len(groups)), groups):
        d = pd.DataFrame({"x": _num(g[x]), "y": _num(g[y]), "t": _num(g[target]).fillna(-1.0),
                          "collapsed": _collapsed(g)})
        ok = d[np.isfinite(d["x"]) & d["y"].notna()]
        pts = ok.groupby("t").agg(x=("x", "mean"), xsd=("x", "std"), y=("y", "mean"), ysd=("y", "std"))
        pts = pts.sort_values("x")
        if not pts.empty:
            ax.errorbar(pts["x"], pts["y"], xerr=pts["xsd"].fillna(0), yerr=pts["ysd"].fillna(0), marker="o",
                        ms=4, capsize=2, color=color, label=label)
        # collapsed runs: an x at their accuracy; infinite x values at x_collapse
        coll = d[d["collapsed"] & d["y"].notna()]
        if not coll.empty:
            cx = coll["x"].where(np.isfinite(coll["x"]), x_collapse)
            ax.scatter(cx, coll["y"], marker="x", s=40, color=color, zorder=3,
                       label=None if not pts.empty else label)
            any_collapse |= bool((~np.isfinite(coll["x"])).any())
    if any_collapse:
        ax.axvline(x_collapse, color="0.5", ls=":", lw=1, label=COLLAPSED_LABEL)
    ax.set_xscale("log")
    ax.set_xlabel(f"{kind} compression (total / remaining)")
    ax.set_ylabel("test accuracy")
    return fig


def accuracy_vs_compression(runs: pd.DataFrame, by: list[str], out: Path, kind: str = "effective") -> Path | None:
    fig = accuracy_vs_compression_figure(runs, by, kind)
    return None if fig is None else _finish(fig, fig.axes[0], out / f"accuracy_vs_{kind}_compression.png")


def effective_vs_direct_figure(runs: pd.DataFrame, by: list[str]) -> Figure | None:
    x, y = "final.compression_direct", "final.compression_effective"
    if x not in runs or y not in runs:
        return None
    fig, ax = plt.subplots(figsize=(5, 5))
    groups = _groups(runs, by)
    target = _target(runs)
    ys = _num(runs[y])
    finite = pd.concat([_num(runs[x]), ys[np.isfinite(ys)]]).dropna()
    lo, hi = (finite.min(), finite.max()) if len(finite) else (1.0, 1.0)
    y_collapse = hi * 1.5
    any_collapse = False
    for color, (label, g) in zip(colors(len(groups)), groups):
        d = pd.DataFrame({"x": _num(g[x]), "y": _num(g[y]), "t": _num(g[target]).fillna(-1.0)}).dropna(subset=["x"])
        ok = d[np.isfinite(d["y"])]
        pts = ok.groupby("t").agg(x=("x", "mean"), xsd=("x", "std"), y=("y", "mean"), ysd=("y", "std"))
        pts = pts.sort_values("x")
        if not pts.empty:
            ax.errorbar(pts["x"], pts["y"], xerr=pts["xsd"].fillna(0), yerr=pts["ysd"].fillna(0), marker="o",
                        ms=4, capsize=2, color=color, label=label)
        coll = d[~np.isfinite(d["y"])]
        if not coll.empty:
            ax.scatter(coll["x"], [y_collapse] * len(coll), marker="x", s=40, color=color, zorder=3,
                       label=None if not pts.empty else label)
            any_collapse = True
    if len(finite):
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="effective = direct")
    if any_collapse:
        ax.axhline(y_collapse, color="0.5", ls=":", lw=1, label=COLLAPSED_LABEL)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("direct compression")
    ax.set_ylabel("effective compression")
    return fig


def effective_vs_direct(runs: pd.DataFrame, by: list[str], out: Path) -> Path | None:
    fig = effective_vs_direct_figure(runs, by)
    return None if fig is None else _finish(fig, fig.axes[0], out / "effective_vs_direct_compression.png")


def layer_profiles_figure(runs: pd.DataFrame, by: list[str], max_lines: int = 20) -> Figure | None:
    """Per-layer direct (solid) and effective (dashed, same colour) sparsity of one run per group (the first
    seed); at most ``max_lines`` groups."""
    if "path" not in runs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    groups = _groups(runs, by)[:max_lines]
    n = 0
    for color, (label, g) in zip(colors(len(groups)), groups):
        res = json.loads((Path(g["path"].iloc[0]) / "results.json").read_text())
        layers = res.get("layers", [])
        if not layers:
            continue
        direct = [1 - r["remaining"] / r["numel"] for r in layers]
        ax.plot(range(len(layers)), direct, marker=".", color=color, label=label)
        if all(r.get("effective_remaining") is not None for r in layers):
            eff = [1 - r["effective_remaining"] / r["numel"] for r in layers]
            ax.plot(range(len(layers)), eff, ls="--", color=color)
        n += 1
    if n == 0:
        plt.close(fig)
        return None
    ax.set_xlabel("prunable layer (order in the model)")
    ax.set_ylabel("sparsity (solid: direct, dashed: effective)")
    ax.set_ylim(0, 1.02)
    return fig


def layer_profiles(runs: pd.DataFrame, by: list[str], out: Path, max_lines: int = 20) -> Path | None:
    fig = layer_profiles_figure(runs, by, max_lines)
    return None if fig is None else _finish(fig, fig.axes[0], out / "layer_sparsity_profiles.png")
