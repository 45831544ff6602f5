"""synth — the embedded audio-visual dataset: real mp4 clips rendered from a seed.

Every class ``i`` pairs a *visual identity* with an *audio identity*::

    visual_id(i) = i // 2          classes (0,1), (2,3), (4,5), ... look alike
    audio_id(i)  = (i + 1) // 2    classes (1,2), (3,4), (5,6), ... sound alike

so no single modality tells every class apart while the pair (visual_id,
audio_id) is unique per class: with 12 classes a perfect visual-only model
reaches 6/12 and a perfect audio-only model 7/12 (classes 0 and 11 have their
own sound), an audio-visual model 12/12. The protocols keep the class order
(task ``t`` of ``K`` classes holds classes ``t*K .. t*K+K-1``), so fusion is
needed from the first task on (task 0 of ``synth-4x3`` holds the look-alikes 0, 1
and the sound-alikes 1, 2) and look-alikes or sound-alikes also straddle task
boundaries (2 | 3, 5 | 6, 8 | 9), which a model that only fine-tunes forgets.

A visual identity ``v`` is a colour (``v mod 6``), shape (``v mod 7``),
texture (``v mod 4``) and motion (``v mod 5``); an audio identity ``a`` is a
pitch (``a mod 9``, minor thirds from A3 = 220 Hz), timbre (``a mod 4``) and
rhythm (``a mod 5``). Identities are distinct for ``a, v < 180``, hence
``classes <= MAX_CLASSES``. Class names depend on the class index only, e.g.
``c00-red-circle-a3`` (index, colour, shape, pitch).

Each clip shows the class's object (the *sounding object*) and, in 85 % of
clips, a non-sounding distractor object: grey, or (60 % of clips) another
class's visual identity outside ``visual_id(i) - 1 .. visual_id(i) + 1``. The
exclusion keeps exactly one object on screen consistent with the sound, and
gives look-alike classes the same distractor distribution, so the distractor
says nothing about which of the two a clip is; on its own, the picture cannot
tell which of two coloured objects is sounding, which lowers visual-only
accuracy further (about 0.35 for 12 classes with the ``signal`` encoder).
The background is a noisy low-saturation gradient; the sound is the class's
note pattern (pitch jittered by up to 1 %, random rhythm phase) plus
pink noise at 8-20 dB SNR and, in half the clips, a faint frequency sweep.

Files under the output root ``out``:

``videos/<class_name>/<sample_id>.mp4``
    H.264 (yuv420p, ``size`` x ``size``, ``fps``) + AAC mono at ``audio_rate``,
    ``seconds`` long (``round(seconds * fps)`` frames).
``masks/<sample_id>.npz``
    array ``masks``: uint8 (T, size, size), 1 on the visible pixels of the
    sounding object in video frame ``t`` (frame ``t`` shows time ``t / fps``),
    0 elsewhere (background and distractor). In a multi-source render
    (``render(multi > 0)``) the masks are class maps instead: ``class id + 1`` on
    each sounding object's visible pixels.

Multi-source renders (``multi``, the continual semantic segmentation benchmark of
CMR): in a fraction ``multi`` of the clips (:func:`partner_of`) the distractor is
replaced by a second *sounding* object of another class ``k`` whose look differs
(visual identity more than one apart), the audio is the mixture of both classes'
sounds and the manifest ``label`` is ``[i, k]``. Under a class-incremental
semantic protocol such a clip belongs to the tasks of both classes, so an object
of an old class appears, labelled background, in a new task's clips (background
shift on a sounding object) and new classes co-occur with old ones. The other
clips are those of the single-source render, byte for byte.
``manifest.jsonl``
    :class:`~avcl_core.manifest.Manifest` rows (dataset ``synth``; ``video`` and
    ``masks`` relative to ``out``; ``subset`` = :func:`render_tag`, so renders with
    other parameters have other manifest hashes), ordered by class then clip; per
    class the first 60 % of clips are ``train``, the next 20 % ``val``, the rest ``test``.
``protocols/synth-<T>x<K>.json``
    class-incremental protocols over the rendered classes (see :func:`protocols`).
``synth.json``
    the render parameters and each class's identities.

Rendering is deterministic: clip ``j`` of class ``i`` draws from
``numpy.random.default_rng([seed, i, j])``; H.264 is encoded single-threaded by
x264's C code with fixed options and files carry no timestamps, so the same
parameters give byte-identical files, whatever the number of workers.
"""
from __future__ import annotations

import colorsys
import io
import json
import math
import os
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from avcl_core.manifest import Manifest

DATASET = "synth"

COLOURS = (  # name, hue in turns
    ("red", 0.0), ("yellow", 1 / 6), ("green", 2 / 6), ("cyan", 3 / 6), ("blue", 4 / 6), ("magenta", 5 / 6),
)
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond")
TEXTURES = ("solid", "stripes", "checker", "dots")
MOTIONS = ("sway", "bob", "orbit", "zigzag", "spin")
NOTES = ("a3", "c4", "ds4", "fs4", "a4", "c5", "ds5", "fs5", "a5")  # minor thirds from 220 Hz
TIMBRES = ("sine", "reed", "brass", "bell")
RHYTHMS = ("steady", "beat2", "beat4", "longshort", "triplet")

