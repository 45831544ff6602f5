"""Shared plumbing of the pretrained encoders: seeded random init, reading weight
files, strict state-dict loading with named errors, input checks and autocast.
"""
from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch

from .base import CheckpointError, check_keys


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the body with the CPU RNG seeded to ``seed`` and restore the caller's RNG afterwards.

    Random-init weights are built on the CPU inside this block, so the same seed always
    gives the same weights whatever else the process has drawn before.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def _numpy_globals() -> list:
    """Globals that pickled numpy arrays and scalars need, under both numpy 1.x and 2.x names.

    Training checkpoints such as PANN's store a data sampler holding numpy arrays next to
    the weights; these reconstructors only rebuild arrays, so allowing them keeps
    ``torch.load(weights_only=True)`` safe while letting such files load.
    """
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed: list = [np.ndarray, np.dtype]
    for name in ("_reconstruct", "scalar"):
        fn = getattr(core, name)
        allowed += [(fn, f"numpy.core.multiarray.{name}"), (fn, f"numpy._core.multiarray.{name}")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def read_state_file(path: str | Path, *, trust: bool = False) -> Mapping:
    """Read a weights file into a (possibly nested) dict of tensors, on the CPU.

    ``.safetensors`` files are read with safetensors. Other files go through
    ``torch.load(weights_only=True, mmap=True)`` with numpy's array reconstructors
    allowed. A file that still needs other Python objects is refused with a
    :class:`CheckpointError` unless ``trust=True``, which unpickles it fully
    (only for files from a source you trust: unpickling can run code).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                # legacy (non-zip) torch.save format cannot be memory-mapped
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: the file holds Python objects beyond tensors and numpy arrays, so it is not "
            f"loaded by default ({str(err).splitlines()[-1].strip()[:200]}). If you trust its source, "
            "pass trust_checkpoint=True."
        ) from err


def unwrap(state: Mapping, *wrappers: str) -> Mapping:
    """Descend into the first wrapper key present (e.g. ``'model'``, ``'state_dict'``)."""
    for key in wrappers:
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            return state[key]
    return state


def load_checked(module: torch.nn.Module, state: Mapping[str, torch.Tensor], path) -> None:
    """Copy ``state`` into ``module``, all or nothing.

    Raises :class:`CheckpointError` naming the missing / unexpected keys, or the keys whose
    shapes differ, before any weight is changed.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    check_keys(path, missing, unexpected)
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
             for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise CheckpointError(
            f"{path}: checkpoint does not match the encoder: {len(wrong)} keys with other shapes "
            f"(e.g. {'; '.join(wrong[:8])}) — is it the right variant?")
    module.load_state_dict(state, strict=True)


def autocast(device: torch.device, amp: str | None):
    """bf16/fp16 autocast on CUDA; a no-op elsewhere (CPU runs stay float32)."""
    if device.type == "cuda" and amp:
        return torch.autocast("cuda", dtype=getattr(torch, amp))
    return contextlib.nullcontext()


def compute_precision(device: torch.device, amp: str | None) -> str:
    """What the numbers are computed in, for the cache key: ``'float32'`` or ``'<amp>-autocast'``."""
    return f"{amp}-autocast" if device.type == "cuda" and amp else "float32"


AMP_CHOICES = (None, "bfloat16", "float16")


def check_amp(amp: str | None) -> str | None:
    if amp in ("none", ""):
        amp = None
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp={amp!r}: choose one of {AMP_CHOICES}")
    return amp


def frames_to_batch(frames: torch.Tensor, size: int, mean: float, std: float) -> torch.Tensor:
    """(B, T, S, S, 3) uint8 RGB → (B*T, 3, S, S) float32, ``(x/255 - mean) / std``.

    Raises ``ValueError`` when the frames are not the size the encoder declared.
    """
    if frames is None:
        raise ValueError("this encoder needs video frames, got frames=None")
    if frames.ndim != 5 or frames.shape[-1] != 3 or frames.shape[2] != size or frames.shape[3] != size:
        raise ValueError(
            f"frames must be (B, T, {size}, {size}, 3) uint8 RGB as declared by preprocess.image_size; "
            f"got {tuple(frames.shape)}")
    if frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    x = frames.flatten(0, 1).permute(0, 3, 1, 2).float()
    return (x / 255.0 - mean) / std


def check_audio(audio: torch.Tensor | None) -> torch.Tensor:
    """Audio must be (B, L) float mono; returns it as float32."""
    if audio is None:
        raise ValueError("this encoder needs audio, got audio=None")
    if audio.ndim != 2:
        raise ValueError(f"audio must be (B, L) mono samples, got shape {tuple(audio.shape)}")
    return audio.float()


def weights_id(checkpoint, seed: int) -> str:
    """``'sha256:<hex>'`` of the weights file, or ``'random-init:<seed>'``."""
    from .base import file_sha256

    return f"sha256:{file_sha256(checkpoint)}" if checkpoint else f"random-init:{int(seed)}"
