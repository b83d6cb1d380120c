"""Scale-out benchmark: `download --distributor ray` with 1 and 2 Ray workers against the
local distributor on the same corpus, Ray's overhead per shard, and a model for N nodes.

    python benchmarks/scale.py [--rows 30000] [--shard-size 10000] [--corpus 300] [--repeats 2]

Serves a corpus of photo-like JPEGs (benchmarks/download.py's, 200-1600 px) from its own
process on 127.0.0.1, each URL a distinct row (a query string apart), and downloads it in this
process (the stage's library entry point, so that Ray starts once, before the clock):

1. ``local``: ``--processes 1``, one event loop here;
2. ``ray x1``: ``--distributor ray`` with one Ray worker (the same function in an actor);
3. ``ray x2``: two Ray workers (on a 2-core machine they share the cores with the server).

Runs alternate (local, ray x1, ray x2, local, ...) and the median of ``--repeats`` is kept.
Ray's overhead per shard is ``(ray x1 - local - worker start) / shards``, the worker start
(an actor coming up) measured on its own; it must stay under 2 % of a local shard's time.

Then a model for a cluster from the per-worker figure: CapsFusion-120M's download and encode
time on ``--nodes`` CPU nodes of ``--cores`` cores and ``--gpus`` GPUs, with every assumption
printed beside the figure it feeds.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local cluster on loopback

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from download import build_corpus, start_corpus_server

from vlmdata.pipeline.distributor import usable_cpus
from vlmdata.pipeline.download import DownloadConfig, run_download
from vlmdata.pipeline.fetch import FetchPolicy
from vlmdata.pipeline.ray_distributor import RayOptions

CAPSFUSION_ROWS = 120_000_000


def write_url_list(path: Path, urls: list[str], rows: int) -> None:
    """``rows`` distinct URLs over the served corpus (the server ignores the query string)."""
    column = [f"{urls[i % len(urls)]}?row={i}" for i in range(rows)]
    pq.write_table(pa.table({"image_url": column, "capsfusion": ["a photo"] * rows}), path)


def cpu_seconds() -> float:
    """CPU time of this process and its waited-for children so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)  # fmt: skip
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def download(url_list: Path, out: Path, shard_size: int, ray: RayOptions | None) -> float:
    config = DownloadConfig(
        input=str(url_list), output_dir=str(out), shard_size=shard_size, processes=1,
        quiet=True, ray=ray, fetch=FetchPolicy(allow_private_network=True, timeout=30),
    )  # fmt: skip
    started = time.perf_counter()
    summary = run_download(config)
    elapsed = time.perf_counter() - started
    assert summary.totals["status"].get("success") == summary.totals["rows"], summary.format()
    return elapsed


def worker_start_s() -> float:
    """How long one Ray actor takes to come up (the fixed cost of a Ray run's worker)."""
    import ray

    @ray.remote(num_cpus=1)
    class Probe:
        def ready(self) -> bool:
            return True

    started = time.perf_counter()
    probe = Probe.remote()
    ray.get(probe.ready.remote())
    elapsed = time.perf_counter() - started
    ray.kill(probe)
    return elapsed


