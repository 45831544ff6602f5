"""Plugins: a separate package's entry points, file:Class references, broken plugins, protocol folders, the API.

The "separate package" is written into a temp dir as a source tree with its own
``pyproject.toml`` plus the ``.dist-info`` (``METADATA``, ``entry_points.txt``) that
``pip install -e`` would have produced; putting that folder on ``PYTHONPATH`` (or
``sys.path``) is what the entry-point convention needs, without a slow install.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from train_fixtures import one_torch_thread  # noqa: F401 (autouse fixture)
from train_fixtures import make_toy

REPO = Path(__file__).resolve().parents[1]
FAST = ["--epochs", "2", "--set", "batch_size=16", "--set", "head.d_model=16", "-q"]

METHODS_PY = '''\
"""My lab's methods."""
from dataclasses import dataclass

import torch.nn.functional as F

from train.methods import Hparams, Method


@dataclass(frozen=True)
class MyDistillHparams(Hparams):
    alpha: float = 0.5


class MyDistill(Method):
    """Fine-tuning plus feature distillation weighted by alpha."""

    Hparams = MyDistillHparams
    replay = "mixed"
    uses_teacher = True

    def loss(self, batch, out):
        terms = {"ce": F.cross_entropy(out["logits"], batch["y"])}
        old = self.teacher(batch)
        if old is not None:
            terms["fd"] = self.hp.alpha * (out["feature"] - old["feature"]).pow(2).mean()
        return terms


class ShadowLLL(MyDistill):
    """Tries to take the built-in name lll."""
'''

HEADS_PY = '''\
"""My lab's heads."""
import dataclasses

import torch
from torch import nn

from train.heads import Head


class Gated(Head):
    """Mean-pooled audio and visual tokens mixed by a learned sigmoid gate."""

    streams = ("audio", "visual")

    @dataclasses.dataclass(frozen=True)
    class Config:
        d_model: int = 32

    def __init__(self, dims, cfg):
        super().__init__(dims, cfg)
        self.a = nn.Linear(dims["audio"][-1], cfg.d_model)
        self.v = nn.Linear(dims["visual"][-1], cfg.d_model)
        self.gate = nn.Linear(2 * cfg.d_model, cfg.d_model)
        self.out_dim = cfg.d_model

    def forward(self, x):
        a, v = self.a(x["audio"].mean(1)), self.v(x["visual"].mean(1))
        g = torch.sigmoid(self.gate(torch.cat([a, v], 1)))
        return g * a + (1 - g) * v
'''

ENCODER_PY = '''\
"""``meancolour``: mean RGB of each frame and the RMS of the audio window."""
import torch

from extract.encoders.base import FeatureEncoder, Preprocess


class MeanColour(FeatureEncoder):
    name = "meancolour"
    variant = "v1"

    def __init__(self, frames_per_clip):
        super().__init__()
        self.weights = "none"
        self.preprocess = Preprocess(clip_seconds=1.0, frames_per_clip=frames_per_clip, image_size=16,
                                     audio_rate=8000)

    def streams(self):
        return {"visual": (self.preprocess.frames_per_clip, 3), "audio": (1, 1)}

    def encode(self, frames, audio):
        return {"visual": frames.float().mean(dim=(2, 3)) / 255.0,
                "audio": audio.pow(2).mean(1).sqrt()[:, None, None]}


def build(frames_per_clip: int = 2, device: str = "cpu"):
    return MeanColour(frames_per_clip).freeze()
