"""Aggregate run directories into seed-table-style results and plots.

A run directory (written by the trainer) holds:

* ``config.json``: at least ``method``, ``protocol`` (a name, or a dict with
  ``name``), ``seed``; optionally ``head``, ``hparams`` (dict) and
  ``classes_per_task`` (int or list; also read from a protocol dict), used to
  label plot axes with the number of classes seen.
* ``acc_matrix.csv``: header ``after_task,task_0,...,task_{T-1}``; row ``t``
  holds ``A[t, i]``, the accuracy (fraction) after task ``t`` on task ``i``'s
  test samples (empty or ``nan`` for entries not measured).
* ``metrics.json``: ``step_acc`` (list, one per task) and summary metrics as
  fractions (``mean_accuracy``, ``average_forgetting``, ...). A metric missing
  there is computed from the matrix with :mod:`avcl_core.metrics`.

Segmentation runs (``"problem": "segmentation"`` in ``config.json``) add:

* ``config.json``: ``primary_metric`` (the metric of ``acc_matrix.csv``, e.g. ``map``).
* ``matrices/<metric>.csv``: one matrix per segmentation metric (``map``,
  ``maxf1``, ``fscore``, ``miou``, ``dice``, ...), same format as ``acc_matrix.csv``.
* ``metrics.json``: ``per_metric`` = ``{metric: {summary key: value or null}}``;
  ``step_acc`` may be absent (then the task-balanced mean of each row of the
  primary matrix over the tasks seen).
* ``overlays.npz`` (optional): ``sample_id`` (K,) str, ``frame`` (K,) int,
  ``prob`` (K, H, W) foreground probabilities, ``gt`` (K, H, W) masks, and
  optionally ``image`` (K, H, W, 3) uint8 frames to draw under the masks.

Semantic segmentation runs (``"problem": "semantic"``) are reported by
:mod:`train.report_semantic` (seed 003's base / new / all table per step).

Their table columns are keys ``<metric>/<summary>`` (e.g. ``map/average_accuracy``,
the CL-AVS "Avg mAP"); a summary missing from ``per_metric`` is computed from
that metric's matrix. See :func:`make_report` for the figures.

Runs are grouped into table rows by method, head (named when runs use more
than one head) and any hyper-parameters that differ between runs of the same
method, head and protocol; columns are protocol x metric. A cell is the mean
± sample standard deviation (ddof = 1) over seeds, in percent.
"""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from avcl_core import metrics as M

__all__ = [
    "METHOD_DISPLAY_NAMES",
    "METRICS",
    "DEFAULT_METRICS",
    "DEFAULT_SEG_METRICS",
    "SEG_DETAIL_METRICS",
    "SEG_METRIC_NAMES",
    "SEG_SUMMARIES",
    "Cell",
    "Report",
    "ReportError",
    "Run",
    "Table",
    "build_table",
    "discover_runs",
    "display_name",
    "load_run",
    "load_runs",
    "make_report",
    "metric_info",
    "plot_mask_overlays",
    "plot_maxf_heatmaps",
    "plot_seg_transfer_vs_forgetting",
    "plot_accuracy_curves",
    "plot_accuracy_matrices",
    "plot_transfer_vs_forgetting",
    "table_caption",
    "table_markdown",
    "write_table_csv",
]


class ReportError(ValueError):
    """A run directory or file that cannot be reported; the message names it."""


# Method ids (as registered by the trainer) -> names used in the papers' tables.
# Dict order is the row order of the tables; unknown methods go before "Ours".
METHOD_DISPLAY_NAMES: dict[str, str] = {
    "finetune": "Fine-tuning",
    "fine-tuning": "Fine-tuning",
    "ft": "Fine-tuning",
    "lwf": "LwF",
    "icarl": "iCaRL-NME",
    "icarl-nme": "iCaRL-NME",
    "icarl-fc": "iCaRL-FC",
    "ss-il": "SS-IL",
    "ssil": "SS-IL",
    "afc-nme": "AFC-NME",
    "afc-lsc": "AFC-LSC",
    "av-cil": "AV-CIL",
    "avcil": "AV-CIL",
    "lll": "LLL",
    "joint": "Upper bound (joint)",
    "upper-bound": "Upper bound (joint)",
}
# continual audio-visual segmentation (CL-AVS tables)
METHOD_DISPLAY_NAMES.update({
    "ewc": "EWC",
    "si": "SI",
    "mas": "MAS",
    "avsbench": "AVSBench",
    "avs": "AVSBench",
    "atlas": "ATLAS",
})
_LAST = ("ATLAS", "LLL", "Upper bound (joint)")

# metric key -> (column label, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "mean_accuracy": ("Mean Acc.", True),
    "average_forgetting": ("Avg. Forgetting", False),
    "last_accuracy": ("Last Acc.", True),
    "learning_accuracy": ("LA", True),
    "average_accuracy": ("AA", True),
    "final_forgetting": ("F", False),
    "backward_transfer": ("BWT", True),
    "forward_transfer": ("FWT", True),
}
DEFAULT_METRICS = ("mean_accuracy", "average_forgetting")

# segmentation metric (matrix name) -> display name; the Max-F of CL-AVS (eq. 12) is F1,
# AVSBench's F-measure uses beta^2 = 0.3: the names keep them apart in every table
SEG_METRIC_NAMES: dict[str, str] = {
    "map": "mAP",
    "maxf1": "Max-F1",
    "fscore": "F-score (β²=0.3)",
    "miou": "mIoU",
    "dice": "Dice",
    "aupr": "AUPR",
}
# summaries computed from any per-metric matrix when metrics.json does not hold them
SEG_SUMMARIES: dict[str, object] = {
    "average_accuracy": M.average_accuracy,
    "final_forgetting": M.final_forgetting,
    "average_forgetting": M.average_forgetting,
    "learning_accuracy": M.learning_accuracy,
    "backward_transfer": M.backward_transfer,
    "forward_transfer": M.forward_transfer,
}
# CL-AVS Table 1: "Avg mAP" = AA (eq. 15) and "Avg For" = F (eq. 16) of the mAP matrix
DEFAULT_SEG_METRICS = ("map/average_accuracy", "map/final_forgetting")
# Table-2-style detail per protocol: every metric of record after the last task
SEG_DETAIL_METRICS = (
    "map/average_accuracy", "map/final_forgetting", "maxf1/average_accuracy",
    "fscore/average_accuracy", "miou/average_accuracy", "dice/average_accuracy",
    "map/learning_accuracy", "map/forward_transfer",
)


