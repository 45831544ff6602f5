"""Ground-truth masks of segmentation datasets, aligned to the frames an encoder samples.

For a manifest row of a segmentation dataset (:data:`SEG_DATASETS`) and the
encoder's :class:`~extract.encoders.base.Preprocess`, :func:`read_masks` returns

* ``masks`` uint8 (F, S, S): 1 on the sounding object's pixels of each of the F
  sampled frames, 0 elsewhere (``F = preprocess.num_frames``, ``S = spec.size``);
* ``valid`` uint8 (F,): 1 where that frame has a ground-truth mask.

Frame ``k`` is the frame :mod:`extract.decode` samples at ``t_k`` (its
:func:`~extract.decode.sample_times` and :func:`~extract.decode.frame_indices`
are used here, so masks and features always describe the same picture):

* ``synth``: ``masks/<id>.npz`` holds one mask per video frame, frame ``i`` shown
  from ``i / fps`` (``fps`` from the row's render tag ``subset``); every sampled
  frame has ground truth. A multi-source render (``multi=`` in the tag) stores
  class maps, kept as class maps (:data:`CLASS_MAP_FORMAT`).
* AVSBench S4 / MS3 (image folders): the frame images ``…_<k>.png`` (the row's
  ``frames`` glob, natural name order, as decoded) and the masks ``…_<k>.png`` (the row's
  ``masks`` glob) are paired by their trailing number ``k``. A sampled frame whose
  number has no mask file has no ground truth: S4 train clips annotate only
  ``_1``, so only the frame sampled from image 1 is valid.

Resolution: masks are binarised (AVSBench PNGs: grey value > 127, as PIL's
mode-``'1'`` conversion of 0/255 images in the official loaders; synth: nonzero)
and resized nearest-neighbour to ``S x S`` (no crop, like the frames). The store
default is :data:`DEFAULT_MASK_SIZE` (224, AVSBench's official loaders) for
AVSBench and the render size for synth; ``avcl-extract -o mask_size=N`` declares
another. The :class:`MaskSpec` is part of the store's key material.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from avcl_core.cache import CLASS_MAP_FORMAT, MASK_FORMAT, PALETTE_FORMAT
from extract.encoders.base import Preprocess

#: Datasets whose stores carry ``masks`` / ``mask_valid`` arrays.
SEG_DATASETS = ("avsbench-s4", "avsbench-ms3", "synth")
DEFAULT_MASK_SIZE = 224
_NUMBER = re.compile(r"(\d+)$")


class MaskError(ValueError):
    """A mask file that cannot be read or aligned; the message names the sample and file."""


@dataclass(frozen=True)
class MaskSpec:
    """What a store's ``masks`` array holds: ``frames`` masks of ``size`` x ``size`` per row."""

    size: int
    frames: int
    format: str = MASK_FORMAT

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MaskSpec":
        return cls(int(d["size"]), int(d["frames"]), str(d.get("format", MASK_FORMAT)))

    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Extra store arrays: name -> (per-row shape, dtype)."""
        return {"masks": ((self.frames, self.size, self.size), "uint8"), "mask_valid": ((self.frames,), "uint8")}


def _resolve(root, p: str) -> Path:
    return Path(p) if os.path.isabs(p) else Path(root) / p


def _synth_fps(row: dict) -> float:
    m = re.search(r"(?:^|,)fps=([0-9.eE+-]+)", str(row.get("subset") or ""))
    if not m:
        raise MaskError(f"sample {row.get('sample_id')!r}: its subset {row.get('subset')!r} does not give the "
                        "render fps (a synth manifest row carries fps=… in its render tag)")
    return float(m.group(1))


def _load_npz(path: Path, sid: str) -> np.ndarray:
    try:
        with np.load(path) as z:
            arr = np.asarray(z["masks"])
    except FileNotFoundError:
        raise MaskError(f"sample {sid!r}: mask file {path} not found") from None
    except Exception as e:  # noqa: BLE001 - any unreadable npz is reported the same way
        raise MaskError(f"sample {sid!r}: mask file {path} cannot be read ({type(e).__name__}: {e})") from None
    if arr.ndim != 3 or arr.shape[0] == 0:
        raise MaskError(f"sample {sid!r}: {path} holds masks of shape {arr.shape}; expected (frames, H, W)")
    return arr


def _synth_multi(row: dict) -> bool:
    """Whether a synth row comes from a multi-source render (``multi=`` in its render tag)."""
    from avcl_core.synth import multi_of

    return multi_of(row.get("subset")) > 0


def default_mask_size(row: dict) -> int:
    """The store default for a row's dataset: synth's render size (``size=`` of its render
    tag), else :data:`DEFAULT_MASK_SIZE`."""
    if row.get("dataset") == "synth":
        m = re.search(r"(?:^|,)size=(\d+)", str(row.get("subset") or ""))
        if m:
            return int(m.group(1))
    return DEFAULT_MASK_SIZE


def mask_spec_for(manifest, preprocess: Preprocess, dataset: str | None = None,
                  mask_size: int | None = None) -> MaskSpec | None:
    """The masks a store of ``manifest`` x an encoder with ``preprocess`` carries, or None.

    None when the dataset is not a segmentation dataset, the encoder samples no
    frames, or the manifest rows give no ``masks``.
    """
    dataset = dataset or manifest.dataset
    if dataset not in SEG_DATASETS + SEMANTIC_DATASETS or preprocess.num_frames <= 0 or len(manifest) == 0:
        return None
    first = next((r for r in manifest.rows if r.get("masks")), None)
    if first is None:
        return None
    size = int(mask_size) if mask_size else default_mask_size(first)
    if size < 1:
        raise MaskError(f"mask_size must be >= 1, got {size}")
    if dataset in SEMANTIC_DATASETS:
        fmt = PALETTE_FORMAT
    elif dataset == "synth" and _synth_multi(first):
        fmt = CLASS_MAP_FORMAT
    else:
        fmt = MASK_FORMAT
    return MaskSpec(size=size, frames=preprocess.num_frames, format=fmt)


def _resize_nearest(m: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of binary (H, W) to (size, size): source pixel floor((i + 0.5) * H / size)."""
    h, w = m.shape
    if (h, w) == (size, size):
        return m
    ri = np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
    ci = np.minimum(((np.arange(size) + 0.5) * w / size).astype(np.int64), w - 1)
    return m[ri[:, None], ci[None, :]]


