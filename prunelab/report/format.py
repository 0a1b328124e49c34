"""Number formats and the display tables of a report (Markdown and LaTeX).

Each metric is shown in the format a paper uses for it: accuracies and sparsities in percent with 2
decimals, compressions and ratios with 3 significant digits, parameter and FLOP counts with 3 significant
digits and an SI suffix (``4.59M``), times with 1 decimal, anything else with 4 significant digits. A cell
reads ``mean ± std`` over the seeds of its group (std only with more than one run), ``inf`` when a run
collapsed. The LaTeX table drops every column whose cells are all the same and states those values in the
caption instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pandas as pd


def _decimals(x: float, sig: int = 3) -> int:
    """Decimals that show ``x`` with ``sig`` significant digits (0 for large numbers)."""
    if x == 0 or not math.isfinite(x):
        return sig - 1
    return max(0, sig - 1 - int(math.floor(math.log10(abs(float(f"{x:.{sig}g}"))))))


def sig3(x: float) -> str:
    """3 significant digits, without an exponent below 1e6 (``10.0``, ``123``, ``1230``, ``0.0123``)."""
    if x == 0:
        return "0"
    r = float(f"{x:.3g}")
    if abs(r) >= 1e6:
        return f"{r:.3g}"
    return f"{r:.{_decimals(r)}f}"


SI = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def _si_scale(x: float) -> tuple[float, str]:
    return next(((scale, suffix) for scale, suffix in SI if abs(x) >= scale), (1.0, ""))


def si3(x: float) -> str:
    """Counts (parameters, FLOPs) with 3 significant digits and an SI suffix: ``53.2k``, ``4.59M``."""
    scale, suffix = _si_scale(x)
    return sig3(x / scale) + suffix


def _kind(metric: str) -> str:
    name = metric.rsplit(".", 1)[-1]
    if "acc" in name or name.startswith("sparsity") or name.endswith("_frac") or name.startswith("frac_"):
        return "percent"
    if name.startswith(("params", "flops")) and not name.endswith("ratio"):
        return "count"
    if name.endswith(("_s", "_time")):
        return "time"
    if name.startswith(("compression", "speedup")) or name.endswith("ratio"):
        return "sig3"
    return "default"


def format_mean_std(metric: str, mean: float, std: float | None = None) -> tuple[str, str | None]:
    """``mean`` in the metric's format and ``std`` with the same unit and decimals (None without a std)."""
    if isinstance(mean, float) and math.isinf(mean):
        return ("inf" if mean > 0 else "-inf"), None
    kind = _kind(metric)
    has_std = std is not None and not (isinstance(std, float) and math.isnan(std))
    if kind == "percent":
        return f"{100 * mean:.2f}", (f"{100 * std:.2f}" if has_std else None)
    if kind == "time":
        return f"{mean:.1f}", (f"{std:.1f}" if has_std else None)
    if kind == "default":
        return f"{mean:.4g}", (f"{std:.2g}" if has_std else None)
    scale, suffix = _si_scale(mean) if kind == "count" else (1.0, "")
    m = float(f"{mean / scale:.3g}") if mean else 0.0
    if abs(m) >= 1e6:
        return f"{m:.3g}{suffix}", (f"{std / scale:.3g}{suffix}" if has_std else None)
    d = _decimals(m)
    return f"{m:.{d}f}{suffix}", (f"{std / scale:.{d}f}{suffix}" if has_std else None)


def formatter(metric: str) -> Callable[[float], str]:
    return lambda x: format_mean_std(metric, x)[0]


def header(metric: str) -> str:
    """Display name of a column: ``final.`` / ``config.`` removed, ``(%)`` for percentages."""
    name = metric.removeprefix("config.").removeprefix("final.")
    return f"{name} (%)" if _kind(metric) == "percent" and metric.startswith("final.") else name


def display_table(table: pd.DataFrame, by: list[str], metrics: list[str], counts: bool = True) -> pd.DataFrame:
    """``mean ± std`` cells (``(n)`` appended with ``counts``) for an :func:`~prunelab.report.collect.aggregate`
    table; group columns as they are, ``collapsed`` (runs whose network collapsed) when any did."""
    disp = pd.DataFrame({header(c): table[c].map(_fmt_group) for c in by if c in table})
    for m in metrics:
        if f"{m}_mean" not in table:
            continue

        def cell(r, m=m):
            mean, std, n = r[f"{m}_mean"], r[f"{m}_std"], int(r[f"{m}_count"])
            if mean is None or (isinstance(mean, float) and math.isnan(mean)):
                return "–"
            s, sd = format_mean_std(m, mean, std if n > 1 else None)
            if sd is not None:
                s += f" ± {sd}"
            return f"{s} ({n})" if counts else s

        disp[header(m)] = table.apply(cell, axis=1)
    if "collapsed" in table and table["collapsed"].any():
        disp["collapsed"] = table["collapsed"].astype(int).astype(str)
    return disp


def _fmt_group(v) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:g}"
    return str(v)


def constant_columns(disp: pd.DataFrame) -> list[str]:
    """Columns whose cells are all equal (only meaningful with more than one row)."""
    if len(disp) < 2:
        return []
    return [c for c in disp.columns if disp[c].astype(str).nunique() == 1]


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def _tex_cell(s: str) -> str:
    return tex_escape(s).replace(" ± ", r" $\pm$ ").replace("–", "--")


def to_latex(disp: pd.DataFrame, n: pd.Series | None = None, caption: str = "") -> str:
    """``caption``: LaTeX, as is. A booktabs table of ``disp`` without its constant columns (named in the caption), text columns left-
    and numbers right-aligned; ``n`` (runs per group) becomes a column when it varies, else the caption."""
    disp = disp.copy()
    if n is not None:
        disp["$n$"] = n.astype(int).astype(str).values
    const = constant_columns(disp)
    notes = [f"{c} = {disp[c].iloc[0]}" for c in const]
    disp = disp.drop(columns=const)
    numeric = [not any(ch.isalpha() for ch in "".join(disp[c].astype(str)).replace("inf", "")) for c in disp]
    lines = [r"\begin{table}[t]", r"\centering"]
    text = caption + (" " if caption and notes else "")
    if notes:
        text += "Same for every row: " + "; ".join(_tex_cell(t).replace(r"\$n\$", "$n$") for t in notes) + "."
    if text:
        lines.append(r"\caption{" + text + "}")
    lines.append(r"\begin{tabular}{" + "".join("r" if isnum else "l" for isnum in numeric) + "}")
    lines.append(r"\toprule")
    lines.append(" & ".join(c if c == "$n$" else tex_escape(c) for c in disp.columns) + r" \\")
    lines.append(r"\midrule")
    for _, row in disp.iterrows():
        lines.append(" & ".join(_tex_cell(v) for v in row.astype(str)) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"
