"""Preprocess benchmark: squaring images to 448², side by side with img2dataset and plain Pillow.

    python benchmarks/preprocess.py [--images 2000] [--processes N] [--img2dataset PATH]

On the download benchmark's corpus (200-1600 px JPEGs, 10 % extreme aspect ratios) served from
127.0.0.1, measures in one run:

1. ``vlmdata download --resize 448`` (fetch, decode, crop/pad, resize, encode);
2. img2dataset ``--image_size 448 --resize_mode center_crop`` at the same process count;
3. ``vlmdata preprocess`` over shards a plain download wrote first (not timed);
4. a naive Pillow loop on one core: full decode, EXIF transpose, crop/pad, resize, encode.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from download import (
    build_corpus,
    ceiling,
    count_tar_images,
    img2dataset_command,
    start_corpus_server,
    timed,
)
from PIL import Image, ImageOps

SIZE = 448


def naive_square(data: bytes) -> bytes:
    """The straightforward way: decode everything, then crop or pad, then resize."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    width, height = image.size
    if min(width, height) / max(width, height) >= 0.6:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    else:
        canvas = Image.new("RGB", (max(width, height),) * 2)
        canvas.paste(image, ((canvas.width - width) // 2, (canvas.height - height) // 2))
        image = canvas
    out = io.BytesIO()
    image.resize((SIZE, SIZE), Image.Resampling.LANCZOS).save(out, "JPEG", quality=95)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--img2dataset", default=shutil.which("img2dataset"), help="executable")
    parser.add_argument("--corpus", default=os.path.join(tempfile.gettempdir(), "vlmdata-corpus"))
    args = parser.parse_args()

    corpus = build_corpus(Path(args.corpus), args.images)
    print(f"corpus: {len(corpus)} JPEGs; processes={args.processes} size={SIZE}")
    server, urls = start_corpus_server(corpus)
    n = len(urls)
    rates: dict[str, float] = {}
    vlmdata = [sys.executable, "-m", "vlmdata"]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        url_list = tmp / "urls.parquet"
        captions = [f"caption {i}" for i in range(n)]
        pq.write_table(pa.table({"image_url": urls, "capsfusion": captions}), url_list)
        asyncio.run(ceiling(urls[:50], args.concurrency))  # warm the server
        common = ["--allow-private-network", "--quiet", "--concurrency", str(args.concurrency),
                  "--shard-size", str(args.shard_size)]  # fmt: skip

        # download --resize: one event loop, squares made by a pool of worker processes
        out = tmp / "resized"
        elapsed, _ = timed([*vlmdata, "download", str(url_list), str(out), *common,
                            "--resize", str(SIZE)])  # fmt: skip
        assert count_tar_images(out) == n
        rates["vlmdata download --resize"] = n / elapsed

        if args.img2dataset:
            out = tmp / "img2dataset"
            command = img2dataset_command(args.img2dataset, url_list, out, args)
            command[command.index("--resize_mode") + 1] = "center_crop"
            command[command.index("--disable_all_reencoding") + 1] = "False"
            command += ["--image_size", str(SIZE)]
            elapsed, _ = timed(command, {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
            assert count_tar_images(out) == n
            rates["img2dataset center_crop"] = n / elapsed
        originals = tmp / "originals"
        timed([*vlmdata, "download", str(url_list), str(originals), *common])
        assert count_tar_images(originals) == n
        server.terminate()
        for processes in sorted({1, args.processes}):
            out = tmp / f"squares-{processes}"
            elapsed, _ = timed([*vlmdata, "preprocess", str(originals), str(out), "--quiet",
                                "--size", str(SIZE), "--processes", str(processes)])  # fmt: skip
            assert count_tar_images(out) == n
            rates[f"vlmdata preprocess ({processes} proc)"] = n / elapsed

        started = time.perf_counter()
        for path in corpus:
            naive_square(path.read_bytes())
        rates["naive Pillow loop (1 proc)"] = n / (time.perf_counter() - started)

    print(f"\n{'run':<34}{'images/s':>10}")
    for name, rate in rates.items():
        print(f"{name:<34}{rate:>10.1f}")
    naive = rates["naive Pillow loop (1 proc)"]
    ours = rates["vlmdata download --resize"]
    if "img2dataset center_crop" in rates:
        print(
            f"\ndownload --resize / img2dataset   = {ours / rates['img2dataset center_crop']:.2f}"
        )
    for processes in sorted({1, args.processes}):
        rate = rates[f"vlmdata preprocess ({processes} proc)"]
        print(f"preprocess ({processes} proc) / naive loop = {rate / naive:.2f}")


if __name__ == "__main__":
    main()
