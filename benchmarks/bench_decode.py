"""Decode-only throughput per CPU core, and the decode workers a GPU encoder needs.

Writes media with known properties into a temporary folder, then times
``extract.decode.decode_clip`` in this process with one thread (torch and the decoder):

- **frames**: 8 frames (uniform over the window, resized to 224 px bicubic) of a 10 s
  640x360 25 fps H.264 clip (x264 veryfast, CRF 23, a keyframe at most every 250 frames),
  with each frame decoder (decord, PyAV, and torchcodec when it loads — it is an
  optional import, timed on its own decode + the same resize); and every frame of it
  (``fps=25``) with the default decoder;
- **image sequences**: an AVSBench S4 clip (5 PNG frames, 640x360) and an AVSS v2 clip
  (10 JPEG frames), 1 frame per second, resized to 224 px;
- **audio**: 10 s of 48 kHz stereo AAC to mono at 48 kHz (SAM-Audio's DACVAE) and
  32 kHz (PANN CNN14): PyAV (seek, decode the window, channel mean, libswresample)
  against decord's ``AudioReader`` (what the decoder used before; it decodes the whole track).

Rates are per core: units per CPU second of this process (wall time is also printed; on a
shared machine the two differ). Each setting runs ``--repeats`` times, the fastest kept.

**Decode workers per encoder.** Model FLOPs per unit are counted with
``torch.utils.flop_counter`` on the encoders' modules (meta tensors, nothing is computed;
an FMA counts as 2 FLOPs, as the GPU's peak does; published "GFLOPs" of ViT-B/16 = 17.6 and
CNN14 = 21 are multiply-adds). An encoder running at ``--mfu`` (50 %) of ``--peak-tflops``
(H100/H200 SXM dense bf16: 989) consumes ``peak * mfu / flops`` units per second; the decode
workers (one core each) needed to feed it are that rate divided by the per-core decode rate.

Example::

    python benchmarks/bench_decode.py --record
    python benchmarks/bench_decode.py --repeats 1 --no-flops     # quick look, published FLOPs
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract import decode as dec  # noqa: E402
from extract.encoders.base import Preprocess  # noqa: E402
from results import record_section  # noqa: E402

HEADING = "## decoding (CPU)"
FRAMES_PP = Preprocess(clip_seconds=10.0, frames_per_clip=8, image_size=224, resize="bicubic")
#: multiply-adds x 2 per unit when ``--no-flops`` (counted with this script on the project's modules)
PUBLISHED_GFLOPS = {"vit-b16": 35.1, "pe-core-l14-336": 384.4, "pann-cnn14": 42.3, "dacvae": 486.6}


# -- media ------------------------------------------------------------------------
def _scene(k: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A moving textured frame: gradients that drift, a bouncing square, and sensor-like noise."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x + 3 * k) % 256, (y + 2 * k) % 256, ((x + y) // 2 + 5 * k) % 256], -1).astype(np.int16)
    cx, cy = int((w - 80) * (0.5 + 0.5 * math.sin(k / 17))), int((h - 80) * (0.5 + 0.5 * math.cos(k / 23)))
    img[cy:cy + 80, cx:cx + 80] = (240, 40, 40)
    img += rng.integers(-12, 13, img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_video(path: Path, seconds=10.0, fps=25, size=(360, 640), rate=48000) -> Path:
    """H.264 (x264 defaults, CRF 23) + stereo AAC mp4 of moving textured content and two tones."""
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=Fraction(fps))
        v.height, v.width = size
        v.pix_fmt = "yuv420p"
        v.options = {"crf": "23", "preset": "veryfast"}
        a = c.add_stream("aac", rate=rate)
        a.layout = "stereo"
        for k in range(int(seconds * fps)):
            for p in v.encode(av.VideoFrame.from_ndarray(_scene(k, *size, rng), format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
        t = np.arange(int(seconds * rate)) / rate
        sig = np.stack([0.4 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 660 * t)]).astype(np.float32)
        for s in range(0, sig.shape[1], 1024):
            f = av.AudioFrame.from_ndarray(np.ascontiguousarray(sig[:, s:s + 1024]), format="fltp", layout="stereo")
            f.sample_rate, f.pts = rate, s
            for p in a.encode(f):
                c.mux(p)
        for p in a.encode():
            c.mux(p)
    return path


def write_images(folder: Path, n: int, suffix: str, size=(360, 640)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(_scene(25 * i, *size, rng)).save(folder / f"{i}.{suffix}", quality=90)
    return folder


# -- timing -----------------------------------------------------------------------------
def _best(fn, repeats: int, inner: int) -> tuple[float, float]:
    """(CPU s, wall s) per call of ``fn``: ``inner`` calls per run, fastest of ``repeats`` runs."""
    fn()  # warm up (imports, first open)
    best = (math.inf, math.inf)
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, ((time.process_time() - c0) / inner, (time.perf_counter() - w0) / inner))
    return best


def _check(clip, what):
    if not clip.ok:
        raise SystemExit(f"{what}: decoding failed: {clip.reason}")
    return clip


def torchcodec_reader():
    """A frame reader with torchcodec (optional import) or the reason it cannot be used."""
    try:
        from torchcodec.decoders import VideoDecoder

        def read(path: Path, pp: Preprocess) -> np.ndarray:
            d = VideoDecoder(str(path), device="cpu", num_ffmpeg_threads=1, seek_mode="exact")
            batch = d.get_frames_played_at(dec.sample_times(pp).tolist())
            return dec.resize_frames(batch.data.permute(0, 2, 3, 1).numpy(), pp.image_size, pp.resize)

        return read, ""
    except Exception as e:  # noqa: BLE001 - a missing wheel or missing FFmpeg libraries: report either
        return None, _why(e)


def _why(e: BaseException) -> str:
    """First line of an error, plus the first missing shared library it names (torchcodec lists one per
    FFmpeg version it tried)."""
    import re

    text = str(e).strip()
    libs = sorted(set(re.findall(r"(lib\w+\.so[.\d]*): cannot open shared object file", text)))
    first = text.splitlines()[0][:120] if text else type(e).__name__
    return f"{type(e).__name__}: {first}" + (f" — missing {', '.join(libs[:3])}" if libs else "")


def old_audio(path: Path, rate: int, seconds: float = 10.0) -> np.ndarray:
    """The previous audio path: decord's AudioReader (FFmpeg down-mix, whole-track decode) and a slice."""
    import decord

    ar = decord.AudioReader(str(path), sample_rate=rate, mono=True)
    return ar[0:int(seconds * rate)].asnumpy()[0]


