"""``RESULTS.md``: one ``## `` section per benchmark, replaced in place when the benchmark is re-run."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

RESULTS = Path(__file__).resolve().with_name("RESULTS.md")


def record_section(text: str, path: Path = RESULTS) -> Path:
    """Put ``text`` (whose first line is its ``## `` heading) in ``path``: replace the
    section with that heading, or append it; returns ``path``."""
    heading = text.split("\n", 1)[0]
    if not heading.startswith("## "):
        raise ValueError(f"a results section starts with '## ', not {heading!r}")
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    body = text.rstrip("\n") + "\n\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: body, old, count=1) if pattern.search(old) else old.rstrip("\n") + "\n\n" + body
    path.write_text(new.rstrip("\n") + "\n", encoding="utf-8")
    print(f"recorded in {path}")
    return path


def publish(lines: Sequence[str], record: bool, path: Path = RESULTS) -> str:
    """A benchmark's section: ``lines`` (its ``## `` heading first) joined by newlines,
    printed, and put in ``path`` by :func:`record_section` when ``record``; returns the text."""
    text = "\n".join(lines)
    print(text)
    if record:
        record_section(text, path)
    return text