'''

ENTRY_POINTS = {
    "avcl.methods": {"mydistill": "my_lab.methods:MyDistill", "lll": "my_lab.methods:ShadowLLL",
                     "broken": "my_lab.broken:Nope"},
    "avcl.heads": {"gated": "my_lab.heads:Gated"},
    "avcl.encoders": {"meancolour": "my_lab.encoder"},
}


def make_plugin_package(root: Path) -> Path:
    """A package ``my-lab-methods`` under ``root``: sources, pyproject.toml and the dist-info of an
    editable install. Returns the folder to put on the path."""
    pkg = root / "my-lab-methods"
    (pkg / "my_lab").mkdir(parents=True)
    (pkg / "my_lab" / "__init__.py").write_text("")
    (pkg / "my_lab" / "methods.py").write_text(METHODS_PY)
    (pkg / "my_lab" / "heads.py").write_text(HEADS_PY)
    (pkg / "my_lab" / "encoder.py").write_text(ENCODER_PY)
    (pkg / "my_lab" / "broken.py").write_text("import a_dependency_that_is_not_installed\n")
    eps = "".join(f'\n[project.entry-points."{g}"]\n' + "".join(f'{k} = "{v}"\n' for k, v in d.items())
                  for g, d in ENTRY_POINTS.items())
    (pkg / "pyproject.toml").write_text('[project]\nname = "my-lab-methods"\nversion = "0.1"\n' + eps)
    info = pkg / "my_lab_methods-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-lab-methods\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in d.items()) + "\n" for g, d in ENTRY_POINTS.items()))
    return pkg


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy"), n_classes=6, classes_per_task=2, memory=12)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return make_plugin_package(tmp_path_factory.mktemp("plugin"))


@pytest.fixture
def registries():
    """Leave the method/head/encoder registries as they were (tests here register plugins)."""
    from extract import encoders as E
    from train.heads import base as H
    from train.methods import base as M

    regs = (M.REGISTRY, H.REGISTRY)
    saved = [(dict(r.items), dict(r.origins), dict(r._refs)) for r in regs]
    saved_enc = dict(E.PLUGIN_ENCODERS)
    for r in regs:
        r.plugins.reset()
    E.PLUGINS.reset()
    yield
    for r, (items, origins, refs) in zip(regs, saved):
        r.items.clear(), r.items.update(items)
        r.origins.clear(), r.origins.update(origins)
        r._refs.clear(), r._refs.update(refs)
        r.plugins.reset()
    E.PLUGIN_ENCODERS.clear(), E.PLUGIN_ENCODERS.update(saved_enc)
    E.PLUGINS.reset()
    for name in [m for m in sys.modules if m == "my_lab" or m.startswith("my_lab.")]:
        del sys.modules[name]


@pytest.fixture
def on_path(package, registries, monkeypatch):
    monkeypatch.syspath_prepend(str(package))
    return package


def train_cli(toy, out, *extra):
    from train.cli import main

    return main(["--cache", toy.store, "--protocol", toy.protocol, "--out", str(out), *FAST, *extra])


# -- a separate package --------------------------------------------------------------------------
ONE_OFF_PY = '''\
from dataclasses import dataclass

from train.methods import Hparams, Method


@dataclass(frozen=True)
class OneOffHparams(Hparams):
    alpha: float = 1.0


class OneOff(Method):
    """Plain fine-tuning, from a file of its own."""

    Hparams = OneOffHparams
