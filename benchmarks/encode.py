"""Encode benchmark: `vlmdata encode` against the bare model forward, same model, batch, precision.

    python benchmarks/encode.py [--model ViT-B-32] [--images 512] [--batch-size 32] [--device cpu]

Generates 448x448 JPEGs (what `vlmdata preprocess` writes) and measures in one run:

1. the ceiling: ``model.encode_image`` on pre-decoded tensors, batch after batch;
2. ``vlmdata encode`` end to end (a subprocess: interpreter, model load, DataLoader workers,
   decode, forward, placeholder filter, HDF5 writes), and the rate its own summary reports
   (from the first batch on).

Random weights (``--pretrained none``) unless ``--pretrained`` names weights you have.
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

from vlmdata.encode.models import load_clip, resolve_device


def make_corpus(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        small = Image.effect_noise((56, 56), 40 + i % 50).convert("RGB")
        out = io.BytesIO()
        small.resize((448, 448), Image.Resampling.BICUBIC).save(out, "JPEG", quality=95)
        (folder / f"{i:06d}.jpg").write_bytes(out.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--tokens", default="16", help="ViT-B-32's grid is 7x7: 64 would not fit")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = resolve_device(args.device, args.precision)

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        make_corpus(tmp / "images", args.images)

        clip = load_clip(args.model, args.pretrained, device, args.precision)
        batch = torch.randn(args.batch_size, 3, clip.image_size, clip.image_size)
        batch = batch.to(device, clip.dtype)
        batches = max(1, args.images // args.batch_size)
        with torch.inference_mode():
            clip.model.encode_image(batch)  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(batches):
                clip.model.encode_image(batch)
            if device == "cuda":
                torch.cuda.synchronize()
        ceiling = batches * args.batch_size / (time.perf_counter() - started)
        del clip

        command = [sys.executable, "-m", "vlmdata", "encode", str(tmp / "images"), str(tmp / "out"),
                   "--model", args.model, "--pretrained", args.pretrained, "--device", device,
                   "--precision", args.precision, "--batch-size", str(args.batch_size),
                   "--workers", str(args.workers), "--tokens", args.tokens, "--quiet"]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        steady = float(done.stdout.rsplit("(", 1)[1].split(" images/s")[0])

    print(f"{args.model} ({args.pretrained}), {args.images} images, batch {args.batch_size}, "
          f"{args.precision} on {device}, {torch.get_num_threads()} threads, "
          f"{args.workers} workers")  # fmt: skip
    print(f"\n{'run':<42}{'images/s':>10}")
    print(f"{'ceiling: bare encode_image on tensors':<42}{ceiling:>10.1f}")
    print(f"{'vlmdata encode, end to end':<42}{args.images / elapsed:>10.1f}")
    print(f"{'vlmdata encode, its own summary':<42}{steady:>10.1f}")
    print(f"\nvlmdata encode / ceiling = {steady / ceiling:.2f} (steady), "
          f"{args.images / elapsed / ceiling:.2f} (end to end)")  # fmt: skip


if __name__ == "__main__":
    main()
