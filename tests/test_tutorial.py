"""docs/tutorial.md runs as written: its code blocks are extracted from the markdown and executed.

Fenced blocks are read by their info string: ```` ```python file=NAME ```` is written to
``NAME``; ```` ```sh ```` blocks run in bash; ```` ```python ```` blocks run in Python;
```` ```toml ```` is parsed; ```` ```text ```` is output shown to the reader. All run in
order in one working folder that holds a small stand-in for the demo store at
``demo/cache/synth/signal-<key>.zarr`` (the 12 synth-4x3 classes, Gaussian
features), so the commands are the tutorial's, character for character.

The tutorial trains with ``--preset synth`` (150 epochs per task). The default-suite
test applies one substitution, :data:`FEWER_EPOCHS` (2 epochs per task, in the shell
commands and in the Python call alike), and checks that it applied; the test marked
``slow`` runs the blocks with no change at all.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from train_fixtures import gaussian_features, toy_manifest, write_store

REPO = Path(__file__).resolve().parents[1]
TUTORIAL = REPO / "docs" / "tutorial.md"
# (text in the tutorial, replacement): the preset's 150 epochs per task -> 2, for the default suite
FEWER_EPOCHS = (("--preset synth", "--preset synth --epochs 2"), ('preset="synth",', 'preset="synth", epochs=2,'))
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.S | re.M)


def code_blocks(text: str) -> list[tuple[str, dict, str]]:
    """``(language, {key: value} from the info string, body)`` of every fenced block, in order."""
    out = []
    for m in FENCE.finditer(text):
        lang, *attrs = m.group(1).split()
        out.append((lang, dict(a.split("=", 1) for a in attrs if "=" in a), m.group(2)))
    return out


def demo_standin(root: Path) -> Path:
    """``root/demo/cache/synth/signal-<key>.zarr``: synth-4x3's 12 classes, 3 train and 2 test clips each."""
    from avcl_core.manifest import Manifest
    from avcl_core.protocols import load_protocol

    classes = load_protocol("synth-4x3").classes
    base = toy_manifest(len(classes), {"train": 3, "test": 2}, dataset="synth")
    rows = [{**r, "class_name": classes[r["label"]]} for r in base]
    manifest = Manifest(rows, source="synth stand-in")
    feats = gaussian_features(manifest, {"audio": (2, 8), "visual": (2, 8)}, seed=0)
    return Path(write_store(root / "demo" / "cache" / "synth" / "signal-000000000000.zarr", manifest, feats,
                            encoder="signal"))


def test_the_tutorial_blocks_are_found():
    kinds = [(lang, attrs.get("file")) for lang, attrs, _ in code_blocks(TUTORIAL.read_text(encoding="utf-8"))]
    assert kinds == [("python", "my_methods.py"), ("sh", None), ("sh", None), ("text", None), ("python", None),
                     ("toml", None)]
    method = code_blocks(TUTORIAL.read_text(encoding="utf-8"))[0][2]
    assert len(method.strip().splitlines()) <= 32  # "a complete new method in about 30 lines"


def run_tutorial(tmp_path: Path, substitutions=()) -> None:
    """Execute the tutorial's blocks in ``tmp_path`` (see the module docstring)."""
    from avcl_core.plugins import GROUPS

    demo_standin(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    shown_table, applied = None, set()
    for lang, attrs, body in code_blocks(TUTORIAL.read_text(encoding="utf-8")):
        if lang in ("sh", "python") and "file" not in attrs:
            for old, new in substitutions:
                if old in body:
                    body = body.replace(old, new)
                    applied.add(old)
        if "file" in attrs:
            (tmp_path / attrs["file"]).write_text(body)
        elif lang == "sh":
            p = subprocess.run(["bash", "-e", "-c", body], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=600)
            assert p.returncode == 0, f"tutorial block failed:\n{body}\n{p.stdout}\n{p.stderr}"
            last_out = p.stdout
        elif lang == "python":
            p = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=600)
            assert p.returncode == 0, f"tutorial block failed:\n{body}\n{p.stdout}\n{p.stderr}"
            assert len(p.stdout.splitlines()) == 3 and "cosdistill 0 skipped" in p.stdout
        elif lang == "text":
            shown_table = body
            # the report printed by the previous block has the rows and columns the tutorial shows
            shown = [line.split("|")[1].strip() for line in body.splitlines() if line.startswith("|")]
            printed = [line.split("|")[1].strip() for line in last_out.splitlines() if line.startswith("|")]
            assert sorted(printed) == sorted(shown)
        elif lang == "toml":
            eps = tomllib.loads(body)["project"]["entry-points"]
            assert set(eps) == set(GROUPS.values())
    assert shown_table is not None
    assert applied == {old for old, _ in substitutions}, "the tutorial no longer has the text the fast test replaces"
    runs = tmp_path / "demo" / "tutorial-runs" / "synth-4x3"
    assert sorted(p.name for p in runs.iterdir()) == ["cosdistill", "lll"]
    for m in ("cosdistill", "lll"):
        for s in range(3):
            assert (runs / m / f"seed{s}" / "metrics.json").is_file()
    cfg = (runs / "cosdistill" / "seed0" / "config.json").read_text()
    assert '"beta": 2.0' in cfg and f"file {tmp_path / 'my_methods.py'}" in cfg
    assert (tmp_path / "demo" / "tutorial-report" / "table.md").is_file()


def test_the_tutorial_runs_with_fewer_epochs(tmp_path):
    run_tutorial(tmp_path, FEWER_EPOCHS)


@pytest.mark.slow
def test_the_tutorial_runs_as_written(tmp_path):
    run_tutorial(tmp_path)
