"""The papers' published numbers (``manifests/published/*.json``) beside ours.

A published file (format ``avcl-published/1``) holds ``source`` (paper, seed
file), ``notes`` and ``tables``; a table has ``table`` (its number in the
paper), ``setting``, ``metrics`` ({key: column title}), optional ``ours``
({key: our metrics.json key}, identity by default), ``paper_settings`` and
``rows``. A row names ``label`` (the paper's), ``method`` (ours, or null when
not implemented), ``protocol`` (a shipped protocol name), optional ``head`` or
``modality`` (``audio`` | ``visual`` | ``audio-visual``) and one value per metric
key, in percent as printed in the paper.

Our runs are run directories (``config.json`` + ``metrics.json``). A run matches
a row when method and protocol are equal and its head is the row's ``head``
(rows with a head) or its modality is the row's (``audio`` / ``visual`` heads and
``cign``'s ``head.modality`` are single-modality, every other head
audio-visual). Ours = mean ± std over the matching runs' seeds, in percent.

"Paper settings": ``paper_settings[method]`` (else ``paper_settings['*']``) lists
the ``presets`` (null = the method's defaults, which are its paper's) and,
optionally, the ``encoders`` the paper used; a run counts as run with the
paper's settings when its preset is listed, it has no ``--set`` override and no
``--epochs`` override, and every store it read was made by a listed encoder.
Where some matching runs used the paper's settings, only those are averaged.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

log = logging.getLogger("avcl.train")

PUBLISHED_DIR = Path(__file__).resolve().parents[1] / "manifests" / "published"
FORMAT = "avcl-published/1"


class PublishedError(ValueError):
    """A malformed published-numbers file; the message names it."""


def load_published(directory: str | Path | None = None) -> list[dict]:
    """Every published file of ``directory`` (default: the shipped ``manifests/published``), sorted by name."""
    d = Path(directory) if directory is not None else PUBLISHED_DIR
    out = []
    for path in sorted(d.glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise PublishedError(f"{path}: not valid JSON ({e})") from None
        if doc.get("format") != FORMAT:
            raise PublishedError(f"{path}: format {doc.get('format')!r}, expected {FORMAT!r}")
        for t in doc.get("tables", []):
            for key in ("table", "metrics", "rows"):
                if key not in t:
                    raise PublishedError(f"{path}: a table lacks {key!r}")
            for r in t["rows"]:
                if "label" not in r or "protocol" not in r:
                    raise PublishedError(f"{path}: {t['table']}: row {r} lacks 'label' or 'protocol'")
        doc["_path"] = str(path)
        out.append(doc)
    return out


@dataclass
class OurRun:
    """What the comparison needs of one run directory."""

    path: str
    method: str
    protocol: str
    head: str
    modality: str
    preset: str | None
    overridden: bool
    encoders: list[str]
    metrics: dict = field(default_factory=dict)


def run_modality(head: str, head_config: dict) -> str:
    if head in ("audio", "visual"):
        return head
    mod = (head_config or {}).get("modality")
    if mod in ("audio", "visual"):
        return mod
    return "audio-visual"


def find_runs(paths: Iterable[str | Path]) -> list[OurRun]:
    """Run directories (a ``metrics.json`` next to a ``config.json``) under ``paths``; unreadable ones are skipped with a warning."""
    runs = []
    for root in paths:
        root = Path(root)
        for met in sorted([root / "metrics.json"] if (root / "metrics.json").is_file() else root.rglob("metrics.json")):
            try:
                cfg = json.loads((met.parent / "config.json").read_text())
                metrics = json.loads(met.read_text())
                proto = cfg["protocol"] if isinstance(cfg["protocol"], str) else cfg["protocol"]["name"]
                runs.append(OurRun(
                    path=str(met.parent), method=cfg["method"], protocol=proto, head=cfg.get("head", ""),
                    modality=run_modality(cfg.get("head", ""), cfg.get("head_config") or {}),
                    preset=cfg.get("preset"), overridden=bool(cfg.get("overrides")) or cfg.get("epochs_override") is not None,
                    encoders=[str(c.get("encoder", "")) for c in cfg.get("cache_paths", [])], metrics=metrics))
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                log.warning("%s: not a readable run directory (%s); skipped", met.parent, e)
    return runs


def paper_settings(run: OurRun, table: dict) -> bool:
    """Whether ``run`` used the paper's settings for ``table`` (module docstring)."""
    spec = (table.get("paper_settings") or {}).get(run.method) or (table.get("paper_settings") or {}).get("*")
    if spec is None or run.overridden:
        return False
    if run.preset not in spec.get("presets", [None]):
        return False
    allowed = spec.get("encoders")
    return allowed is None or all(any(e.startswith(a) for a in allowed) for e in run.encoders)


def _matches(run: OurRun, row: dict) -> bool:
    if row.get("method") is None or run.method != row["method"] or run.protocol != row["protocol"]:
        return False
    if "head" in row:
        return run.head == row["head"]
    return run.modality == row.get("modality", "audio-visual")


def _fmt(values: Sequence[float]) -> str:
    v = [x for x in values if x is not None and np.isfinite(x)]
    if not v:
        return "—"
    sd = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    return f"{np.mean(v):.2f} ± {sd:.2f}"


def compare(runs: Sequence[OurRun], published: Sequence[dict] | None = None, only_with_ours: bool = False) -> str:
    """Markdown: per published table, each row's numbers beside ours (module docstring)."""
    published = load_published() if published is None else published
    lines: list[str] = []
    for doc in published:
        for table in doc["tables"]:
            keys = list(table["metrics"])
            ours_key = {k: (table.get("ours") or {}).get(k, k) for k in keys}
            body = []
            for row in table["rows"]:
                match = [r for r in runs if _matches(r, row)]
                paper = [r for r in match if paper_settings(r, table)]
                used = paper or match
                if only_with_ours and not used:
                    continue
                cells = [row["label"], row.get("method") or "(not implemented)", row["protocol"],
                         row.get("head") or row.get("modality", "audio-visual")]
                for k in keys:
                    pub = row.get(k)
                    vals = [100 * r.metrics[ours_key[k]] for r in used if r.metrics.get(ours_key[k]) is not None]
                    cells += ["—" if pub is None else f"{pub:.2f}", _fmt(vals)]
                cells.append(str(len(used)) if used else "")
                cells.append(("yes" if paper else "no") if used else "")
                body.append(cells)
            if not body:
                continue
            lines.append(f"### {doc['source']} — {table['table']}")
            lines.append(f"{table.get('setting', '')}")
            lines.append("")
            head = ["method (paper)", "ours", "protocol", "modality/head"]
            for k in keys:
                head += [f"{table['metrics'][k]} published", "ours"]
            head += ["runs", "paper settings"]
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "---|" * len(head))
            lines.extend("| " + " | ".join(c) + " |" for c in body)
            for note in doc.get("notes", []):
                lines.append(f"- {note}")
            lines.append("")
    if not lines:
        return "no published row matches these runs (methods and protocols differ)\n"
    return "\n".join(lines)