#: Audio identities repeat after lcm(9, 4, 5) = 180, visual ones after 420.
MAX_CLASSES = 2 * 180 - 1
#: Exemplar memory of the shipped protocols, per class.
MEMORY_PER_CLASS = 3
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)


# -- class identities -------------------------------------------------------------
def visual_id(i: int) -> int:
    """Visual identity of class ``i``: ``i // 2`` (classes 2k and 2k+1 look alike)."""
    return i // 2


def audio_id(i: int) -> int:
    """Audio identity of class ``i``: ``(i + 1) // 2`` (classes 2k-1 and 2k sound alike)."""
    return (i + 1) // 2


def visual_identity(v: int) -> dict:
    """Colour, shape, texture and motion of visual identity ``v``."""
    return {
        "colour": COLOURS[v % len(COLOURS)][0],
        "shape": SHAPES[v % len(SHAPES)],
        "texture": TEXTURES[v % len(TEXTURES)],
        "motion": MOTIONS[v % len(MOTIONS)],
    }


def audio_identity(a: int) -> dict:
    """Pitch (note name and Hz), timbre and rhythm of audio identity ``a``."""
    k = a % len(NOTES)
    return {
        "note": NOTES[k],
        "pitch_hz": round(220.0 * 2 ** (3 * k / 12), 3),
        "timbre": TIMBRES[a % len(TIMBRES)],
        "rhythm": RHYTHMS[a % len(RHYTHMS)],
    }


def class_name(i: int) -> str:
    """Name of class ``i``, e.g. ``c00-red-circle-a3``; depends on ``i`` only."""
    if i < 0:
        raise ValueError(f"class index must be >= 0, got {i}")
    vis, aud = visual_identity(visual_id(i)), audio_identity(audio_id(i))
    return f"c{i:02d}-{vis['colour']}-{vis['shape']}-{aud['note']}"


def class_names(classes: int) -> list[str]:
    """Names of classes ``0 .. classes-1``."""
    _check_classes(classes)
    return [class_name(i) for i in range(classes)]


def class_table(classes: int) -> list[dict]:
    """Per class: index, name, visual id and identity, audio id and identity."""
    _check_classes(classes)
    return [
        {
            "label": i,
            "class_name": class_name(i),
            "visual_id": visual_id(i),
            "audio_id": audio_id(i),
            "visual": visual_identity(visual_id(i)),
            "audio": audio_identity(audio_id(i)),
        }
        for i in range(classes)
    ]


def _check_classes(classes: int) -> None:
    if not isinstance(classes, (int, np.integer)) or not 1 <= classes <= MAX_CLASSES:
        raise ValueError(f"synth: classes must be an integer in 1..{MAX_CLASSES}, got {classes!r}")