def metric_info(key: str) -> tuple[str, bool]:
    """``(column label, higher is better)`` of a table metric key: a key of
    :data:`METRICS`, or ``<segmentation metric>/<summary>`` (summary one of
    :data:`SEG_SUMMARIES`), e.g. ``map/average_accuracy`` -> ``("Avg mAP", True)``."""
    if key in METRICS:
        return METRICS[key]
    metric, _, summary = key.partition("/")
    if not metric or summary not in SEG_SUMMARIES:
        raise ReportError(
            f"unknown metric {key!r}; choose from {list(METRICS)} or <metric>/<summary> with summary in "
            f"{list(SEG_SUMMARIES)} (e.g. map/average_accuracy)"
        )
    name = SEG_METRIC_NAMES.get(metric, metric)
    higher = METRICS[summary][1]
    if summary == "average_accuracy":
        return f"Avg {name}", higher
    if summary == "final_forgetting":
        return ("Avg For" if metric == "map" else f"Avg For ({name})"), higher
    return f"{name} {METRICS[summary][0]}", higher


def _method_id(method: str) -> str:
    return method.strip().lower().replace("_", "-")


def display_name(method: str) -> str:
    """Paper name of a method id (``lll`` -> ``LLL``); unknown ids unchanged."""
    return METHOD_DISPLAY_NAMES.get(_method_id(method), method)


# -- loading --------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One training run: identity from ``config.json`` and its results."""

    path: Path
    method: str
    head: str
    protocol: str
    seed: int
    hparams: dict
    acc_matrix: np.ndarray  # (T, T) fractions, NaN where not measured
    step_acc: np.ndarray  # (T,) fractions
    metrics: dict  # metric key -> fraction (NaN when undefined)
    classes_per_task: tuple[int, ...] | None = None
    problem: str = "classification"  # or "segmentation"
    primary_metric: str | None = None  # the metric of acc_matrix (segmentation)
    matrices: dict = field(default_factory=dict)  # segmentation metric -> (T, T) matrix
    overlays: Path | None = None  # overlays.npz of a segmentation run, when written
    steps: dict = field(default_factory=dict)  # semantic: metric -> (T,) value after each step (NaN: undefined)

    @property
    def num_tasks(self) -> int:
        return self.acc_matrix.shape[0]

    @property
    def is_segmentation(self) -> bool:
        return self.problem == "segmentation"

    @property
    def is_semantic(self) -> bool:
        return self.problem == "semantic"


def discover_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories under ``paths``: each directory holding a ``metrics.json``.

    A path may be a run directory itself or any parent folder (searched
    recursively). Sorted, without duplicates.
    """
    found: set[Path] = set()
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"{p}: no such run directory or folder")
        if (p / "metrics.json").is_file():
            found.add(p.resolve())
            continue
        hits = [m.parent.resolve() for m in p.rglob("metrics.json") if m.is_file()]
        if not hits:
            raise ReportError(f"{p}: no run directories found (no metrics.json under it)")
        found.update(hits)
    return sorted(found)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ReportError(f"{path}: missing (every run directory needs config.json and metrics.json)")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _read_matrix(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ReportError(f"{path}: missing accuracy matrix")
    with path.open(newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if not rows:
        raise ReportError(f"{path}: empty file")
    header, body = rows[0], rows[1:]
    T = len(header) - 1
    expected = ["after_task"] + [f"task_{i}" for i in range(T)]
    if [h.strip() for h in header] != expected or T == 0:
        raise ReportError(f"{path}: header must be {','.join(expected) if T else 'after_task,task_0,...'}, got {','.join(header)}")
    if len(body) != T:
        raise ReportError(f"{path}: {len(body)} rows for {T} task columns; the matrix must be square")
    A = np.full((T, T), np.nan)
    for t, row in enumerate(body):
        if len(row) != T + 1 or row[0].strip() != str(t):
            raise ReportError(f"{path}: row {t + 1} must be '{t}' followed by {T} values, got {row}")
        for i, v in enumerate(row[1:]):
            v = v.strip()
            try:
                A[t, i] = float(v) if v else np.nan
            except ValueError as e:
                raise ReportError(f"{path}: A[{t}, {i}] = {v!r} is not a number") from e
    return A


def load_run(run_dir: str | Path) -> Run:
    """Read one run directory; errors name the file and key at fault."""
    d = Path(run_dir)
    cfg = _read_json(d / "config.json")
    met = _read_json(d / "metrics.json")
    for key in ("method", "protocol", "seed"):
        if key not in cfg:
            raise ReportError(f"{d / 'config.json'}: missing key {key!r}")
    proto = cfg["protocol"]
    cpt = cfg.get("classes_per_task")
    if isinstance(proto, dict):
        if "name" not in proto:
            raise ReportError(f"{d / 'config.json'}: protocol object has no 'name'")
        cpt = proto.get("classes_per_task", cpt)
        proto = proto["name"]
    problem = str(cfg.get("problem") or "classification")
    if problem not in ("classification", "segmentation", "semantic"):
        raise ReportError(f"{d / 'config.json'}: 'problem' must be classification, segmentation or semantic, "
                          f"got {problem!r}")
    seg = problem != "classification"
    A = _read_matrix(d / "acc_matrix.csv")
    T = A.shape[0]
    if "step_acc" not in met and seg and np.all(np.isfinite(A[np.tril_indices(T)])):
        # task-balanced score over the tasks seen, the segmentation analogue of step accuracy
        met = {**met, "step_acc": [float(np.mean(A[t, : t + 1])) for t in range(T)]}
    if "step_acc" not in met:
        raise ReportError(f"{d / 'metrics.json'}: missing key 'step_acc'")
    steps = np.asarray(met["step_acc"], dtype=np.float64)
    if steps.shape != (T,):
        raise ReportError(
            f"{d / 'metrics.json'}: 'step_acc' has {steps.size} values but acc_matrix.csv has {T} tasks"
        )
    try:
        computed = M.summarize(A, steps)
    except ValueError as e:
        raise ReportError(f"{d}: {e}") from e
    values = {}
    for key in METRICS:
        v = met.get(key)
        try:
            values[key] = float(v) if v is not None else computed[key]
        except (TypeError, ValueError) as e:
            raise ReportError(f"{d / 'metrics.json'}: {key!r} = {v!r} is not a number") from e
    if cpt is not None:
        cpt = (int(cpt),) * T if isinstance(cpt, (int, float)) else tuple(int(c) for c in cpt)
        if len(cpt) != T:
            raise ReportError(f"{d / 'config.json'}: classes_per_task lists {len(cpt)} tasks, the matrix {T}")
    hp = cfg.get("hparams") or {}
    if not isinstance(hp, dict):
        raise ReportError(f"{d / 'config.json'}: 'hparams' must be an object")
    primary, matrices, overlays, step_values = None, {}, None, {}
    if seg:
        primary, matrices = _segmentation_results(d, cfg, met, A, values)
        overlays = d / "overlays.npz" if (d / "overlays.npz").is_file() else None
    if problem == "semantic":
        step_values = _step_values(d, met, T)
    return Run(
        path=d,
        method=str(cfg["method"]),
        head=str(cfg.get("head") or ""),
        protocol=str(proto),
        seed=int(cfg["seed"]),
        hparams=hp,
        acc_matrix=A,
        step_acc=steps,
        metrics=values,
        classes_per_task=cpt,
        problem=problem,
        primary_metric=primary,
        matrices=matrices,
        overlays=overlays,
        steps=step_values,
    )


def _step_values(d: Path, met: dict, T: int) -> dict[str, np.ndarray]:
    """``per_metric[m]['step']`` of a semantic run's ``metrics.json``: metric -> (T,) (null -> NaN)."""
    out = {}
    for m, v in (met.get("per_metric") or {}).items():
        step = v.get("step") if isinstance(v, dict) else None
        if step is None:
            continue
        try:
            arr = np.array([np.nan if x is None else float(x) for x in step])
        except (TypeError, ValueError) as e:
            raise ReportError(f"{d / 'metrics.json'}: per_metric[{m!r}]['step'] holds a non-number") from e
        if arr.shape != (T,):
            raise ReportError(f"{d / 'metrics.json'}: per_metric[{m!r}]['step'] has {arr.size} values, "
                              f"acc_matrix.csv {T} tasks")
        out[m] = arr
    return out