def model_gflops() -> dict[str, float]:
    """GFLOPs (2 x multiply-adds) per unit: a 224 px frame (ViT-B/16), a 336 px frame (PE-Core-L14-336),
    10 s at 32 kHz (CNN14), 10 s at 48 kHz (DACVAE encoder)."""
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    from extract.encoders.dacvae import DacVaeEncoder
    from extract.encoders.pann import VARIANTS as PANN
    from extract.encoders.pann import Cnn14
    from extract.encoders.sam_audio import VARIANTS as SAM

    def count(fn) -> float:
        m = FlopCounterMode(display=False)
        with m:
            fn()
        return m.get_total_flops() / 1e9

    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
        pe = timm.create_model(SAM["base"]["vision"], pretrained=False)
        out = {"vit-b16": count(lambda: vit.forward_features(torch.zeros(1, 3, 224, 224))),
               "pe-core-l14-336": count(lambda: pe(torch.zeros(1, 3, 336, 336)))}
        del vit, pe
        out["pann-cnn14"] = count(lambda: Cnn14(PANN["base"])(torch.zeros(1, 320000)))
        out["dacvae"] = count(lambda: DacVaeEncoder(SAM["base"]["codec"])(torch.zeros(1, 480000)))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs per setting; the fastest is kept (default 3)")
    ap.add_argument("--inner", type=int, default=4, help="decodes per run (default 4)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="GPU dense bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--mfu", type=float, default=0.5, help="fraction of the peak the encoder reaches (0.5)")
    ap.add_argument("--no-flops", action="store_true", help="use the recorded FLOP counts instead of counting")
    ap.add_argument("--record", action="store_true", help="write the tables into benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dec.quiet_decoder_logs()
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        tmp = Path(tmp)
        video = write_video(tmp / "clip360p.mp4")
        s4 = write_images(tmp / "s4" / "clip", 5, "png")
        avss = write_images(tmp / "avss" / "frames", 10, "jpg")
        rep, inner = args.repeats, args.inner

        # frames
        frame_rows = {}
        for name in dec.FRAME_DECODERS:
            cpu, wall = _best(lambda n=name: _check(dec.decode_clip(video, FRAMES_PP, frame_decoder=n), n), rep, inner)
            frame_rows[name] = (cpu, wall)
        tc, why = torchcodec_reader()
        if tc is not None:
            try:
                frame_rows["torchcodec"] = _best(lambda: tc(video, FRAMES_PP), rep, inner)
            except Exception as e:  # noqa: BLE001 - a library that imports but cannot decode
                why = _why(e)
        every = Preprocess(clip_seconds=10.0, fps=25.0, image_size=224, resize="bicubic")
        dense_cpu, dense_wall = _best(lambda: _check(dec.decode_clip(video, every), "every frame"), rep, 1)
        raw = np.stack([_scene(k, 360, 640, np.random.default_rng(k)) for k in range(8)])
        resize_cpu, _ = _best(lambda: dec.resize_frames(raw, 224, "bicubic"), rep, inner)

        say("Frames: 8 frames of a 10 s 640x360 25 fps H.264 clip (x264 CRF 23, keyframe interval <= 250), "
            "resized to 224 px bicubic; one thread.")
        say("")
        say("| frame decoder | CPU ms / clip | wall ms / clip | frames / s per core | vs decord |")
        say("|---|---|---|---|---|")
        base = frame_rows["decord"][0]
        for name, (cpu, wall) in frame_rows.items():
            say(f"| {name} | {1e3 * cpu:.0f} | {1e3 * wall:.0f} | {8 / cpu:.1f} | {base / cpu:.2f}x |")
        say(f"| {dec.DEFAULT_FRAME_DECODER}, every frame (250, fps=25) | {1e3 * dense_cpu:.0f} | "
            f"{1e3 * dense_wall:.0f} | {250 / dense_cpu:.1f} | |")
        say("")
        say(f"Resizing the 8 frames (360p -> 224, bicubic antialias) alone: {1e3 * resize_cpu:.0f} CPU ms "
            f"({100 * resize_cpu / frame_rows['decord'][0]:.0f} % of the decord clip time).")
        say(f"torchcodec: {'timed above' if 'torchcodec' in frame_rows else 'not measured, cannot load here (' + why + ')'}.")
        ratio = frame_rows["decord"][0] / frame_rows["pyav"][0]
        verdict = ("the same speed (within 5 %)" if abs(ratio - 1) < 0.05 else
                   f"{'PyAV' if ratio > 1 else 'decord'} faster by {max(ratio, 1 / ratio):.2f}x")
        say(f"decord vs PyAV here: {verdict}; the default frame decoder is {dec.DEFAULT_FRAME_DECODER}.")
        say("")

        # image sequences
        img_rows = {}
        for label, spec, n in (("AVSBench S4 (5 PNG, 640x360)", s4, 5), ("AVSS v2 (10 JPEG, 640x360)", avss, 10)):
            pp = Preprocess(clip_seconds=float(n), frames_per_clip=n, image_size=224)
            cpu, wall = _best(lambda s=spec, p=pp: _check(dec.decode_clip(None, p, frames=s), label), rep, inner)
            img_rows[label] = (n, cpu, wall)
        say("| image sequence | CPU ms / clip | wall ms / clip | frames / s per core |")
        say("|---|---|---|---|")
        for label, (n, cpu, wall) in img_rows.items():
            say(f"| {label} | {1e3 * cpu:.0f} | {1e3 * wall:.0f} | {n / cpu:.1f} |")
        say("")

        # audio
        audio_rows = {}
        for rate in (48000, 32000):
            pp = Preprocess(clip_seconds=10.0, audio_rate=rate)
            new = _best(lambda p=pp: _check(dec.decode_clip(video, p), "audio"), rep, inner)
            old = _best(lambda r=rate: old_audio(video, r), rep, inner)
            audio_rows[rate] = (new, old)
        say("Audio: 10 s of 48 kHz stereo AAC to mono.")
        say("")
        say("| target rate | PyAV CPU ms / clip | clips / s per core | decord AudioReader CPU ms / clip | speed-up |")
        say("|---|---|---|---|---|")
        for rate, (new, old) in audio_rows.items():
            say(f"| {rate // 1000} kHz | {1e3 * new[0]:.1f} | {1 / new[0]:.0f} | {1e3 * old[0]:.1f} | "
                f"{old[0] / new[0]:.2f}x |")
        say("")

    gflops = dict(PUBLISHED_GFLOPS) if args.no_flops else model_gflops()
    eff = args.peak_tflops * 1e12 * args.mfu
    frame_rate = 8 / frame_rows[dec.DEFAULT_FRAME_DECODER][0]
    dense_rate = 250 / dense_cpu
    s4_rate = img_rows["AVSBench S4 (5 PNG, 640x360)"][0] / img_rows["AVSBench S4 (5 PNG, 640x360)"][1]
    say(f"Decode workers (one core each) to keep one GPU encoder at {100 * args.mfu:.0f} % of "
        f"{args.peak_tflops:g} TFLOP/s dense bf16 (H100/H200 SXM); GFLOPs = 2 x multiply-adds "
        f"({'recorded' if args.no_flops else 'counted by torch.utils.flop_counter on the modules'}).")
    say("")
    say("| encoder | unit | GFLOPs / unit | units / s on the GPU | decoded units / s per core | decode workers |")
    say("|---|---|---|---|---|---|")
    table = [
        ("ViT-B/16 (224)", "frame, 8 per 10 s clip", gflops["vit-b16"], frame_rate),
        ("ViT-B/16 (224)", "frame, AVSBench S4 PNG", gflops["vit-b16"], s4_rate),
        ("ViT-B/16 (224)", "frame, every frame (25 fps)", gflops["vit-b16"], dense_rate),
        ("PE-Core-L14-336", "frame, 8 per 10 s clip", gflops["pe-core-l14-336"], frame_rate),
        ("PANN CNN14", "10 s clip at 32 kHz", gflops["pann-cnn14"], 1 / audio_rows[32000][0][0]),
        ("DACVAE encoder", "10 s clip at 48 kHz", gflops["dacvae"], 1 / audio_rows[48000][0][0]),
    ]
    workers = {}
    for enc, unit, g, per_core in table:
        need = eff / (g * 1e9)
        workers[enc, unit] = need / per_core
        say(f"| {enc} | {unit} | {g:.1f} | {need:,.0f} | {per_core:.1f} | {math.ceil(need / per_core):,} |")
    say("")
    say("PE-Core frames are decoded at 224 px here; at 336 px resizing costs a little more per frame.")

    header = (f"`python benchmarks/bench_decode.py --record`; {platform.machine()}, {os.cpu_count()} CPUs "
              f"(shared; load {os.getloadavg()[0]:.1f}), torch {torch.__version__}, fastest of {args.repeats} "
              f"runs x {args.inner} decodes, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(header)
    if args.record:
        record_section(f"{HEADING}\n\n{header}\n\n" + "\n".join(lines))
    return {"frames": frame_rows, "images": img_rows, "audio": audio_rows, "gflops": gflops, "workers": workers}


if __name__ == "__main__":
    main()