# -- protocols ----------------------------------------------------------------------
def protocol_shapes(classes: int) -> list[tuple[int, int]]:
    """(tasks, classes per task) pairs with both >= 2 that divide ``classes`` evenly;
    ``[(1, classes)]`` when there is none (e.g. a prime class count)."""
    _check_classes(classes)
    shapes = [(t, classes // t) for t in range(2, classes // 2 + 1) if classes % t == 0]
    return shapes or [(1, classes)]


def protocols(classes: int) -> list[dict]:
    """Class-incremental protocols ``synth-<T>x<K>`` over ``classes`` synth classes.

    Class order is the class index; task ``t`` holds positions ``t*K .. t*K+K-1``
    of ``classes``; the total memory is :data:`MEMORY_PER_CLASS` x ``classes``
    exemplars (shared by the classes seen so far). No split lists: every manifest
    row is used with its own split. Returns dicts in the protocol file format of
    :mod:`avcl_core.protocols`.
    """
    out = []
    for t, k in protocol_shapes(classes):
        out.append({
            "name": f"synth-{t}x{k}",
            "dataset": DATASET,
            "classes": class_names(classes),
            "tasks": [list(range(j * k, (j + 1) * k)) for j in range(t)],
            "setting": "CIL",
            "memory": MEMORY_PER_CLASS * classes,
            "kind": "classification",
            "provenance": _provenance(classes, t, k),
            "derived": False,
        })
    return out


def _provenance(classes: int, t: int, k: int) -> str:
    tasks = f"{t} task{'s' if t > 1 else ''} of {k} consecutive classes"
    return (f"avcl_core.synth with {classes} classes: class i has visual identity i//2 and audio identity "
            f"(i+1)//2; class order = class index, {tasks}; memory {MEMORY_PER_CLASS * classes} exemplars "
            f"in total ({MEMORY_PER_CLASS} per class once all classes are seen)")


def write_protocols(directory: str | Path, classes: int) -> list[Path]:
    """Write every protocol of :func:`protocols` as ``<directory>/<name>.json``, in the
    layout of :func:`avcl_core.protocols.save_protocol` (the shipped files' layout)."""
    return _save_protocols(directory, protocols(classes))


def _save_protocols(directory: str | Path, dicts: list[dict]) -> list[Path]:
    """Save each protocol dict as ``<directory>/<name>.json`` (:func:`avcl_core.protocols.save_protocol`)."""
    from avcl_core.protocols import protocol_from_dict, save_protocol

    directory = Path(directory)
    return [save_protocol(protocol_from_dict(p), directory / f"{p['name']}.json") for p in dicts]


#: Chunks of the task-free segmentation stream of :func:`seg_protocols`.
SEG_TASKFREE_TASKS = 4


def seg_task_count(classes: int) -> int:
    """Tasks of the class-cut segmentation protocols: 3 when ``classes`` is a multiple of 3
    (and at least 6), else 2 when it is even, else 1."""
    _check_classes(classes)
    if classes % 3 == 0 and classes >= 6:
        return 3
    return 2 if classes % 2 == 0 else 1


def seg_protocols(classes: int) -> list[dict]:
    """Binary segmentation protocols ``synth-seg-{cil,til,dil,taskfree}`` over ``classes`` synth classes.

    The mask of a clip is its sounding object (:func:`render`). ``cil``/``til``/``dil``
    cut the classes (in index order) into :func:`seg_task_count` tasks of equal size;
    what each setting does with that cut is defined by the trainer
    (:class:`train.problems.SegmentationProblem`): CIL adds a class head over the
    seen classes, TIL selects one mask output per task by the task id, DIL treats the
    class groups as domains of one binary task. ``taskfree`` streams every training
    clip in :data:`SEG_TASKFREE_TASKS` chunks (sample ids sorted, permuted by
    ``default_rng(0)``). All are exemplar-free (memory 0), as the CL-AVS protocols.
    """
    names = class_names(classes)
    t = seg_task_count(classes)
    k = classes // t
    tasks = [list(range(j * k, (j + 1) * k)) for j in range(t)]
    what = {"cil": "CIL: a class head over the seen classes is trained with the masks",
            "til": "TIL: the task id selects the task's own mask output",
            "dil": "DIL: the class groups arrive as domains of one binary (sounding / not) task"}
    out = []
    for name, setting in (("cil", "CIL"), ("til", "TIL"), ("dil", "DIL")):
        out.append({
            "name": f"synth-seg-{name}", "dataset": DATASET, "classes": names, "tasks": tasks, "setting": setting,
            "memory": 0, "kind": "segmentation", "derived": False,
            "provenance": (f"avcl_core.synth with {classes} classes: binary masks of the sounding object; "
                           f"{t} task{'s' if t > 1 else ''} of {k} consecutive classes; {what[name]}; exemplar-free"),
        })
    out.append({
        "name": "synth-seg-taskfree", "dataset": DATASET, "classes": names,
        "tasks": [list(range(classes))] * SEG_TASKFREE_TASKS, "setting": "task-free", "memory": 0,
        "kind": "segmentation", "derived": False, "seed": 0,
        "provenance": (f"avcl_core.synth with {classes} classes: binary masks of the sounding object; task-free "
                       f"stream of every training clip (ids sorted, permuted by numpy.random.default_rng(0)) cut "
                       f"into {SEG_TASKFREE_TASKS} chunks; val/test cut the same way; exemplar-free"),
    })
    return out


def write_seg_protocols(directory: str | Path, classes: int) -> list[Path]:
    """Write every protocol of :func:`seg_protocols` as ``<directory>/<name>.json`` (shipped files' layout)."""
    return _save_protocols(directory, seg_protocols(classes))


# -- splits -------------------------------------------------------------------------
def split_of(j: int, clips_per_class: int) -> str:
    """Split of clip ``j`` of a class: first 60 % train, next 20 % val, rest test
    (val and test get ``round(0.2 * clips_per_class)`` clips each)."""
    n_val = n_test = round(SPLIT_FRACTIONS[1] * clips_per_class)
    n_train = clips_per_class - n_val - n_test
    return "train" if j < n_train else ("val" if j < n_train + n_val else "test")


def sample_id(i: int, j: int) -> str:
    """Sample id of clip ``j`` of class ``i``: ``c<ii>-<jjjj>``."""
    return f"c{i:02d}-{j:04d}"


# -- rendering: pictures ----------------------------------------------------------
@dataclass(frozen=True)
class _Object:
    colour: tuple[float, float, float]  # RGB in [0, 1]
    shape: str
    texture: str
    motion: str
    centre: tuple[float, float]  # trajectory centre, image fraction (x, y)
    amplitude: float  # trajectory amplitude, image fraction
    radius: float  # image fraction
    phase: float  # radians
    angle: float  # base orientation, radians
    period: float  # seconds per motion cycle


def _shape_distance(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Scaled distance: < 1 inside the shape, for object-frame coordinates in radii."""
    rho = np.hypot(u, v)
    if shape == "circle":
        return rho
    if shape in ("square", "diamond", "triangle"):
        n, off = {"square": (4, math.pi / 4), "diamond": (4, 0.0), "triangle": (3, -math.pi / 2)}[shape]
        phis = off + 2 * math.pi * np.arange(n) / n + math.pi / n
        d = np.max([u * math.cos(p) + v * math.sin(p) for p in phis], axis=0)
        return d / math.cos(math.pi / n) * (0.85 if shape != "triangle" else 0.7)
    if shape == "star":
        phi = np.arctan2(v, u) + math.pi / 2
        return rho / (0.62 + 0.38 * np.cos(5 * phi))
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return np.minimum(np.maximum(au, av / 0.36), np.maximum(au / 0.36, av))
    if shape == "ring":
        return np.abs(rho - 0.68) / 0.32
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Brightness factor in [0.5, 1] of the texture at object-frame coordinates."""
    if texture == "solid":
        p = np.ones_like(u)
    elif texture == "stripes":
        p = (np.floor(u * 3.0 + 8.0) % 2).astype(u.dtype)
    elif texture == "checker":
        p = ((np.floor(u * 2.5 + 8.0) + np.floor(v * 2.5 + 8.0)) % 2).astype(u.dtype)
    elif texture == "dots":
        fu, fv = (u * 2.5 + 8.0) % 1.0 - 0.5, (v * 2.5 + 8.0) % 1.0 - 0.5
        p = (fu * fu + fv * fv > 0.07).astype(u.dtype)
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return 0.5 + 0.5 * p


def _pose(obj: _Object, t: float) -> tuple[float, float, float]:
    """Centre (x, y) in image fractions and rotation (radians) at time ``t`` seconds."""
    w = 2 * math.pi * t / obj.period + obj.phase
    cx, cy = obj.centre
    a = obj.amplitude
    angle = obj.angle
    if obj.motion == "sway":
        cx += a * math.sin(w)
    elif obj.motion == "bob":
        cy += a * math.sin(w)
    elif obj.motion == "orbit":
        cx, cy = cx + a * math.cos(w), cy + a * math.sin(w)
    elif obj.motion == "zigzag":
        tri = 2 / math.pi * math.asin(math.sin(w))  # triangle wave in [-1, 1]
        cx, cy = cx + a * tri, cy - a * tri
    elif obj.motion == "spin":
        cx += 0.3 * a * math.sin(w)
        angle += w
    return cx, cy, angle


def _draw(obj: _Object, t: float, xx: np.ndarray, yy: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Coverage alpha (H, W) in [0, 1] and RGB (H, W, 3) of ``obj`` at time ``t``."""
    cx, cy, ang = _pose(obj, t)
    dx, dy = (xx - cx) / obj.radius, (yy - cy) / obj.radius
    c, s = math.cos(ang), math.sin(ang)
    u, v = c * dx + s * dy, -s * dx + c * dy
    d = _shape_distance(obj.shape, u, v)
    # One pixel of anti-aliasing: (1 - d) * radius_px is ~ the signed distance in pixels.
    alpha = np.clip(0.5 + (1.0 - d) * obj.radius * size, 0.0, 1.0)
    rgb = _texture(obj.texture, u, v)[..., None] * np.asarray(obj.colour)
    return alpha, rgb


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    return colorsys.hsv_to_rgb(h % 1.0, s, v)


def _make_object(rng: np.random.Generator, vis: dict | None, centre: tuple[float, float]) -> _Object:
    if vis is None:  # neutral distractor: grey, random shape/texture/motion
        colour = _hsv(0.0, 0.0, float(rng.uniform(0.7, 0.95)))
        vis = {
            "shape": SHAPES[int(rng.integers(len(SHAPES)))],
            "texture": TEXTURES[int(rng.integers(len(TEXTURES)))],
            "motion": MOTIONS[int(rng.integers(len(MOTIONS)))],
        }
    else:
        hue = dict(COLOURS)[vis["colour"]] + rng.uniform(-0.012, 0.012)
        colour = _hsv(hue, float(rng.uniform(0.8, 1.0)), float(rng.uniform(0.85, 1.0)))
    return _Object(
        colour=tuple(float(x) for x in colour),
        shape=vis["shape"],
        texture=vis["texture"],
        motion=vis["motion"],
        centre=centre,
        # centre +- (0.03 jitter + amplitude + radius) stays inside the frame
        amplitude=float(rng.uniform(0.06, 0.10)),
        radius=float(rng.uniform(0.13, 0.17)),
        phase=float(rng.uniform(0, 2 * math.pi)),
        angle=float(rng.uniform(-0.15, 0.15)),
        period=float(rng.uniform(1.6, 2.4)),
    )


def _render_frames(rng: np.random.Generator, i: int, classes: int, size: int, n_frames: int, fps: float,
                   partner: int | None = None, partner_rng: np.random.Generator | None = None):
    """uint8 frames (T, S, S, 3) and uint8 masks (T, S, S) of clip with class ``i``.

    Without ``partner``: masks are 1 on the sounding object, 0 elsewhere. With
    ``partner`` (a second sounding class, :func:`render`'s ``multi``): the distractor is
    replaced by ``partner``'s object (drawn from ``partner_rng``) and the masks are
    class maps, ``i + 1`` on the visible pixels of ``i``'s object, ``partner + 1`` on
    ``partner``'s, 0 elsewhere."""
    v = visual_id(i)
    # Trajectory centres on opposite sides so the two objects rarely overlap.
    side = rng.permutation([0.32, 0.68])
    jitter = rng.uniform(-0.03, 0.03, size=4)
    c_obj = (float(side[0] + jitter[0]), float(0.5 + 0.15 * (1 if side[0] < 0.5 else -1) + jitter[1]))
    c_dis = (float(side[1] + jitter[2]), float(0.5 + 0.15 * (1 if side[1] < 0.5 else -1) + jitter[3]))
    obj = _make_object(rng, visual_identity(v), c_obj)

    pool = [w for w in range(visual_id(classes - 1) + 1) if abs(w - v) > 1]
    u = rng.random()
    distractor = None
    if u < 0.85:  # 15 % of clips have no distractor
        if pool and u < 0.6:
            dis_vis = visual_identity(pool[int(rng.integers(len(pool)))])
        else:
            dis_vis = None
        distractor = _make_object(rng, dis_vis, c_dis)
    object_on_top = rng.random() < 0.5
    value = 1
    if partner is not None:  # the second object sounds too; each object's pixels carry its class
        distractor = _make_object(partner_rng, visual_identity(visual_id(partner)), c_dis)
        value = i + 1

    # Background: low-saturation tinted vertical gradient, fresh pixel noise per frame.
    base = rng.uniform(0.12, 0.35)
    tint = np.asarray(_hsv(rng.random(), rng.uniform(0.0, 0.25), 1.0))
    grad = rng.uniform(-0.12, 0.12)
    ax = (np.arange(size, dtype=np.float32) + 0.5) / size
    xx, yy = np.meshgrid(ax, ax)
    bg = (base + grad * (yy - 0.5))[..., None] * tint

    frames = np.empty((n_frames, size, size, 3), np.uint8)
    masks = np.empty((n_frames, size, size), np.uint8)
    for t in range(n_frames):
        ts = t / fps
        img = bg.copy()
        a_obj, rgb_obj = _draw(obj, ts, xx, yy, size)
        layers = [(a_obj, rgb_obj, value)]
        if distractor is not None:
            a_dis, rgb_dis = _draw(distractor, ts, xx, yy, size)
            layers.insert(0 if object_on_top else 1, (a_dis, rgb_dis, 0 if partner is None else partner + 1))
        visible = np.zeros((size, size), np.uint8)
        for alpha, rgb, label in layers:  # back to front; the mask keeps what stays visible
            img = img * (1 - alpha[..., None]) + rgb * alpha[..., None]
            visible = np.where(alpha >= 0.5, np.uint8(label), visible)
        img += rng.normal(0.0, 0.025, size=img.shape)
        frames[t] = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
        masks[t] = visible
    return frames, masks


# -- rendering: sounds ------------------------------------------------------------
_RHYTHM_EVENTS = {  # (onset, duration) in seconds within a 1-second cycle
    "beat2": ((0.0, 0.25), (0.5, 0.25)),
    "beat4": ((0.0, 0.12), (0.25, 0.12), (0.5, 0.12), (0.75, 0.12)),
    "longshort": ((0.0, 0.45), (0.6, 0.15)),
    "triplet": ((0.0, 0.1), (0.167, 0.1), (0.333, 0.1)),
}
_PARTIALS = {  # (frequency ratio, amplitude)
    "sine": ((1.0, 1.0), (2.0, 0.12)),
    "reed": tuple((k, 1.0 / k) for k in (1, 3, 5, 7, 9, 11)),
    "brass": tuple((k, 1.0 / k) for k in range(1, 11)),
    "bell": ((1.0, 1.0), (2.76, 0.6), (5.40, 0.4), (8.93, 0.25)),
}


def _envelope(rhythm: str, timbre: str, t: np.ndarray, offset: float) -> np.ndarray:
    """Amplitude envelope (L,) of the rhythm pattern shifted by ``offset`` seconds:
    each note has a 5 ms attack and an 8 ms release (bell notes also decay, tau 0.25 s);
    ``steady`` is one note held throughout."""
    if rhythm == "steady":
        return np.ones_like(t)
    env = np.zeros_like(t)
    for k in range(-1, int(math.ceil(t[-1])) + 1):  # 1-second cycles covering the clip
        for on, dur in _RHYTHM_EVENTS[rhythm]:
            rel = t - (k + on + offset)
            inside = (rel >= 0) & (rel < dur + 0.03)
            if not inside.any():
                continue
            r = rel[inside]
            e = np.minimum(1.0, r / 0.005)
            e *= np.where(r > dur, np.exp(-(r - dur) / 0.008), 1.0)
            if timbre == "bell":
                e *= np.exp(-r / 0.25)
            env[inside] = np.maximum(env[inside], e)
    return env


def _render_audio(rng: np.random.Generator, i: int, rate: int, n: int) -> np.ndarray:
    """float32 mono waveform (n,) of clip with class ``i``, peak < 1."""
    aud = audio_identity(audio_id(i))
    t = np.arange(n, dtype=np.float64) / rate
    f0 = aud["pitch_hz"] * (1.0 + rng.uniform(-0.01, 0.01))
    tone = np.zeros(n)
    for ratio, amp in _PARTIALS[aud["timbre"]]:
        f = f0 * ratio
        if f < 0.45 * rate:
            tone += amp * np.sin(2 * math.pi * f * t + rng.uniform(0, 2 * math.pi))
    env = _envelope(aud["rhythm"], aud["timbre"], t, float(rng.uniform(0.0, 1.0)))
    if aud["rhythm"] == "steady":  # a slow tremolo keeps a steady note alive
        env = env * (1.0 - 0.25 * (0.5 + 0.5 * np.sin(2 * math.pi * 5.0 * t + rng.uniform(0, 6.3))))
    sig = tone * env
    sig /= np.sqrt(np.mean(sig**2)) + 1e-9

    # Pink noise: white noise with its amplitude spectrum scaled by 1 / sqrt(f) above 50 Hz.
    spec = np.fft.rfft(rng.normal(size=n))
    freqs = np.fft.rfftfreq(n, 1.0 / rate)
    noise = np.fft.irfft(spec / np.sqrt(np.maximum(freqs, 50.0) / 50.0), n)
    noise /= np.sqrt(np.mean(noise**2)) + 1e-9
    snr_db = rng.uniform(8.0, 20.0)
    out = sig + noise * 10 ** (-snr_db / 20)
    if rng.random() < 0.5:  # faint distractor: a linear sweep between two random frequencies
        f_a, f_b = rng.uniform(150, 3000, size=2)
        ph = 2 * math.pi * (f_a * t + (f_b - f_a) * t**2 / (2 * max(t[-1], 1e-3)))
        out += 0.18 * np.sin(ph) * np.sqrt(2)
    out *= rng.uniform(0.3, 0.6) / (np.max(np.abs(out)) + 1e-9)
    return out.astype(np.float32)


# -- files --------------------------------------------------------------------------
def _write_mp4(path: Path, frames: np.ndarray, audio: np.ndarray, fps: float, rate: int) -> None:
    """H.264 + AAC mp4, deterministic: one x264 thread, fixed options, x264's plain C
    code path (``asm=0``: with SIMD enabled, 96-pixel clips encoded first in a process
    came out differently from run to run), bitexact muxing (no version or time stamps)."""
    import av

    tmp = path.with_name(path.name + ".tmp")
    fps_q = Fraction(fps).limit_denominator(1001)
    with av.open(str(tmp), "w", format="mp4", options={"fflags": "+bitexact"}) as out:
        vs = out.add_stream("libx264", rate=fps_q)
        vs.width = vs.height = frames.shape[1]
        vs.pix_fmt = "yuv420p"
        vs.thread_count = 1
        vs.options = {
            "preset": "veryfast",
            "crf": "18",
            "threads": "1",
            "x264-params": "threads=1:lookahead-threads=1:asm=0",
        }
        as_ = out.add_stream("aac", rate=rate)
        as_.layout = "mono"
        as_.bit_rate = 64000
        for t, img in enumerate(frames):
            fr = av.VideoFrame.from_ndarray(img, format="rgb24")
            fr.pts = t
            out.mux(vs.encode(fr))
        out.mux(vs.encode())
        step = 1024
        for k in range(0, len(audio), step):
            chunk = audio[k:k + step][None, :]
            af = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="flt", layout="mono")
            af.sample_rate = rate
            af.pts = k
            out.mux(as_.encode(af))
        out.mux(as_.encode())
    tmp.replace(path)


def _write_masks(path: Path, masks: np.ndarray) -> None:
    """``np.load``-able npz holding ``masks``, with a fixed zip timestamp (stable bytes)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, masks, allow_pickle=False)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        info = zipfile.ZipInfo("masks.npy", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        z.writestr(info, buf.getvalue())
    tmp.replace(path)


# Bump when the generator's output changes: it is part of every row's render tag, hence of the
# manifest hash and of the key of every feature store built from a render.
GENERATOR_VERSION = 1


def render_tag(classes: int, seed: int, size: int, seconds: float, fps: float, audio_rate: int,
               multi: float = 0.0) -> str:
    """The manifest rows' ``subset``: the generator version and every render parameter that
    changes a clip's content, so that manifests (and the feature-cache keys built on their
    hash) differ with them. ``multi`` appears only when it is not 0 (the single-source
    render's tag predates it)."""
    tag = f"v{GENERATOR_VERSION},classes={classes},seed={seed},size={size},seconds={seconds:g},fps={fps:g},audio_rate={audio_rate}"
    return tag + (f",multi={multi:g}" if multi else "")


def multi_of(subset: str | None) -> float:
    """The ``multi`` fraction of a render tag (0 for a single-source render or no tag)."""
    for part in str(subset or "").split(","):
        if part.startswith("multi="):
            return float(part[len("multi="):])
    return 0.0


def partner_of(i: int, j: int, classes: int, seed: int, multi: float) -> int | None:
    """The second sounding class of clip ``j`` of class ``i`` in a render with ``multi``, or None.

    Drawn from ``default_rng([seed, i, j, 1])`` (a stream of its own, so the clips
    without a partner are the single-source render's clips, byte for byte): with
    probability ``multi``, a class ``k`` uniformly among those whose visual identity
    differs from ``i``'s by more than one (:func:`_render_frames`' distractor rule, so
    the two objects never look alike); None when no class qualifies."""
    if multi <= 0:
        return None
    prng = np.random.default_rng([seed, i, j, 1])
    if prng.random() >= multi:
        return None
    pool = [k for k in range(classes) if abs(visual_id(k) - visual_id(i)) > 1]
    return int(pool[int(prng.integers(len(pool)))]) if pool else None


def _render_clip(job: tuple) -> dict:
    out, i, j, classes, clips_per_class, seed, size, seconds, fps, rate, multi = job
    out = Path(out)
    rng = np.random.default_rng([seed, i, j])
    n_frames = max(1, round(seconds * fps))
    k = partner_of(i, j, classes, seed, multi)
    prng = np.random.default_rng([seed, i, j, 2])
    frames, masks = _render_frames(rng, i, classes, size, n_frames, fps, partner=k, partner_rng=prng)
    audio = _render_audio(rng, i, rate, round(seconds * rate))
    if k is not None:  # the mixture of both sounds, the partner 0.6-1.0 times as loud
        audio = audio + prng.uniform(0.6, 1.0) * _render_audio(prng, k, rate, audio.size)
        audio = (audio * (prng.uniform(0.3, 0.6) / (np.max(np.abs(audio)) + 1e-9))).astype(np.float32)
    elif multi:  # masks of a multi render are class maps: class id + 1 on the sounding object
        masks = masks * np.uint8(i + 1)
    sid, name = sample_id(i, j), class_name(i)
    video = Path("videos") / name / f"{sid}.mp4"
    mask = Path("masks") / f"{sid}.npz"
    _write_mp4(out / video, frames, audio, fps, rate)
    _write_masks(out / mask, masks)
    return {
        "sample_id": sid,
        "dataset": DATASET,
        "split": split_of(j, clips_per_class),
        "label": i if k is None else [i, k],
        "class_name": name if k is None else f"{name};{class_name(k)}",
        "video": video.as_posix(),
        "masks": mask.as_posix(),
        "subset": render_tag(classes, seed, size, seconds, fps, rate, multi),
    }


def default_workers() -> int:
    """CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _already_rendered(out: Path, info: dict) -> bool:
    try:
        if json.loads((out / "synth.json").read_text(encoding="utf-8")) != json.loads(json.dumps(info)):
            return False
        rows = Manifest.load(out / "manifest.jsonl").rows
    except (OSError, ValueError):
        return False
    return len(rows) == info["classes"] * info["clips_per_class"] and all(
        (out / r["video"]).is_file() and (out / r["masks"]).is_file() for r in rows
    )


def render(
    out_dir: str | Path,
    classes: int = 12,
    clips_per_class: int = 20,
    seed: int = 0,
    workers: int | None = None,
    size: int = 96,
    seconds: float = 2.0,
    fps: float = 8,
    audio_rate: int = 16000,
    force: bool = False,
    multi: float = 0.0,
) -> Path:
    """Render the synth dataset into ``out_dir``; returns the manifest path.

    A folder already rendered with the same parameters (its ``synth.json`` equal
    and every clip and mask present) is reused as it is unless ``force``.

    ``classes`` classes x ``clips_per_class`` clips of ``seconds`` s, ``size`` x ``size``
    pixels at ``fps`` frames/s, audio at ``audio_rate`` Hz; ``workers`` processes
    (``None`` = the CPUs available, 1 = in this process). Existing files of the same
    names are overwritten. See the module docstring for the files written.

    ``multi`` (default 0: the single-source dataset) is the probability that a clip
    has a second sounding object (:func:`partner_of`): its distractor is replaced by
    the partner class's object, its audio is the mixture of both classes' sounds, its
    manifest ``label`` is ``[i, k]``, and the masks of every clip of the render are
    class maps (``class id + 1`` on each sounding object, 0 elsewhere) instead of
    binary masks; ``multi`` joins the render tag.

    Worker processes are spawned, so a script calling this with ``workers != 1``
    must guard its entry point (``if __name__ == "__main__":``).
    """
    _check_classes(classes)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"synth: seed must be an integer >= 0, got {seed!r}")
    if clips_per_class < 1:
        raise ValueError(f"synth: clips_per_class must be >= 1, got {clips_per_class}")
    if size < 16 or size % 2:
        raise ValueError(f"synth: size must be an even number of pixels >= 16, got {size}")
    if seconds <= 0 or fps <= 0 or audio_rate < 8000:
        raise ValueError(
            f"synth: need seconds > 0, fps > 0, audio_rate >= 8000; got {seconds}, {fps}, {audio_rate}"
        )
    if not 0.0 <= multi <= 1.0:
        raise ValueError(f"synth: multi must lie in [0, 1], got {multi}")
    if multi and classes > 254:
        raise ValueError(f"synth: a render with multi > 0 stores class id + 1 in uint8 masks, so at most 254 "
                         f"classes; got {classes}")
    out = Path(out_dir)
    info = {
        "dataset": DATASET,
        "generator_version": GENERATOR_VERSION,
        "classes": classes,
        "clips_per_class": clips_per_class,
        "seed": int(seed),
        "size": int(size),
        "seconds": float(seconds),
        "fps": float(fps),
        "audio_rate": int(audio_rate),
        "frames_per_clip": max(1, round(seconds * fps)),
        "masks": "masks/<sample_id>.npz, array 'masks' uint8 (frames, size, size)",
        "class_table": class_table(classes),
    }
    if multi:
        info["multi"] = float(multi)
        info["masks"] = "masks/<sample_id>.npz, array 'masks' uint8 (frames, size, size): class id + 1, 0 background"
    if not force and _already_rendered(out, info):
        return out / "manifest.jsonl"
    for i in range(classes):
        (out / "videos" / class_name(i)).mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    jobs = [
        (str(out), i, j, classes, clips_per_class, int(seed), int(size), float(seconds), float(fps), int(audio_rate),
         float(multi))
        for i in range(classes)
        for j in range(clips_per_class)
    ]
    workers = default_workers() if workers is None else max(1, int(workers))
    workers = min(workers, len(jobs))
    if workers == 1:
        rows = [_render_clip(job) for job in jobs]
    else:
        # spawn: the caller may hold threads (torch) that fork would copy in a broken state.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            rows = list(pool.map(_render_clip, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    manifest_path = Manifest.from_rows(rows, source=str(out / "manifest.jsonl")).save(out / "manifest.jsonl")
    write_protocols(out / "protocols", classes)
    (out / "synth.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return manifest_path


# -- semantic segmentation protocols ---------------------------------------------------
SEM_BACKGROUND = "background"


def sem_shapes(classes: int) -> list[tuple[int, int]]:
    """(base classes, classes per later step) of the ``synth-sem-<base>-<step>`` protocols:
    two thirds of the classes (rounded down) then two steps, and half then one step."""
    _check_classes(classes)
    shapes = []
    base = (2 * classes) // 3
    step = (classes - base) // 2
    if 0 < base < classes and step > 0:
        shapes.append((base, step))
    half = classes // 2
    if 0 < half < classes:
        shapes.append((half, classes - half))
    return list(dict.fromkeys(shapes))


def twin_order(classes: int, later: int) -> tuple[list[int], list[int]] | None:
    """(base classes, later classes) of a *twin* order: each later class looks like a base class.

    Classes ``2k`` and ``2k + 1`` share their visual identity (:func:`visual_id`) and
    differ by sound. The later classes are the odd members of the last ``later`` pairs,
    in index order; the base holds every other class, among them the even twin of
    each later class. None when ``later`` exceeds the number of pairs."""
    _check_classes(classes)
    pairs = classes // 2
    if not 0 < later <= pairs:
        return None
    late = [2 * k + 1 for k in range(pairs - later, pairs)]
    return [i for i in range(classes) if i not in late], late


def sem_protocols(classes: int) -> list[dict]:
    """Semantic segmentation protocols over ``classes`` synth classes.

    ``synth-sem-<base>-<step>``: ``background`` (output channel 0) then the synth
    classes in index order; task 0 = background + the first ``base`` classes, then
    steps of ``step`` classes (classes left over after whole steps are not used).

    ``synth-sem-twin-<base>-<step>``: the same shape in the :func:`twin_order`: every
    class of a later step looks exactly like one base class (a visual twin: same
    colour, shape, texture, motion) and is told apart from it only by its sound.
    The old model then predicts the old twin on the new class's objects (CMR's
    "co-occurrence confusion", the collisions its CSR counts), and a model that
    learns the new class from the picture alone overwrites its twin: the
    modality entanglement CMR is built for. (In index order a later step's classes
    are each other's twins, so nothing old looks like them.)

    The semantic mask of a clip is its sounding object labelled with its class
    (class id + 1, 0 background; :mod:`train.problems_semantic` derives it from the
    stored binary mask and the clip's label, or reads a multi-source render's class
    maps). Overlapped class-incremental with background shift; memory 5 clips per
    class (CMR's budget); ``kind = "semantic"``.
    """
    names = [SEM_BACKGROUND, *class_names(classes)]
    out = []

    def protocol(name: str, order: list[int], base: int, step: int, what: str) -> dict:
        n_steps = (len(order) - base) // step
        ids = [c + 1 for c in order]  # protocol class index = class id + 1 (0 is background)
        tasks = [[0, *ids[:base]]] + [ids[base + s * step: base + (s + 1) * step] for s in range(n_steps)]
        return {
            "name": name, "dataset": DATASET, "classes": names, "tasks": tasks,
            "setting": "CIL", "kind": "semantic", "memory": 0, "memory_per_class": 5, "derived": False,
            "provenance": (f"avcl_core.synth with {classes} classes: semantic masks of the sounding object "
                           f"(class id + 1, 0 background); {what}; base {base} classes + background, then "
                           f"{n_steps} steps of {step}; overlapped CIL with background shift; 5 clips per class"),
        }

    for base, step in sem_shapes(classes):
        out.append(protocol(f"synth-sem-{base}-{step}", list(range(classes)), base, step, "classes in index order"))
    for base, step in sem_shapes(classes):
        twins = twin_order(classes, classes - base)
        if twins is not None and (classes - base) % step == 0:
            first, late = twins
            out.append(protocol(f"synth-sem-twin-{base}-{step}", first + late, base, step,
                                "every later class a visual twin of a base class, told apart by its sound"))
    return out


def write_sem_protocols(directory: str | Path, classes: int) -> list[Path]:
    """Write every protocol of :func:`sem_protocols` as ``<directory>/<name>.json``."""
    return _save_protocols(directory, sem_protocols(classes))
