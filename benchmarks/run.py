"""Re-measure every benchmark and rewrite its section of ``benchmarks/RESULTS.md``.

Runs each ``benchmarks/bench_*.py`` in its own process (one after the other:
they measure ratios within one run and must not compete for the cores) with
the flag that makes it record its section (``--write`` or ``--record``), and
prints a summary of which ones succeeded. The sections are written by the
scripts themselves through :func:`results.record_section`.

    .venv/bin/python benchmarks/run.py                      # all of them
    .venv/bin/python benchmarks/run.py --only train          # bench_train*.py
    .venv/bin/python benchmarks/run.py --skip encoders --dry-run
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def scripts(only: list[str], skip: list[str]) -> list[Path]:
    out = []
    for p in sorted(HERE.glob("bench_*.py")):
        name = p.stem.removeprefix("bench_")
        if only and not any(name.startswith(o) for o in only):
            continue
        if any(name.startswith(s) for s in skip):
            continue
        out.append(p)
    return out


def record_flag(path: Path) -> str | None:
    """The script's flag that records its results (``--write`` or ``--record``), if any."""
    text = path.read_text(encoding="utf-8")
    for flag in ("--write", "--record"):
        if re.search(rf"add_argument\(\s*[\"']{flag}[\"']", text):
            return flag
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run only bench_NAME*.py (repeatable)")
    ap.add_argument("--skip", action="append", default=[], metavar="NAME", help="skip bench_NAME*.py (repeatable)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per script (default 3600)")
    ap.add_argument("--dry-run", action="store_true", help="list the commands only")
    args = ap.parse_args(argv)
    results = []
    for path in scripts(args.only, args.skip):
        flag = record_flag(path)
        cmd = [sys.executable, str(path)] + ([flag] if flag else [])
        print("$", " ".join(cmd[1:]), flush=True)
        if args.dry_run:
            continue
        t = time.perf_counter()
        try:
            rc = subprocess.run(cmd, cwd=HERE.parent, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        results.append((path.name, rc, time.perf_counter() - t, flag))
    for name, rc, secs, flag in results:
        state = "ok" if rc == 0 else f"FAILED ({rc})"
        note = "" if flag else " (records nothing: no --write/--record flag)"
        print(f"{name:28s} {state:12s} {secs:7.0f} s{note}")
    return 0 if all(rc == 0 for _, rc, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