'''


def test_installed_package_adds_a_method_and_a_head_that_avcl_train_runs(toy, package, tmp_path):
    """Entry points found through PYTHONPATH, next to a file:Class method, in 2 worker processes."""
    one_off = tmp_path / "one_off.py"
    one_off.write_text(ONE_OFF_PY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package), str(REPO)]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "train.cli", "--cache", toy.store, "--protocol", toy.protocol,
           "--method", f"mydistill,{one_off}:OneOff", "--head", "gated", "--set", "alpha=2", "--threads", "1",
           "--jobs", "2", "--out", str(tmp_path / "runs"), *FAST]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    d = tmp_path / "runs" / "toy-3x2" / "mydistill-gated" / "seed0"
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["method"], cfg["head"], cfg["hparams"]["alpha"], cfg["head_config"]) == \
        ("mydistill", "gated", 2.0, {"d_model": 16})
    assert cfg["origins"] == {"method": "plugin my-lab-methods 0.1 (my_lab.methods:MyDistill)",
                              "head": "plugin my-lab-methods 0.1 (my_lab.heads:Gated)"}
    A = np.loadtxt(d / "acc_matrix.csv", delimiter=",", skiprows=1)[:, 1:]
    met = json.loads((d / "metrics.json").read_text())
    assert A.shape == (3, 3) and met["mean_accuracy"] == pytest.approx(np.mean(met["step_acc"]))
    assert "mydistill-gated" in p.stdout and "oneoff-gated" in p.stdout  # the summary table
    cfg = json.loads((tmp_path / "runs" / "toy-3x2" / "oneoff-gated" / "seed0" / "config.json").read_text())
    assert cfg["origins"]["method"] == f"file {one_off}" and cfg["hparams"]["alpha"] == 2.0
    assert (tmp_path / "runs" / "toy-3x2" / "oneoff-gated" / "seed0" / "metrics.json").is_file()
    # the broken plugin in the same package was never imported: nothing about it
    assert "broken" not in p.stderr


def test_listing_names_every_plugin_with_its_origin_and_the_broken_one_with_its_error(on_path):
    from train.api import catalog, format_catalog

    cat = catalog()
    methods = {m["name"]: m for m in cat["methods"]}
    assert methods["mydistill"]["origin"] == "plugin my-lab-methods 0.1 (my_lab.methods:MyDistill)"
    assert methods["mydistill"]["hparams"] == {"alpha": 0.5}
    assert methods["mydistill"]["description"] == "Fine-tuning plus feature distillation weighted by alpha."
    assert methods["lll"]["origin"] == "built-in" and methods["lll"]["hparams"]["lambda_kd"] == 1.0
    heads = {h["name"]: h for h in cat["heads"]}
    assert heads["gated"]["options"] == {"d_model": 32} and heads["gated"]["streams"] == ["audio", "visual"]
    encoders = {e["name"]: e for e in cat["encoders"]}
    assert encoders["meancolour"]["origin"] == "plugin my-lab-methods 0.1 (my_lab.encoder)"
    assert encoders["meancolour"]["options"] == {"frames_per_clip": "2", "device": "'cpu'"}
    assert encoders["signal"]["origin"] == "built-in"
    failed = {(f["kind"], f["name"]): f["error"] for f in cat["failed"]}
    assert "ModuleNotFoundError: No module named 'a_dependency_that_is_not_installed'" in failed[("method", "broken")]
    assert "my-lab-methods 0.1 (my_lab.broken:Nope)" in failed[("method", "broken")]
    assert "taken by the built-in method 'lll'" in failed[("method", "lll")]
    text = format_catalog(cat)
    assert "  mydistill  [plugin my-lab-methods 0.1 (my_lab.methods:MyDistill)]  Fine-tuning plus" in text
    assert "alpha=0.5" in text and "method broken: plugin my-lab-methods" in text


def test_a_broken_plugin_is_named_when_asked_for_and_built_ins_still_run(on_path, toy, tmp_path):
    from train.api import SpecError
    from train.methods import method_names

    with pytest.raises(SpecError, match=r"method 'broken' cannot be used: plugin my-lab-methods 0.1 "
                                        r"\(my_lab.broken:Nope\): ModuleNotFoundError: No module named "
                                        r"'a_dependency_that_is_not_installed'"):
        train_cli(toy, tmp_path, "--method", "broken")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = method_names()
        method_names()  # warned once per process, not at every listing
    assert sorted(str(w.message).split(":")[0] for w in caught) == \
        ["method plugin 'broken' skipped", "method plugin 'lll' skipped"]
    assert "ModuleNotFoundError" in next(str(w.message) for w in caught if "broken" in str(w.message))
    assert {"finetune", "lll", "mydistill"} <= set(names) and "broken" not in names
    res = train_cli(toy, tmp_path, "--method", "finetune,lll", "--head", "guided", "--set", "head.n_heads=2")
    assert [r["status"] for r in res] == ["ok", "ok"]
    assert json.loads((tmp_path / "toy-3x2" / "lll" / "seed0" / "config.json").read_text())["origins"] == \
        {"method": "built-in", "head": "built-in"}  # the plugin's 'lll' did not replace the built-in


def test_a_plugin_encoder_extracts_with_avcl_extract(on_path, avcl_synth_root, tmp_path):
    from click.testing import CliRunner

    from avcl_core.cache import open_store
    from extract.cli import cli

    res = CliRunner().invoke(cli, ["--dataset", "synth", "--root", str(avcl_synth_root), "--encoder", "meancolour",
                                   "-o", "frames_per_clip=3", "--cache-dir", str(tmp_path), "--workers", "0",
                                   "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    (path,) = (tmp_path / "synth").glob("meancolour-*.zarr")
    st = open_store(str(path))
    v = st.read("visual")
    assert v.shape == (12, 3, 3) and np.all((v >= 0) & (v <= 1)) and (st.row_status() == 1).all()
    assert v.std(axis=0).max() > 0.01  # clips of different classes have different colours


# -- file:Class and module:Class -------------------------------------------------------------------
def test_file_class_method_and_head(registries, toy, package, tmp_path):
    ref_m = f"{package / 'my_lab' / 'methods.py'}:MyDistill"
    ref_h = f"{package / 'my_lab' / 'heads.py'}:Gated"
    res = train_cli(toy, tmp_path, "--method", ref_m, "--head", ref_h, "--set", "alpha=0")
    assert [(r["method"], r["head"], r["status"]) for r in res] == [("mydistill", "gated", "ok")]
    cfg = json.loads((tmp_path / "toy-3x2" / "mydistill-gated" / "seed0" / "config.json").read_text())
    assert cfg["origins"] == {"method": f"file {package / 'my_lab' / 'methods.py'}",
                              "head": f"file {package / 'my_lab' / 'heads.py'}"}
    assert cfg["hparams"]["alpha"] == 0.0


def test_module_class_reference_and_reference_errors(registries, package, toy, tmp_path, monkeypatch):
    from train.api import SpecError
    from train.methods import method_class, method_origin

    monkeypatch.syspath_prepend(str(package))
    assert method_class("my_lab.methods:MyDistill").name == "mydistill"
    assert method_origin("mydistill") == "module my_lab.methods"
    assert method_class("train.methods.lll:LLL").name == "lll"  # a registered class keeps its name
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nclass Half(\n")
    cases = {
        f"{tmp_path / 'nope.py'}:X": f"file {tmp_path / 'nope.py'} does not exist",
        f"{package / 'my_lab' / 'methods.py'}:Nope": r"has no attribute 'Nope' \(classes defined there: .*MyDistill",
        f"{bad}:Half": f"importing {bad} failed: SyntaxError",
        "my_lab.heads:Gated": "is not a Method subclass",
        "my_lab.nothere:X": "importing module 'my_lab.nothere' failed: ModuleNotFoundError",
    }
    for ref, msg in cases.items():
        with pytest.raises(SpecError, match=msg):
            train_cli(toy, tmp_path / "runs", "--method", ref)
    with pytest.raises(SpecError, match=r"unknown head\(s\) \['gatd'\]; available: (.*, )?audio, (.*, )?concat"):
        train_cli(toy, tmp_path / "runs", "--method", "finetune", "--head", "gatd")
    assert not (tmp_path / "runs").exists()


# -- protocol folders ------------------------------------------------------------------------------------
def test_protocol_folders_from_avcl_protocols(toy, tmp_path, monkeypatch):
    from avcl_core.protocols import list_protocols, load_protocol

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    mine = json.loads(Path(toy.protocol).read_text())
    (a / "my-3x2.json").write_text(json.dumps({**mine, "name": "my-3x2"}))
    (b / "synth-4x3.json").write_text(json.dumps({**mine, "name": "synth-4x3"}))  # a shipped name
    monkeypatch.setenv("AVCL_PROTOCOLS", os.pathsep.join([str(a), str(b)]))
    assert load_protocol("my-3x2").tasks == ((0, 1), (2, 3), (4, 5))
    assert load_protocol("synth-4x3").dataset == "synth"  # the shipped one wins
    with pytest.warns(UserWarning, match=f"protocol file {b / 'synth-4x3.json'} is ignored"):
        names = list_protocols()
    assert "my-3x2" in names and "ave-4x7" in names
    res = train_cli(toy, tmp_path / "runs", "--method", "finetune", "--protocol", "my-3x2", "--set", "head.n_heads=2")
    assert res[0]["status"] == "ok" and res[0]["protocol"] == "my-3x2"


# -- the Python API ----------------------------------------------------------------------------------
def test_api_run_is_the_cli_code_path(toy, tmp_path):
    from train import api, sweep

    opts = {"epochs": 2, "batch_size": 16, "head.d_model": 16, "head.n_heads": 2, "lamb": 2}
    fs = api.load_features(toy.store)
    assert len(fs) == len(toy.manifest) and fs.dims == {"audio": (4, 8), "visual": (3, 12)}
    run = api.run(fs, "lwf", protocol=toy.protocol, seed=1, options=opts, out=tmp_path / "api")
    assert [v is fs for v in sweep._FEATURE_SETS.values()] == [True]  # trained on fs itself, not a reloaded copy
    cli = train_cli(toy, tmp_path / "cli", "--method", "lwf", "--seeds", "1", "--set", "lamb=2",
                    "--set", "head.n_heads=2")[0]
    assert run.status == "ok" and run.run_dir == tmp_path / "api" / "toy-3x2" / "lwf" / "seed1"
    np.testing.assert_array_equal(run.acc_matrix, cli["acc_matrix"])
    assert run.metrics == cli["metrics"]
    a = json.loads((run.run_dir / "config.json").read_text())
    b = json.loads((Path(cli["run_dir"]) / "config.json").read_text())
    assert a["config_hash"] == b["config_hash"] and a["hparams"]["lamb"] == 2.0
    again = api.run(toy.store, "lwf", protocol=toy.protocol, seed=1, options=opts, out=tmp_path / "api")
    assert again.status == "skipped" and again.metrics["step_acc"] == run.metrics["step_acc"]
    runs = api.sweep(fs, "lwf", protocol=toy.protocol, seeds="0-1", options=opts, out=tmp_path / "api")
    assert [(r.method, r.seed, r.status) for r in runs] == [("lwf", 0, "ok"), ("lwf", 1, "skipped")]
    assert runs[0].acc_matrix.shape == (3, 3) and runs[1].acc_matrix is None
    table = api.summary(runs)
    assert "protocol toy-3x2" in table and "lwf" in table and "*" in table  # * = already done


def test_api_run_raises_with_the_error_of_a_failed_run(registries, toy, tmp_path):
    from train import api
    from train.methods import Method, register_method

    @register_method("fails-in-task-1")
    class Fails(Method):
        def before_task(self, task):
            if task == 1:
                raise RuntimeError("boom in task 1")

    with pytest.raises(api.RunFailed, match="boom in task 1") as e:
        api.run(toy.store, "fails-in-task-1", protocol=toy.protocol, out=tmp_path,
                options={"epochs": 1, "head.d_model": 16, "head.n_heads": 2})
    assert "Traceback" in (e.value.run.run_dir / "error.txt").read_text()
    with pytest.raises(api.SpecError, match="no protocol|give --protocol"):
        api.run(toy.store, "finetune", out=tmp_path)
