"""Encode benchmark: `vlmdata encode` against the bare model forward and against its decoding
workers alone, with the same model, batch size, precision and worker count.

    python benchmarks/encode.py                  # CPU: ViT-B-32, batch 32, 512 images, 1 worker
    python benchmarks/encode.py --device cuda    # GPU: ViT-L-14-336, batch 256, 4096 images
    python benchmarks/encode.py --device cpu --model tiny-random-clip --images 64  # a dry run

Generates 448x448 JPEGs (what `vlmdata preprocess` writes) and measures in one run:

1. the ceiling: ``model.encode_image`` on tensors already on the device, batch after batch, in
   the run's precision (``auto``: bf16 or fp16 autocast on a GPU, fp32 on CPU);
2. the decoding alone: the DataLoader `vlmdata encode` builds (same workers, chunks and
   shared memory), read to the end with no model: how fast the workers can feed the model;
3. ``vlmdata encode`` end to end (a subprocess: interpreter, model load, DataLoader workers,
   decode, forward, placeholder filter, HDF5 writes), and the rate its own summary reports
   (from the first batch on).

The slower of 1 and 2 bounds 3: the last line says which. On CPU the workers and the forward
share the cores, so 2 is only an upper bound there. Random weights (``--pretrained none``)
unless ``--pretrained`` names weights you have; the placeholder filter is off (with random
weights every image looks like a placeholder, and the summary counts only the images kept).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from vlmdata.encode.models import LoadedClip, load_clip, resolve_device, resolve_precision
from vlmdata.encode.stage import image_loader, loader_shape
from vlmdata.errors import UserError
from vlmdata.pipeline.image_sources import find_image_shards
from vlmdata.pipeline.imageops import SquareOptions

# Per device: model, batch size, images, decoding workers (cuda: the CLI's default).
DEFAULTS = {
    "cpu": ("ViT-B-32", 32, 512, 1),
    "cuda": ("ViT-L-14-336", 256, 4096, min(4, os.cpu_count() or 1)),
}
_DISTINCT_IMAGES = 64  # the corpus repeats these: decoding costs the same, generating less


def make_corpus(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    distinct = []
    for i in range(min(count, _DISTINCT_IMAGES)):
        small = Image.effect_noise((56, 56), 40 + i % 50).convert("RGB")
        out = io.BytesIO()
        small.resize((448, 448), Image.Resampling.BICUBIC).save(out, "JPEG", quality=95)
        distinct.append(out.getvalue())
    for i in range(count):
        (folder / f"{i:06d}.jpg").write_bytes(distinct[i % len(distinct)])


def bare_forward(clip: LoadedClip, batch_size: int, batches: int) -> float:
    """images/s of ``encode_image`` alone, on tensors already on the device."""
    size = clip.image_size
    batch = torch.randn(batch_size, 3, size, size).to(clip.device, clip.dtype)
    autocast = torch.autocast(clip.device, dtype=clip.autocast, enabled=clip.autocast is not None)
    with torch.inference_mode(), autocast:
        for _ in range(2):  # warm-up: kernel selection, caches
            clip.model.encode_image(batch)
        _synchronize(clip.device)
        started = time.perf_counter()
        for _ in range(batches):
            clip.model.encode_image(batch)
        _synchronize(clip.device)
    return batches * batch_size / (time.perf_counter() - started)


def decoding_alone(folder: Path, image_size: int, workers: int, batch_size: int, device: str):
    """images/s of the DataLoader vlmdata encode builds for these flags, read with no model."""
    shape = loader_shape(workers, batch_size, image_size)
    options = SquareOptions(size=image_size)
    started = time.perf_counter()
    images = 0
    for shard in find_image_shards(folder, shard_size=10_000):
        loader = image_loader(shard, options, 100_000_000, shape, pin_memory=device == "cuda")
        for chunk in loader:
            images += 0 if chunk.images is None else len(chunk.images)
    return images / (time.perf_counter() - started)


def vlmdata_encode(folder: Path, out: Path, args: argparse.Namespace, device: str):
    """(end-to-end images/s, the images/s of its own summary) of the CLI in a subprocess."""
    command = [sys.executable, "-m", "vlmdata", "encode", str(folder), str(out),
               "--model", args.model, "--pretrained", args.pretrained, "--device", device,
               "--precision", args.precision, "--batch-size", str(args.batch_size),
               "--workers", str(args.workers), "--tokens", args.tokens, "--quiet",
               "--no-placeholder-filter"]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    steady = float(done.stdout.rsplit("(", 1)[1].split(" images/s")[0])
    return args.images / elapsed, steady


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--model", help="default: ViT-B-32 on CPU, ViT-L-14-336 on a GPU")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--images", type=int, help="default: 512 on CPU, 4096 on a GPU")
    parser.add_argument("--batch-size", type=int, help="default: 32 on CPU, 256 on a GPU")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--workers", type=int, help="default: 1 on CPU, min(4, cores) on a GPU")
    parser.add_argument("--tokens", help="default: 64, or 16 when the patch grid is under 8x8")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        device = resolve_device(args.device, args.precision)
        precision = resolve_precision(args.precision, device)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    model, batch_size, images, workers = DEFAULTS[device]
    args.model = args.model or model
    args.batch_size = args.batch_size or batch_size
    args.images = args.images or images
    args.workers = workers if args.workers is None else args.workers

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        make_corpus(tmp / "images", args.images)
        clip = load_clip(args.model, args.pretrained, device, precision)
        args.tokens = args.tokens or ("64" if clip.grid >= 8 else "16")
        ceiling = bare_forward(clip, args.batch_size, max(1, args.images // args.batch_size))
        image_size = clip.image_size
        del clip
        if device == "cuda":
            torch.cuda.empty_cache()  # the subprocess needs the GPU's memory
        decoding = decoding_alone(tmp / "images", image_size, args.workers, args.batch_size,
                                  device)  # fmt: skip
        end_to_end, steady = vlmdata_encode(tmp / "images", tmp / "out", args, device)

    where = torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPU cores"
    workers = f"{args.workers} decoding worker{'s' if args.workers != 1 else ''}"
    print(f"{args.model} ({args.pretrained}), {args.images} images at {image_size} px, batch "
          f"{args.batch_size}, {precision} on {device} ({where}), {torch.get_num_threads()} "
          f"threads, {workers}")  # fmt: skip
    rows = [
        ("ceiling: bare encode_image on tensors", ceiling),
        (f"decoding alone: {workers}, no model", decoding),
        ("vlmdata encode, end to end", end_to_end),
        ("vlmdata encode, its own summary", steady),
    ]
    print(f"\n{'run':<46}{'images/s':>10}")
    for name, rate in rows:
        print(f"{name:<46}{rate:>10.1f}")
    print(f"\nvlmdata encode / ceiling = {steady / ceiling:.2f} (steady), "
          f"{end_to_end / ceiling:.2f} (end to end)")  # fmt: skip
    if decoding < ceiling:
        print(f"bound by the decoding: the workers feed {decoding:.0f} images/s, the forward "
              f"takes {ceiling:.0f}; more --workers (cores permitting) would help")  # fmt: skip
    else:
        print(f"bound by the forward: the workers could feed {decoding:.0f} images/s, the "
              f"forward takes {ceiling:.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
