"""Semantic segmentation runs in ``avcl-report``: seed 003's table and two pictures.

A semantic run (``"problem": "semantic"`` in ``config.json``, written by
:mod:`train.problems_semantic`) holds, beside the segmentation files, the value of
each metric after each step (``metrics.json``: ``per_metric[m]['step']``),
``semantic_steps.csv`` (the base / new channel ranges of each step) and
``semantic_class_iou.csv`` (the IoU of every class after every step). The report
writes:

* ``semantic_table.md`` / ``semantic_table.csv``: per protocol, one row per method
  and, after each step, the mIoU (%) over the base channels (background and the
  first task's classes), over the later classes seen so far, and over all seen
  classes: seed 003's table form ("0-60 | 61-70 | all"). Cells are mean ± sample
  std over seeds; the best mean of a column is bold and every other row carries
  the paired t-test p-value against it (:func:`train.report.build_table`'s rules).
* ``semantic_curves_<protocol>.png``: all-class mIoU after each step, mean ± std.
* ``class_iou_<protocol>.png``: per method, the IoU of every class after every
  step (mean over seeds): which old class a step made the model forget.
"""
from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from train.report import (Run, ReportError, Table, _fill_column, _fmt_cell, _protocol_runs, _protocols, _save,
                          group_rows, plot_accuracy_curves, table_caption, write_table_csv)

#: (metric of ``per_metric``, part of the step) in the table's column order
PARTS = (("miou_base", "base"), ("miou_new", "new"), ("miou", "all"))


def _channel_ranges(run: Run) -> list[dict[str, str]] | None:
    """Per step ``{'base': '0-8', 'new': '9-10'}`` from the run's ``semantic_steps.csv`` (None without it)."""
    path = run.path / "semantic_steps.csv"
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        return [{"base": r["base_channels"], "new": r["new_channels"]} for r in rows]
    except KeyError as e:
        raise ReportError(f"{path}: missing column {e.args[0]!r}") from e


def _column(t: int, part: str, ranges: list[dict[str, str]] | None) -> str:
    """Column key of ``part`` after step ``t``: ``step 1: 0-8`` (base), ``step 1: 9-10`` (new), ``step 1: all``."""
    if part == "all" or ranges is None or t >= len(ranges):
        return f"step {t}: {part}"
    return f"step {t}: {ranges[t][part].replace('-', '–')}"


def semantic_table(runs: Sequence[Run]) -> Table:
    """Rows = methods, columns = (protocol, ``step t: <channels>``) for base, new (from step 1) and all."""
    rows, per_row = group_rows(runs)
    cells, best, columns = {}, {}, []
    for proto in sorted({r.protocol for r in runs}):
        rs = [r for r in runs if r.protocol == proto]
        T = max(r.num_tasks for r in rs)
        ranges = next((x for x in map(_channel_ranges, rs) if x is not None), None)
        for t in range(T):
            for metric, part in PARTS:
                if part == "new" and t == 0:
                    continue
                col = (proto, _column(t, part, ranges))
                columns.append(col)

                def value(r: Run, m=metric, t=t) -> float:
                    v = r.steps.get(m)
                    return float(v[t]) if v is not None and t < v.size else math.nan

                _fill_column(cells, best, col, rows, per_row, value, higher=True)
    return Table(rows=rows, columns=columns, cells=cells, best=best, runs_per_row=per_row)


def semantic_markdown(table: Table) -> str:
    """One Markdown table per protocol (seed 003's form) and the caption."""
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    parts = []
    for proto in _protocols(table):
        cols = [c for c in table.columns if c[0] == proto]
        lines = [f"### {proto}: mIoU (%) after each step", "",
                 "Base: the first task's channels (background included); new: the later classes seen so far; "
                 "all: every seen class with background.", "",
                 "| Method | " + " | ".join(esc(c[1]) for c in cols) + " |", "|---|" + "---:|" * len(cols)]
        for lab in table.rows:
            if not any((lab, c) in table.cells for c in cols):
                continue
            lines.append(f"| {esc(lab)} | " + " | ".join(_fmt_cell(table.cells.get((lab, c))) for c in cols) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts) + "\n" + table_caption(table) + "\n"