def _segmentation_results(d: Path, cfg: dict, met: dict, A: np.ndarray, values: dict):
    """Per-metric matrices of a segmentation run and their summaries, added to ``values``
    as ``<metric>/<summary>``; returns ``(primary metric, {metric: matrix})``."""
    primary = str(cfg.get("primary_metric") or met.get("primary_metric") or "map")
    T = A.shape[0]
    matrices = {primary: A}
    mdir = d / "matrices"
    if mdir.is_dir():
        for f in sorted(mdir.glob("*.csv")):
            B = _read_matrix(f)
            if B.shape != A.shape:
                raise ReportError(f"{f}: {B.shape[0]} tasks, but acc_matrix.csv has {T}")
            matrices[f.stem] = B
    per_metric = met.get("per_metric") or {}
    if not isinstance(per_metric, dict):
        raise ReportError(f"{d / 'metrics.json'}: 'per_metric' must be an object")
    for name, B in matrices.items():
        stored = per_metric.get(name) or {}
        if not isinstance(stored, dict):
            raise ReportError(f"{d / 'metrics.json'}: per_metric[{name!r}] must be an object")
        for summary, fn in SEG_SUMMARIES.items():
            v = stored.get(summary)
            if v is not None:
                try:
                    values[f"{name}/{summary}"] = float(v)
                except (TypeError, ValueError) as e:
                    raise ReportError(
                        f"{d / 'metrics.json'}: per_metric[{name!r}][{summary!r}] = {v!r} is not a number"
                    ) from e
                continue
            try:
                values[f"{name}/{summary}"] = float(fn(B))
            except ValueError:
                # e.g. a metric undefined on some task (NaN entries), or no forward entries
                values[f"{name}/{summary}"] = math.nan
    return primary, matrices


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    """:func:`discover_runs` then :func:`load_run` on each."""
    return [load_run(p) for p in discover_runs(paths)]


# -- grouping -------------------------------------------------------------------
def _canon(v) -> str:
    return json.dumps(v, sort_keys=True)


def _row_labels(runs: Sequence[Run]) -> list[str]:
    """Table row label of each run (see the module docstring)."""
    many_heads = len({r.head for r in runs}) > 1
    # hyper-parameters whose values differ between runs of one (method, head, protocol)
    varying: dict[tuple[str, str], set[str]] = {}
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((_method_id(r.method), r.head, r.protocol), []).append(r)
    for (mid, head, _), group in groups.items():
        keys = set().union(*(g.hparams for g in group))
        diff = {k for k in keys if len({_canon(g.hparams.get(k)) for g in group}) > 1}
        varying.setdefault((mid, head), set()).update(diff)
    labels = []
    for r in runs:
        parts = [r.head] if many_heads and r.head else []
        for k in sorted(varying[(_method_id(r.method), r.head)]):
            v = r.hparams.get(k)
            parts.append(f"{k}={v if isinstance(v, (str, int, float)) else _canon(v)}")
        name = display_name(r.method)
        labels.append(f"{name} ({', '.join(parts)})" if parts else name)
    return labels


def _is_upper_bound(method: str) -> bool:
    return display_name(method) == "Upper bound (joint)"


def _row_sort_key(label: str, method: str):
    name = display_name(method)
    known = list(dict.fromkeys(METHOD_DISPLAY_NAMES.values()))
    if name in _LAST:
        rank = len(known) + 1 + _LAST.index(name)
    elif name in known:
        rank = known.index(name)
    else:
        rank = len(known)
    return (rank, label)


