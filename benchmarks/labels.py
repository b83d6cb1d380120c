"""Labels benchmark: `vlmdata labels classify` against the bare zero-shot math, same chunk size.

    python benchmarks/labels.py [--rows 1000000] [--rss-rows 200000,1000000] [--chunk 4096]
                                [--repeats 1]

``--rows 50000 --rss-rows 20000,50000`` is a quick check.

Writes an encode output of random unit image embeddings at ViT-L-14 width (768, float16) in
shards of 10,000 rows (the default shard size), through the writer the encode stage uses
(tokens are a [N, 1, 1] stub: classify never reads them), and labels it with the default
taxonomy (1,216 descriptions, 8 templates) on CPU. Measured in one run:

1. the ceiling: the matrix product, softmax, top-k and category roll-up on float32 tensors
   already in memory, in the same chunks (``--chunk`` rows at a time within each shard);
2. ``vlmdata labels classify`` end to end (a subprocess, interpreter start to exit: HDF5
   reads, the same math, Arrow tables, parquet and stats writes), and the rate its own
   summary reports (after start-up);
3. peak RSS of ``vlmdata labels classify`` at each of ``--rss-rows`` (it must not grow with
   the row count).

With ``--repeats N`` the ceiling and the classify run alternate N times and the best of each
counts (on a shared machine, the runs least disturbed).

The text embeddings are not encoded: ViT-L-14's text tower would take ~35 min for the default
taxonomy's 9,728 prompts on two CPU cores (256 took 54 s; once per taxonomy, and a GPU takes
seconds). Each output directory is seeded with random unit text embeddings under the cache key
classify looks up, and its plan: the state a run killed right after encoding its text leaves.
What is timed is the labelling alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from vlmdata.encode.store import FeatureShardWriter
from vlmdata.labels.classify import labels_plan
from vlmdata.labels.features import open_features
from vlmdata.labels.taxonomy import load_taxonomy, load_templates, templates_digest
from vlmdata.labels.text import CACHE_FILE, LabelEmbeddings, cache_key, cached_label_embeddings
from vlmdata.pipeline.shards import (
    STAGE_DATA_FILES,
    SUCCESS,
    ShardFiles,
    atomic_write_json,
    check_plan,
    data_sizes,
    read_state_json,
    shard_stats,
    write_parquet_atomic,
)
from vlmdata.pipeline.stats import merge_stats

EMBED_DIM = 768  # ViT-L-14's
SHARD_SIZE = 10_000  # encode's default
LOGIT_SCALE = 100.0  # what CLIP's trained logit scale saturates at
ATTRS = {"model": "ViT-L-14", "pretrained": "random", "embed_dim": EMBED_DIM, "tokens": 1,
         "width": 1, "precision": "fp16"}  # fmt: skip


def write_features(folder: Path, rows: int) -> None:
    """An encode output of ``rows`` random unit embeddings, laid out as the encode stage does."""
    folder.mkdir(parents=True)
    names, stats = [], []
    rng = np.random.default_rng(0)
    for index, start in enumerate(range(0, rows, SHARD_SIZE)):
        files = ShardFiles(folder, name := f"{index:05d}")
        count = min(SHARD_SIZE, rows - start)
        embeds = rng.standard_normal((count, EMBED_DIM), dtype=np.float32)
        embeds /= np.linalg.norm(embeds, axis=1, keepdims=True)
        keys = [f"{start + i:09d}" for i in range(count)]
        writer = FeatureShardWriter(files.data(".h5"), 1, 1, EMBED_DIM, ATTRS)
        writer.append(keys, ["a caption"] * count, np.zeros((count, 1, 1), np.float16),
                      embeds.astype(np.float16))  # fmt: skip
        writer.close()
        records = [{"key": key, "url": f"https://example.com/{key}.jpg", "caption": "a caption",
                    "status": SUCCESS, "error_kind": None, "error": None,
                    "placeholder_similarity": 0.1, "row": i, "source": None}
                   for i, key in enumerate(keys)]  # fmt: skip
        write_parquet_atomic(files.parquet, pa.Table.from_pylist(records))
        shard = shard_stats(name, records, 0.0, None, data_sizes(files, STAGE_DATA_FILES["encode"]))
        atomic_write_json(files.stats, shard)
        names.append(name)
        stats.append(shard)
    atomic_write_json(folder / "plan.json", {"stage": "encode", "input": {"benchmark": rows},
                                             **ATTRS})  # fmt: skip
    atomic_write_json(folder / "stats.json", {**merge_stats(stats), "shard_names": names,
                                              "complete": True})  # fmt: skip


def seed_output(features_dir: Path, out: Path, text: torch.Tensor) -> None:
    """Make ``out`` what a classify run killed just after encoding its text leaves: its plan
    and ``text`` cached under the key classify looks up."""
    features = open_features(features_dir, allow_incomplete=False)
    taxonomy, templates = load_taxonomy(None), load_templates(None)
    out.mkdir()
    check_plan(out, labels_plan(features, taxonomy, templates, top_k=5))
    key = cache_key(features.model, taxonomy.digest, templates_digest(templates))
    cached_label_embeddings(out / CACHE_FILE, key, lambda: LabelEmbeddings(text, LOGIT_SCALE))


def ceiling(text: torch.Tensor, membership: torch.Tensor, rows: int, chunk: int) -> float:
    """Rows/s of the bare math on float32 tensors already in memory, in the chunks classify
    makes (``chunk`` rows at a time within each shard), written into tensors allocated once.
    A pool of 8 input chunks is reused: the cost of a chunk does not depend on its rows."""
    pool = F.normalize(torch.randn(8, chunk, EMBED_DIM), dim=-1)
    cosines, logits, probabilities = (torch.empty(chunk, len(text)) for _ in range(3))
    started = time.perf_counter()
    done = 0
    with torch.inference_mode():
        for shard_start in range(0, rows, SHARD_SIZE):
            shard_rows = min(SHARD_SIZE, rows - shard_start)
            for start in range(0, shard_rows, chunk):
                n = min(chunk, shard_rows - start)
                torch.mm(pool[done % len(pool), :n], text.T, out=cosines[:n])
                torch.mul(cosines[:n], LOGIT_SCALE, out=logits[:n])
                torch.softmax(logits[:n], 1, out=probabilities[:n])
                _, top = probabilities[:n].topk(5, dim=1)
                cosines[:n].gather(1, top[:, :1])
                (probabilities[:n] @ membership).max(dim=1)
                done += 1
    return rows / (time.perf_counter() - started)


# Runs a command and reports its wall time and peak RSS. A child's peak RSS counts its parent's
# as it was when the child was forked: measured from this small process, not the benchmark.
_PROBE = """
import json, resource, subprocess, sys, time
started = time.perf_counter()
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"elapsed": time.perf_counter() - started, "returncode": done.returncode,
                  "stdout": done.stdout, "stderr": done.stderr[-3000:],
                  "maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def classify(features_dir: Path, out: Path, chunk: int) -> tuple[float, float, int]:
    """Run `vlmdata labels classify`: (wall seconds from interpreter start to exit, the rate
    its summary reports, its peak RSS in bytes)."""
    command = [sys.executable, "-m", "vlmdata", "labels", "classify", str(features_dir),
               str(out), "--device", "cpu", "--batch-size", str(chunk), "--quiet"]  # fmt: skip
    probe = subprocess.run([sys.executable, "-c", _PROBE, *command], capture_output=True,
                           text=True, check=True)  # fmt: skip
    done = json.loads(probe.stdout)
    if done["returncode"] != 0:
        raise SystemExit(done["stderr"])
    steady = float(done["stdout"].rsplit("(", 1)[1].split(" images/s")[0])
    return done["elapsed"], steady, done["maxrss"] * 1024