def read_class_iou(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(class names, (C, T) IoU, NaN where empty) of a run's ``semantic_class_iou.csv``."""
    path = Path(path)
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2 or rows[0][:2] != ["channel", "class"]:
        raise ReportError(f"{path}: expected a header 'channel,class,step_0,...' and one row per class")
    try:
        vals = np.array([[float(x) if x else np.nan for x in r[2:]] for r in rows[1:]])
    except ValueError as e:
        raise ReportError(f"{path}: {e}") from e
    return [r[1] for r in rows[1:]], vals


def _class_iou(run: Run) -> tuple[list[str], np.ndarray] | None:
    """:func:`read_class_iou` of the run, None when it wrote no ``semantic_class_iou.csv``."""
    path = run.path / "semantic_class_iou.csv"
    return read_class_iou(path) if path.is_file() else None


def plot_class_iou(table: Table, out_dir: str | Path) -> list[Path]:
    """Per protocol, one panel per method: IoU (%) of every class (rows) after every step (columns), mean
    over the seeds whose run wrote ``semantic_class_iou.csv``; white before a class is seen."""
    from matplotlib import colormaps

    out_dir, files = Path(out_dir), []
    cmap = colormaps["viridis"].with_extremes(bad="white")
    for proto in _protocols(table):
        groups = {}
        for lab, rs in _protocol_runs(table, proto).items():
            loaded = [x for x in map(_class_iou, rs) if x is not None]
            if loaded:
                names = loaded[0][0]
                if any(n != names for n, _ in loaded):
                    raise ReportError(f"{lab!r} on {proto!r}: runs list different classes in semantic_class_iou.csv")
                with warnings.catch_warnings():  # a class not seen yet is NaN in every seed
                    warnings.simplefilter("ignore", RuntimeWarning)
                    groups[lab] = (names, 100.0 * np.nanmean(np.stack([v for _, v in loaded]), axis=0), len(loaded))
        if not groups:
            continue
        n = len(groups)
        C = max(v.shape[0] for _, v, _ in groups.values())
        T = max(v.shape[1] for _, v, _ in groups.values())
        fig = Figure(figsize=(min(0.6 * T + 1.2, 6.0) * n + 3.5, 0.22 * C + 1.8), layout="constrained")
        axes = fig.subplots(1, n, squeeze=False)[0]
        image = None
        for i, (ax, (lab, (names, V, k))) in enumerate(zip(axes, groups.items())):
            image = ax.imshow(np.ma.masked_invalid(V), cmap=cmap, vmin=0, vmax=100, aspect="auto",
                              interpolation="nearest")
            if C <= 30 and T <= 10:
                for c in range(V.shape[0]):
                    for t in range(V.shape[1]):
                        if np.isfinite(V[c, t]):
                            ax.text(t, c, f"{V[c, t]:.0f}", ha="center", va="center", fontsize=6,
                                    color="black" if V[c, t] > 60 else "white")
            ax.set_xticks(range(V.shape[1]), [str(t) for t in range(V.shape[1])])
            ax.set_xlabel("After step")
            ax.set_yticks(range(len(names)), names if i == 0 else [""] * len(names), fontsize=6 if C > 30 else 7)
            ax.set_title(f"{lab} (n={k})", fontsize="medium")
        fig.colorbar(image, ax=axes, label="IoU (%)", shrink=0.8)
        fig.suptitle(f"IoU of each class after each step — {proto} (mean over seeds)")
        files.append(_save(fig, out_dir, "class_iou", proto))
    return files


def semantic_report(runs: list[Run], out: Path, prefix: str, draw: bool):
    """(table, markdown, md path, csv path, files, plots) of the semantic runs (see the module docstring)."""
    table = semantic_table(runs)
    md = semantic_markdown(table)
    md_path = out / f"{prefix}table.md"
    md_path.write_text(md)
    csv_path = write_table_csv(table, out / f"{prefix}table.csv")
    plots = []
    if draw:
        plots = (plot_accuracy_curves(table, out, score="mIoU on all seen classes", stem="semantic_curves")
                 + plot_class_iou(table, out))
    return table, md, md_path, csv_path, [md_path, csv_path], plots