# -- the table ------------------------------------------------------------------
@dataclass
class Cell:
    """One table cell: a metric of one method on one protocol, over seeds (in %)."""

    values: dict[int, float]  # seed -> value in percent
    mean: float
    std: float  # sample std (ddof = 1); NaN with one seed
    is_best: bool = False
    p_value: float | None = None  # vs the column's best method; None for the best itself

    @property
    def n(self) -> int:
        return len(self.values)


@dataclass
class Table:
    """Rows = method labels, columns = (protocol, metric key)."""

    rows: list[str]
    columns: list[tuple[str, str]]
    cells: dict[tuple[str, tuple[str, str]], Cell]
    best: dict[tuple[str, str], str]  # column -> the method the p-values compare against
    runs_per_row: dict[str, list[Run]] = field(default_factory=dict)


def group_rows(runs: Sequence[Run]) -> tuple[list[str], dict[str, list[Run]]]:
    """(row labels in table order, label -> its runs); two runs of one row, protocol and seed are an error."""
    if not runs:
        raise ReportError("no runs to report")
    labels = _row_labels(runs)
    seen: dict[tuple[str, str, int], Path] = {}
    per_row: dict[str, list[Run]] = {}
    for lab, r in zip(labels, runs):
        key = (lab, r.protocol, r.seed)
        if key in seen:
            raise ReportError(
                f"two runs of {lab!r} on {r.protocol!r} with seed {r.seed}: {seen[key]} and {r.path}; "
                "remove one or report them separately"
            )
        seen[key] = r.path
        per_row.setdefault(lab, []).append(r)
    return sorted(per_row, key=lambda lab: _row_sort_key(lab, per_row[lab][0].method)), per_row


def build_table(runs: Sequence[Run], metrics: Sequence[str] = DEFAULT_METRICS) -> Table:
    """Aggregate runs into a :class:`Table`.

    Cell = mean ± sample std (ddof = 1) over seeds, in percent. The best cell
    of a column has the highest mean (lowest for forgetting metrics); every
    cell equal to it at two decimals is marked best. ``p_value`` is the
    two-sided paired t-test (``scipy.stats.ttest_rel``, runs paired by seed,
    seeds present in both rows) against the column's best row (the first in row
    order among ties); NaN when fewer than two seeds are shared or the paired
    differences are constant. The joint-training upper bound is never the best
    (unless it is the only method); its p-value is against the best method too.
    """
    for m in metrics:
        metric_info(m)
    rows, per_row = group_rows(runs)
    protocols = sorted({r.protocol for r in runs})
    columns = [(p, m) for p in protocols for m in metrics]
    cells: dict = {}
    best: dict = {}
    for col in columns:
        proto, metric = col
        _fill_column(cells, best, col, rows, per_row, lambda r, m=metric: r.metrics.get(m, math.nan),
                     metric_info(metric)[1])
    return Table(rows=rows, columns=columns, cells=cells, best=best, runs_per_row=per_row)


def _fill_column(cells: dict, best: dict, col: tuple[str, str], rows: Sequence[str], per_row: dict,
                 value, higher: bool) -> None:
    """Cells of column ``col = (protocol, key)``: per row, ``value(run)`` (a fraction, NaN when
    undefined) of its runs on that protocol as a :class:`Cell` in %; marks the best row and the
    paired t-test p-values against it (see :func:`build_table`)."""
    proto = col[0]
    for lab in rows:
        vals = {r.seed: 100.0 * value(r) for r in per_row[lab] if r.protocol == proto}
        vals = {s: v for s, v in sorted(vals.items()) if math.isfinite(v)}
        if not vals:
            continue
        arr = np.array(list(vals.values()))
        std = float(arr.std(ddof=1)) if arr.size > 1 else float("nan")
        cells[(lab, col)] = Cell(values=vals, mean=float(arr.mean()), std=std)
    present = [lab for lab in rows if (lab, col) in cells]
    if not present:
        return
    # the joint-training upper bound is a reference, not a competitor
    contenders = [lab for lab in present if not _is_upper_bound(per_row[lab][0].method)] or present
    means = [cells[(lab, col)].mean for lab in contenders]
    b = contenders[int(np.argmax(means) if higher else np.argmin(means))]
    best[col] = b
    ref = cells[(b, col)]
    for lab in present:
        c = cells[(lab, col)]
        c.is_best = lab in contenders and round(c.mean, 2) == round(ref.mean, 2)
        if lab == b:
            continue
        shared = sorted(set(c.values) & set(ref.values))
        if len(shared) < 2:
            c.p_value = float("nan")
            continue
        x = np.array([c.values[s] for s in shared])
        y = np.array([ref.values[s] for s in shared])
        c.p_value = float(stats.ttest_rel(x, y).pvalue) if np.ptp(x - y) > 0 else float("nan")


def _fmt_cell(c: Cell | None) -> str:
    if c is None:
        return "–"
    text = f"{c.mean:.2f}" if c.n < 2 else f"{c.mean:.2f} ± {c.std:.2f}"
    if c.is_best:
        text = f"**{text}**"
    if c.p_value is not None:
        p = c.p_value
        text += " (p n/a)" if not math.isfinite(p) else (" (p<0.001)" if p < 0.001 else f" (p={p:.3f})")
    return text


def _column_title(col: tuple[str, str]) -> str:
    label, higher = metric_info(col[1])
    return f"{col[0]} {label} {'↑' if higher else '↓'}"


def table_caption(table: Table) -> str:
    """The sentence that says how to read the table."""
    ns = sorted({c.n for c in table.cells.values()})
    seeds = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
    return (
        f"Mean ± sample standard deviation (ddof = 1) over {seeds} seeds, in %. "
        "↑ higher is better, ↓ lower is better; **bold**: best mean in the column. "
        "p: two-sided paired t-test (scipy.stats.ttest_rel, runs paired by seed) of each method "
        "against the best method of that column (n/a: fewer than two shared seeds or constant differences)."
        + (" The joint-training upper bound is a reference and is never marked best."
           if any(_is_upper_bound(rs[0].method) for rs in table.runs_per_row.values()) else "")
    )