def link_subset(features_dir: Path, folder: Path, rows: int) -> None:
    """An encode output of the first ``rows`` rows of ``features_dir`` (whole shards, linked)."""
    folder.mkdir()
    names = [f"{i:05d}" for i in range(rows // SHARD_SIZE)]
    for name in names:
        for suffix in (".h5", ".parquet", ".stats.json"):
            os.link(features_dir / f"{name}{suffix}", folder / f"{name}{suffix}")
    os.link(features_dir / "plan.json", folder / "plan.json")
    stats = [read_state_json(ShardFiles(folder, name).stats) for name in names]
    atomic_write_json(folder / "stats.json", {**merge_stats(stats), "shard_names": names,
                                              "complete": True})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument(
        "--rss-rows",
        default="200000,1000000",
        help="row counts whose peak RSS is compared (comma-separated)",
    )
    parser.add_argument("--chunk", type=int, default=4096, help="classify's --batch-size")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="ceiling and classify alternately this many times; best of each",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rss_rows = sorted({int(n) for n in args.rss_rows.split(",") if n.strip()})
    if any(n <= 0 or n % SHARD_SIZE for n in [args.rows, *rss_rows]):
        parser.error(f"--rows and --rss-rows take multiples of {SHARD_SIZE:,} (whole shards)")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    taxonomy = load_taxonomy(None)
    text = F.normalize(torch.randn(len(taxonomy.descriptions), EMBED_DIM), dim=-1)
    membership = F.one_hot(torch.tensor(taxonomy.category_ids),
                           len(taxonomy.category_names)).float()  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        largest = max([args.rows, *rss_rows])
        started = time.perf_counter()
        write_features(tmp / "features", largest)
        built = time.perf_counter() - started
        subsets = {largest: tmp / "features"}
        for rows in {args.rows, *rss_rows} - {largest}:
            subsets[rows] = tmp / f"features-{rows}"
            link_subset(tmp / "features", subsets[rows], rows)

        top, end_to_end, steady, peaks = 0.0, 0.0, 0.0, {}
        for repeat in range(args.repeats):
            top = max(top, ceiling(text, membership, args.rows, args.chunk))
            seed_output(subsets[args.rows], out := tmp / f"labels-{repeat}", text)
            elapsed, summary_rate, peaks[args.rows] = classify(subsets[args.rows], out, args.chunk)
            end_to_end, steady = max(end_to_end, args.rows / elapsed), max(steady, summary_rate)
            shutil.rmtree(out)
        for rows in rss_rows:
            if rows not in peaks:
                seed_output(subsets[rows], out := tmp / f"labels-rss-{rows}", text)
                peaks[rows] = classify(subsets[rows], out, args.chunk)[2]

    print(f"{args.rows:,} embeddings ({EMBED_DIM}-d float16, shards of {SHARD_SIZE:,}) x "
          f"{len(taxonomy.descriptions):,} descriptions in {len(taxonomy.category_names)} "
          f"categories, top-5, chunks of {args.chunk}, CPU, {torch.get_num_threads()} threads; "
          f"features written in {built:.0f} s; text embeddings seeded, not encoded; "
          f"best of {args.repeats}")  # fmt: skip
    print(f"\n{'run':<52}{'rows/s':>10}")
    print(f"{'ceiling: matmul+softmax+top-k+roll-up in memory':<52}{top:>10.0f}")
    print(f"{'vlmdata labels classify, end to end':<52}{end_to_end:>10.0f}")
    print(f"{'vlmdata labels classify, its own summary':<52}{steady:>10.0f}")
    print(f"\nvlmdata labels classify / ceiling = {end_to_end / top:.2f} (end to end), "
          f"{steady / top:.2f} (its own summary)")  # fmt: skip
    print(f"\n{'rows':>12}{'peak RSS':>12}")
    for rows in sorted(peaks):
        print(f"{rows:>12,}{peaks[rows] / 2**20:>9.0f} MB")


if __name__ == "__main__":
    main()