def _numbered(paths: list[str]) -> dict[int, str]:
    out = {}
    for p in paths:
        m = _NUMBER.search(Path(p).stem)
        if m:
            out.setdefault(int(m.group(1)), p)
    return out


def _read_png(path: str, sid: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return (np.asarray(im.convert("L")) > 127).astype(np.uint8)
    except Exception as e:  # noqa: BLE001 - PIL raises several types for a bad image
        raise MaskError(f"sample {sid!r}: mask {path} cannot be read ({type(e).__name__}: {e})") from None


def _natural_key(path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", Path(path).name)]


def _image_folder_frames(row: dict, root) -> list[str]:
    """Frame image paths in the order :mod:`extract.decode` reads them (natural name order)."""
    from extract.decode import IMAGE_SUFFIXES

    pattern = str(row.get("frames") or row.get("video"))
    try:
        from avcl_core.manifest import image_sequence  # the manifest's own definition, where it has one
    except ImportError:
        image_sequence = None
    if image_sequence is not None:
        return [str(f) for f in image_sequence(pattern, root)]
    p = _resolve(root, pattern)
    if any(c in pattern for c in "*?["):
        files = [f for f in glob.glob(str(p)) if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    elif p.is_dir():
        files = [str(f) for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        files = []
    return sorted(files, key=_natural_key)


def read_masks(row: dict, root, spec: MaskSpec, preprocess: Preprocess) -> tuple[np.ndarray, np.ndarray]:
    """(masks uint8 (F, S, S), valid uint8 (F,)) of one manifest row; see the module docstring.

    Raises :class:`MaskError` naming the sample and file when a mask cannot be read.
    """
    from extract.decode import frame_indices, sample_times

    if spec.format == PALETTE_FORMAT:
        return read_semantic_masks(row, root, spec, preprocess)
    sid = row.get("sample_id")
    F, S = spec.frames, spec.size
    if F != preprocess.num_frames:
        raise MaskError(f"mask spec has {F} frames but the encoder samples {preprocess.num_frames}")
    start = float(row.get("start") or 0.0)
    end = row.get("end")
    limit_end = start + float(preprocess.clip_seconds)
    if end is not None:
        limit_end = min(limit_end, float(end))
    times = sample_times(preprocess, start)
    masks = np.zeros((F, S, S), dtype=np.uint8)
    valid = np.zeros(F, dtype=np.uint8)
    src = str(row.get("masks") or "")
    if not src:
        return masks, valid
    if src.endswith(".npz"):
        arr = _load_npz(_resolve(root, src), sid)
        fps = _synth_fps(row)
        starts = np.arange(arr.shape[0]) / fps
        idx = frame_indices(times, starts, min(limit_end, arr.shape[0] / fps))
        class_map = spec.format == CLASS_MAP_FORMAT
        for k, i in enumerate(idx.tolist()):
            masks[k] = _resize_nearest(arr[i].astype(np.uint8) if class_map else (arr[i] != 0).astype(np.uint8), S)
        valid[:] = 1
        return masks, valid
    return _image_folder_masks(row, root, src, masks, valid, times, start, end, limit_end, _read_png)


def _image_folder_masks(row: dict, root, src: str, masks: np.ndarray, valid: np.ndarray, times: np.ndarray,
                        start: float, end, limit_end: float, read) -> tuple[np.ndarray, np.ndarray]:
    """Fill ``masks``/``valid`` of an image-folder row: the frame decoded at each sampled time
    gets the mask file with its trailing number (``read(path, sample_id)`` reads one file)."""
    from extract.decode import IMAGE_FOLDER_FPS, frame_indices

    sid = row.get("sample_id")
    S = masks.shape[-1]
    frames = _image_folder_frames(row, root)
    if not frames:
        raise MaskError(f"sample {sid!r}: no frame images for {row.get('frames') or row.get('video')!r} under {root}")
    mask_files = _numbered(sorted(glob.glob(str(_resolve(root, src)))) if any(c in src for c in "*?[")
                           else [str(_resolve(root, src))])
    step = (float(end) - start) / len(frames) if end is not None and float(end) > start else 1.0 / IMAGE_FOLDER_FPS
    starts = start + np.arange(len(frames)) * step
    idx = frame_indices(times, starts, min(limit_end, start + len(frames) * step))
    cache: dict[int, np.ndarray] = {}
    for k, i in enumerate(idx.tolist()):
        m = _NUMBER.search(Path(frames[i]).stem)
        number = int(m.group(1)) if m else None
        if number is None or number not in mask_files:
            continue
        if number not in cache:
            cache[number] = _resize_nearest(read(mask_files[number], sid), S)
        masks[k] = cache[number]
        valid[k] = 1
    return masks, valid


def spec_of_store(store) -> MaskSpec | None:
    """The :class:`MaskSpec` recorded in a store's key material, or None."""
    d = store.key_material.get("masks")
    return MaskSpec.from_dict(d) if d else None


# -- semantic (palette-index) masks ----------------------------------------------------------
#: Datasets whose stores carry palette-index semantic masks (format :data:`PALETTE_FORMAT`).
SEMANTIC_DATASETS = ("avss",)
#: Palette index of pixels that are not any class (unknown colour, or the dataset's own ignore value).
PALETTE_IGNORE = 255


def _read_palette_png(path: str, sid: str) -> np.ndarray:
    """Palette indices (H, W) uint8 of one semantic mask.

    A single-channel image (PIL mode ``P``, ``L``, ``I``) holds the indices itself. A
    colour image (AVSS ``labels_rgb``) is mapped back through the VOC palette the
    dataset is drawn with (:func:`avcl_core.builders.avsbench.voc_palette`), by exact
    colour; a colour that is no palette entry becomes :data:`PALETTE_IGNORE`.
    """
    from PIL import Image

    from avcl_core.builders.avsbench import voc_palette

    try:
        with Image.open(path) as im:
            if im.mode in ("P", "L", "I", "I;16"):
                a = np.asarray(im if im.mode in ("P", "L") else im.convert("I"))
                if a.size and (a.min() < 0 or a.max() > 255):
                    raise MaskError(f"sample {sid!r}: mask {path} holds index {int(a.max())} outside 0..255")
                return a.astype(np.uint8)
            rgb = np.asarray(im.convert("RGB"), dtype=np.int64)
    except MaskError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises several types for a bad image
        raise MaskError(f"sample {sid!r}: mask {path} cannot be read ({type(e).__name__}: {e})") from None
    pal = voc_palette(256).astype(np.int64)
    codes = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    lut = {int(c): i for i, c in enumerate(codes[:PALETTE_IGNORE])}
    px = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    uniq, inv = np.unique(px, return_inverse=True)
    idx = np.array([lut.get(int(c), PALETTE_IGNORE) for c in uniq], dtype=np.uint8)
    return idx[inv].reshape(px.shape)


def read_semantic_masks(row: dict, root, spec: MaskSpec, preprocess: Preprocess) -> tuple[np.ndarray, np.ndarray]:
    """(masks uint8 (F, S, S) of palette indices, valid uint8 (F,)) of one AVSS-style row.

    Frames and masks are paired as for AVSBench S4/MS3 (:func:`read_masks`): the
    frame images in the order they are decoded and the mask files (the row's
    ``masks`` glob) by trailing number, so ``frames/3.jpg`` goes with ``3.png``; a
    sampled frame without a mask file has no ground truth (AVSS v1s train clips
    annotate only frame 0). Indices: 0 background, ``1..K`` the classes (the AVSS
    builder's class ids), :data:`PALETTE_IGNORE` not any class
    (:func:`_read_palette_png`); resized nearest-neighbour to ``S x S``.
    """
    from extract.decode import sample_times

    F, S = spec.frames, spec.size
    if F != preprocess.num_frames:
        raise MaskError(f"mask spec has {F} frames but the encoder samples {preprocess.num_frames}")
    masks = np.zeros((F, S, S), dtype=np.uint8)
    valid = np.zeros(F, dtype=np.uint8)
    src = str(row.get("masks") or "")
    if not src:
        return masks, valid
    start = float(row.get("start") or 0.0)
    end = row.get("end")
    limit_end = start + float(preprocess.clip_seconds)
    if end is not None:
        limit_end = min(limit_end, float(end))
    return _image_folder_masks(row, root, src, masks, valid, sample_times(preprocess, start), start, end, limit_end,
                               _read_palette_png)