def table_markdown(table: Table) -> str:
    """Markdown table (one row per method, one column per protocol x metric) and caption."""
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = [
        "| Method | " + " | ".join(esc(_column_title(c)) for c in table.columns) + " |",
        "|---|" + "---:|" * len(table.columns),
    ]
    for lab in table.rows:
        cells = [_fmt_cell(table.cells.get((lab, col))) for col in table.columns]
        lines.append(f"| {esc(lab)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + table_caption(table) + "\n"


def write_table_csv(table: Table, path: str | Path) -> Path:
    """Wide CSV: ``method``, ``method_id``, ``head``, then per column
    ``<protocol>/<metric>/{mean,std,n,p_vs_best,is_best}`` (values in %, full precision)."""
    path = Path(path)
    header = ["method", "method_id", "head"]
    for proto, metric in table.columns:
        header += [f"{proto}/{metric}/{k}" for k in ("mean", "std", "n", "p_vs_best", "is_best")]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for lab in table.rows:
            first = table.runs_per_row[lab][0]
            row = [lab, first.method, first.head]
            for col in table.columns:
                c = table.cells.get((lab, col))
                if c is None:
                    row += [""] * 5
                    continue
                p = "" if c.p_value is None else repr(c.p_value)
                row += [repr(c.mean), repr(c.std), c.n, p, int(c.is_best)]
            w.writerow(row)
    return path


# -- plots ----------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "protocol"


def _colors(table: Table) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {lab: cmap(i % 10) for i, lab in enumerate(table.rows)}


def _protocol_runs(table: Table, proto: str) -> dict[str, list[Run]]:
    out = {}
    for lab in table.rows:
        rs = [r for r in table.runs_per_row[lab] if r.protocol == proto]
        if rs:
            shapes = {r.num_tasks for r in rs}
            if len(shapes) > 1:
                paths = ", ".join(str(r.path) for r in rs)
                raise ReportError(f"{lab!r} on {proto!r}: runs disagree on the number of tasks ({paths})")
            out[lab] = rs
    return out


def _protocols(table: Table) -> list[str]:
    return list(dict.fromkeys(p for p, _ in table.columns))


def _save(fig: Figure, out_dir: Path, stem: str, proto: str) -> Path:
    """Write ``fig`` as ``<out_dir>/<stem>_<protocol>.png`` (150 dpi)."""
    path = out_dir / f"{stem}_{_slug(proto)}.png"
    fig.savefig(path, dpi=150)
    return path


def plot_accuracy_curves(table: Table, out_dir: str | Path, score: str = "Accuracy on all seen classes",
                         stem: str = "accuracy_curves") -> list[Path]:
    """Per protocol: step accuracy (%) after each task, mean ± std band over seeds.

    ``score`` names the y axis (segmentation runs: the primary metric over the
    tasks seen), ``stem`` the file name's start."""
    out_dir, files, colors = Path(out_dir), [], _colors(table)
    for proto in _protocols(table):
        groups = _protocol_runs(table, proto)
        fig = Figure(figsize=(6.4, 4.4), layout="constrained")
        ax = fig.add_subplot()
        xlabels = None
        for lab, rs in groups.items():
            acc = 100.0 * np.stack([r.step_acc for r in rs])
            mean = acc.mean(axis=0)
            x = np.arange(1, acc.shape[1] + 1)
            ax.plot(x, mean, marker="o", color=colors[lab], label=f"{lab} (n={len(rs)})")
            if len(rs) > 1:
                sd = acc.std(axis=0, ddof=1)
                ax.fill_between(x, mean - sd, mean + sd, color=colors[lab], alpha=0.2, linewidth=0)
            cpt = rs[0].classes_per_task
            if cpt is not None and xlabels is None:
                xlabels = (x, [str(v) for v in np.cumsum(cpt)])
        if xlabels is not None:
            ax.set_xticks(xlabels[0], xlabels[1])
            ax.set_xlabel("Number of classes seen")
        else:
            T = max(r.num_tasks for rs in groups.values() for r in rs)
            ax.set_xticks(np.arange(1, T + 1))
            ax.set_xlabel("Incremental step (tasks learned)")
        ax.set_ylabel(f"{score} (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.set_title(f"{score.split(' on ')[0]} after each step — {proto}\n(mean ± std over seeds)")
        ax.legend(fontsize="small", loc="best")
        files.append(_save(fig, out_dir, stem, proto))
    return files


def plot_accuracy_matrices(table: Table, out_dir: str | Path) -> list[Path]:
    """Per protocol: heatmap of the mean accuracy matrix (%) of each method, one panel each."""
    return _matrix_panels(table, out_dir, lambda r: r.acc_matrix, "acc_matrices", "Accuracy (%)",
                          "Accuracy matrices", lower_only=True)


def _matrix_panels(table: Table, out_dir: str | Path, matrix_of, stem: str, label: str, title: str,
                   lower_only: bool) -> list[Path]:
    """Per protocol, one heatmap panel per method of the mean over seeds of ``matrix_of(run)``
    (fractions, shown in %). ``lower_only`` hides entries ``i > t``; otherwise every
    finite entry is drawn (e.g. the next task's score, before training on it)."""
    from matplotlib import colormaps

    out_dir, files = Path(out_dir), []
    cmap = colormaps["viridis"].with_extremes(bad="white")
    for proto in _protocols(table):
        groups = {lab: [r for r in rs if matrix_of(r) is not None]
                  for lab, rs in _protocol_runs(table, proto).items()}
        groups = {lab: rs for lab, rs in groups.items() if rs}
        if not groups:
            continue
        n = len(groups)
        ncols = min(n, 4)
        nrows = math.ceil(n / ncols)
        T = max(rs[0].num_tasks for rs in groups.values())
        # capped: a 50-task stream would otherwise give a panel over 20 inches wide
        side = max(3.2, min(0.45 * T + 1.6, 8.5))
        fig = Figure(figsize=(side * ncols + 1.2, side * nrows + 0.8), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
        image = None
        for ax, (lab, rs) in zip(axes.flat, groups.items()):
            # lower triangles are finite (checked on load); unmeasured upper entries stay NaN
            A = 100.0 * np.mean(np.stack([matrix_of(r) for r in rs]), axis=0)
            hidden = ~np.isfinite(A)
            if lower_only:
                hidden |= np.triu(np.ones_like(A, dtype=bool), 1)
            shown = np.ma.masked_where(hidden, A)
            image = ax.imshow(shown, cmap=cmap, vmin=0, vmax=100)
            if T <= 15:
                fmt = "{:.1f}" if T <= 6 else "{:.0f}"
                for t in range(T):
                    for i in range(T):
                        v = shown[t, i]
                        if v is np.ma.masked:
                            continue
                        ax.text(i, t, fmt.format(v), ha="center", va="center", fontsize=8 if T <= 8 else 6,
                                color="black" if v > 60 else "white")
            ticks = range(T) if T <= 15 else range(0, T, max(1, T // 10))
            ax.set_xticks(list(ticks), [str(i + 1) for i in ticks])
            ax.set_yticks(list(ticks), [str(t + 1) for t in ticks])
            ax.set_xlabel("Evaluated on task")
            ax.set_ylabel("After training task")
            ax.set_title(f"{lab} (n={len(rs)})", fontsize="medium")
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        fig.colorbar(image, ax=axes, label=label, shrink=0.8)
        # one narrow panel cannot hold the title on one line
        fig.suptitle(f"{title} — {proto}{chr(10) if n == 1 else ' '}(mean over seeds)")
        files.append(_save(fig, out_dir, stem, proto))
    return files


def plot_transfer_vs_forgetting(table: Table, out_dir: str | Path) -> list[Path]:
    """Per protocol: forward transfer vs. average forgetting (%), one point per method.

    Error bars are the sample std over seeds. In class-incremental runs forward
    transfer is 0 by construction (a task's classes cannot be predicted before
    they are seen); when it is the same for every method, the y axis shows
    learning accuracy (LA, accuracy on each task right after learning it — the
    plasticity side of the trade-off) instead, and the title says so. A protocol
    where no method has both values finite (e.g. single-task runs) gets no plot.
    """
    out_dir, files, colors = Path(out_dir), [], _colors(table)
    for proto in _protocols(table):
        groups = _protocol_runs(table, proto)
        fwt = [100.0 * r.metrics["forward_transfer"] for rs in groups.values() for r in rs]
        fwt = np.array([v for v in fwt if np.isfinite(v)])
        degenerate = fwt.size == 0 or np.ptp(fwt) < 1e-9
        y_key, y_name = ("learning_accuracy", "Learning accuracy") if degenerate else \
            ("forward_transfer", "Forward transfer")
        fig = Figure(figsize=(6.4, 4.8), layout="constrained")
        ax = fig.add_subplot()
        if not _method_points(ax, groups, colors, "average_forgetting", y_key):
            continue
        ax.set_xlabel("Average forgetting (%)  ← better")
        ax.set_ylabel(f"{y_name} (%)  better →")
        ax.grid(alpha=0.3)
        note = "\n(forward transfer is 0 for every method here)" if degenerate and fwt.size else ""
        ax.set_title(f"{y_name} vs. forgetting — {proto}\n(mean ± std over seeds){note}")
        ax.legend(fontsize="small", loc="best")
        files.append(_save(fig, out_dir, "transfer_vs_forgetting", proto))
    return files


def _method_points(ax, groups: dict[str, list[Run]], colors: dict, x_key: str, y_key: str) -> int:
    """One point per method at the mean over seeds of two metrics (%), sample-std error
    bars; returns how many methods had both values finite."""
    plotted = 0
    for lab, rs in groups.items():
        f = np.array([100.0 * r.metrics.get(x_key, math.nan) for r in rs])
        w = np.array([100.0 * r.metrics.get(y_key, math.nan) for r in rs])
        ok = np.isfinite(f) & np.isfinite(w)
        if not ok.any():
            continue
        f, w = f[ok], w[ok]
        xerr = f.std(ddof=1) if f.size > 1 else 0.0
        yerr = w.std(ddof=1) if w.size > 1 else 0.0
        ax.errorbar(f.mean(), w.mean(), xerr=xerr, yerr=yerr, fmt="o", capsize=4, markersize=7,
                    color=colors[lab], label=f"{lab} (n={f.size})")
        plotted += 1
    return plotted


# -- segmentation figures ------------------------------------------------------------
def _primary(table: Table) -> str:
    metrics = {r.primary_metric for rs in table.runs_per_row.values() for r in rs if r.primary_metric}
    return sorted(metrics)[0] if len(metrics) == 1 else "map"


def plot_seg_transfer_vs_forgetting(table: Table, out_dir: str | Path) -> list[Path]:
    """Per protocol (CL-AVS Fig. 4): forward transfer FWT (eq. 18) vs. forgetting F
    (eq. 16) of the primary metric (mAP), in %, one point per method, sample-std error
    bars over seeds. FWT is the score on each task just before training on it; with
    binary masks it is not 0 by construction. No plot where no method has both."""
    out_dir, files, colors = Path(out_dir), [], _colors(table)
    metric = _primary(table)
    name = SEG_METRIC_NAMES.get(metric, metric)
    for proto in _protocols(table):
        groups = _protocol_runs(table, proto)
        fig = Figure(figsize=(6.4, 4.8), layout="constrained")
        ax = fig.add_subplot()
        if not _method_points(ax, groups, colors, f"{metric}/final_forgetting", f"{metric}/forward_transfer"):
            continue
        ax.set_xlabel(f"Forgetting F of {name} (%)  ← better")
        ax.set_ylabel(f"Forward transfer FWT of {name} (%)  better →")
        ax.grid(alpha=0.3)
        ax.set_title(f"Forward transfer vs. forgetting — {proto}\n(mean ± std over seeds)")
        ax.legend(fontsize="small", loc="best")
        files.append(_save(fig, out_dir, "transfer_vs_forgetting", proto))
    return files


def plot_maxf_heatmaps(table: Table, out_dir: str | Path) -> list[Path]:
    """Per protocol (CL-AVS Fig. 5): heatmap of the mean Max-F matrix ``A[t, k]`` of each
    method, Max-F on task ``k`` after training task ``t`` (%), every measured entry
    shown (the next task's, before training on it, included). Max-F1 (β = 1, the
    paper's eq. 12) from ``matrices/maxf1.csv``; runs without it fall back to
    AVSBench's F-score (β² = 0.3, ``fscore``), and the title names the one shown."""
    runs = [r for rs in table.runs_per_row.values() for r in rs]
    metric = "maxf1" if any("maxf1" in r.matrices for r in runs) else "fscore"
    if not any(metric in r.matrices for r in runs):
        return []
    name = SEG_METRIC_NAMES[metric]
    return _matrix_panels(table, out_dir, lambda r: r.matrices.get(metric), "maxf_heatmaps",
                          f"{name} (%)", f"{name} after each task", lower_only=False)


def _load_overlays(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: not a readable .npz file ({e})") from e
    for key in ("sample_id", "frame", "prob", "gt"):
        if key not in data:
            raise ReportError(f"{path}: missing array {key!r} (needs sample_id, frame, prob, gt)")
    K = data["sample_id"].shape[0]
    shapes = {k: data[k].shape for k in ("frame", "prob", "gt")}
    if shapes["frame"] != (K,) or data["prob"].ndim != 3 or data["prob"].shape[0] != K \
            or shapes["gt"] != data["prob"].shape:
        raise ReportError(f"{path}: expected sample_id (K,), frame (K,), prob and gt (K, H, W); got "
                          f"{data['sample_id'].shape}, {shapes['frame']}, {shapes['prob']}, {shapes['gt']}")
    if "image" in data and data["image"].shape != data["prob"].shape + (3,):
        raise ReportError(f"{path}: image must be (K, H, W, 3) like prob {data['prob'].shape}, "
                          f"got {data['image'].shape}")
    return data


def _overlay_rgb(base: np.ndarray | None, weight: np.ndarray, color) -> np.ndarray:
    """RGB float image: ``base`` (H, W, 3) uint8 (grey when None) blended towards
    ``color`` by ``weight`` (H, W) in [0, 1] per pixel."""
    h, w = weight.shape
    img = np.full((h, w, 3), 0.35) if base is None else base.astype(np.float64) / 255.0
    a = np.clip(weight, 0.0, 1.0)[..., None]
    return np.clip((1 - a) * img + a * np.asarray(color[:3], dtype=np.float64), 0.0, 1.0)


def plot_mask_overlays(table: Table, out_dir: str | Path, max_frames: int = 4) -> list[Path]:
    """Per protocol (CL-AVS Fig. 3): the same test frames for every method.

    Row 1 is the ground truth; below, one row per method: its foreground
    probability tints the frame red (opacity 0.7 x prob), the predicted mask
    (``prob > 0.5``, the decision of the IoU printed below) is outlined in red
    and the ground truth in green. Frames: those present in every method's ``overlays.npz`` (the run of
    the lowest seed), in the first method's order, at most ``max_frames``
    (when no frame is shared, each method's own first frames). The frame image
    is drawn when the file has ``image``, otherwise a grey background.
    """
    out_dir, files = Path(out_dir), []
    for proto in _protocols(table):
        shown = {}
        for lab, rs in _protocol_runs(table, proto).items():
            with_ov = sorted((r for r in rs if r.overlays is not None), key=lambda r: r.seed)
            if with_ov:
                shown[lab] = (with_ov[0], _load_overlays(with_ov[0].overlays))
        if not shown:
            continue
        keys = {lab: [(str(s), int(f)) for s, f in zip(d["sample_id"], d["frame"])] for lab, (_, d) in shown.items()}
        first = next(iter(keys.values()))
        common = [k for k in first if all(k in ks for ks in keys.values())][:max_frames]
        n_cols = len(common) or min(max_frames, min(len(ks) for ks in keys.values()))
        if n_cols == 0:
            continue
        rows = len(shown) + 1
        fig = Figure(figsize=(2.3 * n_cols + 1.6, 2.3 * rows + 0.6), layout="constrained")
        axes = fig.subplots(rows, n_cols, squeeze=False)
        ref_lab = next(iter(shown))
        for c in range(n_cols):
            key = common[c] if common else keys[ref_lab][c]
            _, d = shown[ref_lab]
            j = keys[ref_lab].index(key)
            gt = d["gt"][j] != 0
            image = d["image"][j] if "image" in d else None
            ax = axes[0, c]
            ax.imshow(_overlay_rgb(image, 0.6 * gt, (0.1, 0.9, 0.2)), interpolation="nearest")
            ax.set_title(f"{key[0]}\nframe {key[1]}", fontsize="small")
            for r, (lab, (run, d)) in enumerate(shown.items(), start=1):
                ax = axes[r, c]
                ax.set_xticks([]), ax.set_yticks([])
                k = key if common else (keys[lab][c] if c < len(keys[lab]) else None)
                if k is None:
                    ax.set_visible(False)
                    continue
                j = keys[lab].index(k)
                prob = np.asarray(d["prob"][j], dtype=np.float64)
                g = d["gt"][j] != 0
                img = d["image"][j] if "image" in d else None
                ax.imshow(_overlay_rgb(img, 0.7 * prob, (0.95, 0.15, 0.15)), interpolation="nearest")
                for m, col in ((prob > 0.5, (1.0, 0.1, 0.1)), (g, (0.1, 0.9, 0.2))):
                    if m.any() and not m.all():
                        ax.contour(m.astype(float), levels=[0.5], colors=[col], linewidths=1.2)
                inter, union = np.sum((prob > 0.5) & g), np.sum((prob > 0.5) | g)
                ax.set_xlabel(f"IoU {inter / union:.2f}" if union else "IoU –", fontsize="small")
                if c == 0:
                    ax.set_ylabel(f"{lab}\n(seed {run.seed})", fontsize="small")
            axes[0, c].set_xticks([]), axes[0, c].set_yticks([])
            if c == 0:
                axes[0, 0].set_ylabel("Ground truth", fontsize="small")
        fig.suptitle(f"Predicted foreground probability (red; outline: > 0.5) and ground truth (green) — {proto}")
        files.append(_save(fig, out_dir, "mask_overlays", proto))
    return files


# -- everything at once ------------------------------------------------------------
@dataclass
class Report:
    table: Table  # the classification table; the segmentation one when there is no classification run
    markdown: str  # everything written to the Markdown file(s), in order
    table_md: Path
    table_csv: Path
    plots: list[Path]
    seg_table: Table | None = None
    files: list[Path] = field(default_factory=list)  # every table file written


def seg_table_notes(metric_keys: Sequence[str]) -> str:
    """How to read the segmentation columns (which summary, which F)."""
    notes = []
    keys = set(metric_keys)
    if any(k.endswith("/average_accuracy") for k in keys):
        notes.append("Avg mAP (Avg Max-F1, ...) = AA (CL-AVS eq. 15): the metric on every task after the "
                     "last task, averaged over tasks")
    if any(k.endswith("/final_forgetting") for k in keys):
        notes.append("Avg For = F (eq. 16): best minus final score of each old task, averaged (mAP unless named)")
    if any(k.startswith("maxf1/") for k in keys):
        notes.append("Max-F1 is the CL-AVS Max-F with β = 1 (eq. 12)")
    if any(k.startswith("fscore/") for k in keys):
        notes.append("F-score (β²=0.3) is AVSBench's F-measure")
    return ("Segmentation: " + "; ".join(notes) + ".\n") if notes else ""


def _segmentation_report(runs: list[Run], out: Path, metrics: Sequence[str], prefix: str, draw: bool):
    """Tables and figures of segmentation runs; returns (table, markdown, md, csv, files, plots)."""
    table = build_table(runs, metrics)
    parts = [table_markdown(table) + seg_table_notes(metrics)]
    for proto in sorted({r.protocol for r in runs}):
        detail = build_table([r for r in runs if r.protocol == proto], SEG_DETAIL_METRICS)
        parts.append(f"### {proto}: every metric after the last task\n\n" + table_markdown(detail))
    parts[-1] += seg_table_notes(SEG_DETAIL_METRICS)
    md = "\n".join(parts)
    md_path = out / f"{prefix}table.md"
    md_path.write_text(md)
    csv_path = write_table_csv(table, out / f"{prefix}table.csv")
    detail_csv = write_table_csv(build_table(runs, SEG_DETAIL_METRICS), out / f"{prefix}table_detail.csv")
    name = SEG_METRIC_NAMES.get(_primary(table), _primary(table))
    if not draw:
        return table, md, md_path, csv_path, [md_path, csv_path, detail_csv], []
    plots = (
        plot_accuracy_curves(table, out, score=f"{name} on the tasks seen", stem="score_curves")
        + _matrix_panels(table, out, lambda r: r.acc_matrix, "score_matrices", f"{name} (%)",
                         f"{name} after each task", lower_only=False)
        + plot_maxf_heatmaps(table, out)
        + plot_seg_transfer_vs_forgetting(table, out)
        + plot_mask_overlays(table, out)
    )
    return table, md, md_path, csv_path, [md_path, csv_path, detail_csv], plots


def make_report(
    paths: Iterable[str | Path],
    out_dir: str | Path,
    metrics: Sequence[str] = DEFAULT_METRICS,
    seg_metrics: Sequence[str] = DEFAULT_SEG_METRICS,
    plots: bool = True,
) -> Report:
    """Load the runs under ``paths`` and write tables and PNG plots to ``out_dir``.

    Classification runs: ``table.md``, ``table.csv`` (columns ``metrics``) and
    the plots accuracy curves, accuracy matrices, transfer vs. forgetting.
    Segmentation runs (``seg_`` before the table names when classification runs
    are reported too): ``table.md`` with the CL-AVS Table-1-style table
    (columns ``seg_metrics``, default Avg mAP and Avg For per protocol) and one
    detail table per protocol (:data:`SEG_DETAIL_METRICS`), ``table.csv``,
    ``table_detail.csv``; figures ``score_curves_*`` (primary metric over the
    tasks seen), ``score_matrices_*`` (its matrices), ``maxf_heatmaps_*``
    (Fig. 5), ``transfer_vs_forgetting_*`` (Fig. 4) and ``mask_overlays_*``
    (Fig. 3, from ``overlays.npz``). Semantic segmentation runs: seed 003's table
    of base / new / all mIoU after each step, all-class mIoU curves and per-class
    IoU heatmaps (:mod:`train.report_semantic`; ``semantic_`` before the table
    names when other runs are reported too). ``plots=False`` writes the tables only.
    """
    runs = load_runs(paths)
    cls = [r for r in runs if r.problem == "classification"]
    seg = [r for r in runs if r.is_segmentation]
    sem = [r for r in runs if r.is_semantic]
    out = Path(out_dir)
    for m in list(metrics) + list(seg_metrics):
        metric_info(m)
    out.mkdir(parents=True, exist_ok=True)
    draw = plots
    table = md = md_path = csv_path = None
    plots: list[Path] = []
    files: list[Path] = []
    if cls:
        table = build_table(cls, metrics)
        md = table_markdown(table)
        md_path = out / "table.md"
        md_path.write_text(md)
        csv_path = write_table_csv(table, out / "table.csv")
        files += [md_path, csv_path]
        if draw:
            plots = (
                plot_accuracy_curves(table, out)
                + plot_accuracy_matrices(table, out)
                + plot_transfer_vs_forgetting(table, out)
            )
    seg_table = None
    sections = []  # (heading, table, markdown, md path, csv path, files, plots)
    if seg:
        seg_table, *rest = _segmentation_report(seg, out, seg_metrics, "seg_" if cls else "", draw)
        sections.append(("Segmentation", seg_table, *rest))
    if sem:
        from train.report_semantic import semantic_report

        sections.append(("Semantic segmentation", *semantic_report(sem, out, "semantic_" if cls or seg else "", draw)))
    for heading, p_table, p_md, p_md_path, p_csv, p_files, p_plots in sections:
        files += p_files
        plots += p_plots
        if table is None:
            table, md, md_path, csv_path = p_table, p_md, p_md_path, p_csv
        else:
            md = md + f"\n## {heading}\n\n" + p_md
    return Report(table=table, markdown=md, table_md=md_path, table_csv=csv_path, plots=plots,
                  seg_table=seg_table, files=files)