def model_cluster(args: argparse.Namespace, per_core: float, mean_bytes: float) -> None:
    """CapsFusion-120M on a stated cluster, from this machine's CPU cost of a row."""
    print("\nModel: CapsFusion-120M on a cluster (assumptions first)")
    print(f"  rows {CAPSFUSION_ROWS:,}; images that download: {args.success:.0%} "
          f"(web URLs die); mean image {mean_bytes / 1e3:.0f} KB (this corpus)")  # fmt: skip
    print(f"  download CPU cost: {per_core:,.0f} rows/s a core (measured here: the local run's "
          "CPU time, the corpus server's not counted; --resize costs ~4x more)")  # fmt: skip
    cpu_bound = per_core * args.cores
    net_bound = args.gbit * 1e9 / 8 / mean_bytes  # images/s; a dead URL costs no bytes
    node = min(cpu_bound, net_bound / args.success)
    print(
        f"  per node ({args.cores} cores, {args.gbit:g} Gbit/s): CPU bound {cpu_bound:,.0f} "
        f"rows/s, network bound {net_bound:,.0f} images/s = {net_bound / args.success:,.0f} "
        f"rows/s -> {node:,.0f} rows/s"
    )
    total = node * args.nodes
    hours = CAPSFUSION_ROWS / total / 3600
    print(
        f"  download on {args.nodes} nodes: {total:,.0f} rows/s -> {hours:.1f} h "
        f"(real hosts answer slower than loopback: add the tail of slow hosts, not modelled)"
    )
    images = CAPSFUSION_ROWS * args.success
    flops = args.gflops_per_image * 1e9
    gpu_rate = args.mfu * args.gpu_tflops * 1e12 / flops
    print(
        f"  encode: {args.model} at {args.gflops_per_image:g} GFLOPs an image, "
        f"{args.gpu_tflops:g} TFLOP/s bf16 a GPU at {args.mfu:.0%} utilisation -> "
        f"{gpu_rate:,.0f} images/s a GPU (not measured here: no GPU)"
    )
    decode_cores = gpu_rate / args.decode_per_core
    print(
        f"  feeding one GPU takes {decode_cores:.0f} cores of JPEG decoding at "
        f"{args.decode_per_core:g} images/s a core (448 px squares)"
    )
    encode_hours = images / (gpu_rate * args.gpus) / 3600
    print(
        f"  encode on {args.gpus} GPUs (--gpus-per-worker 1): {images / 1e6:.0f}M images -> "
        f"{encode_hours:.1f} h"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--corpus", type=int, default=300, help="distinct JPEGs served")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--cores", type=int, default=32, help="cores a CPU node")
    parser.add_argument("--gbit", type=float, default=10.0, help="network a CPU node, Gbit/s")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--success", type=float, default=0.65, help="share of URLs alive")
    parser.add_argument("--model", default="ViT-L-14-336")
    parser.add_argument("--gflops-per-image", type=float, default=191.0)  # ViT-L/14, 577 tokens
    parser.add_argument("--gpu-tflops", type=float, default=312.0)  # A100 bf16 dense peak
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--decode-per-core", type=float, default=150.0)
    args = parser.parse_args()

    import ray

    with tempfile.TemporaryDirectory(prefix="vlmdata-scale-") as tmp_name:
        tmp = Path(tmp_name)
        corpus = build_corpus(Path(tempfile.gettempdir()) / "vlmdata-bench-corpus", args.corpus)
        mean_bytes = statistics.fmean(p.stat().st_size for p in corpus)
        server, urls = start_corpus_server(corpus)
        url_list = tmp / "urls.parquet"
        write_url_list(url_list, urls, args.rows)
        shards = -(-args.rows // args.shard_size)
        ray.init(num_cpus=usable_cpus(), object_store_memory=200 * 1024**2,
                 include_dashboard=False, log_to_driver=False)  # fmt: skip
        print(
            f"{args.rows:,} rows in {shards} shards of {args.shard_size:,}; corpus of "
            f"{len(corpus)} JPEGs, mean {mean_bytes / 1e3:.0f} KB; {usable_cpus()} CPUs"
        )
        modes = {"local": None, "ray x1": RayOptions(workers=1), "ray x2": RayOptions(workers=2)}
        download(url_list, tmp / "warm", args.shard_size, RayOptions(workers=1))  # imports, pools
        shutil.rmtree(tmp / "warm")
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        local_cpu = []
        for repeat in range(args.repeats):
            for mode, options in modes.items():
                out = tmp / f"{mode.replace(' ', '')}-{repeat}"
                cpu = cpu_seconds()
                times[mode].append(download(url_list, out, args.shard_size, options))
                if options is None:
                    local_cpu.append(cpu_seconds() - cpu)
                shutil.rmtree(out)  # a run's images: gigabytes
                print(
                    f"  {mode:7s} run {repeat + 1}: {times[mode][-1]:6.1f} s "
                    f"({args.rows / times[mode][-1]:,.0f} rows/s)",
                    flush=True,
                )
        start = statistics.median(worker_start_s() for _ in range(3))
        server.terminate()
        ray.shutdown()

    median = {mode: statistics.median(values) for mode, values in times.items()}
    local = median["local"]
    print("\nmode      rows/s    vs local")
    for mode, seconds in median.items():
        print(f"{mode:7s} {args.rows / seconds:8,.0f}    {local / seconds:5.2f}x")
    per_shard_local = local / shards
    overhead = (median["ray x1"] - local - start) / shards
    print(f"\nRay worker start: {start:.2f} s a run (once per worker, not per shard)")
    print(
        f"Ray overhead per shard: {overhead * 1e3:+.0f} ms = {overhead / per_shard_local:+.1%} "
        f"of a local {args.shard_size:,}-row shard ({per_shard_local:.1f} s); goal < 2 %"
    )
    model_cluster(args, args.rows / statistics.median(local_cpu), mean_bytes)


if __name__ == "__main__":
    main()
