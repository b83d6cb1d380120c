"""Train benchmark: the trainer's optimizer step fed from the HDF5 feature shards against the same
step fed from batches already in memory; same model, batch size and number of steps, one run.

    python benchmarks/train.py                           # CPU: tiny-random-llama, batch 16
    python benchmarks/train.py --device cuda --real-size # GPU: a 0.5B Llama-shaped LLM, bf16
    python benchmarks/train.py --steps 8 --repeats 1     # a dry run

The corpus is generated JPEGs with captions of 4-24 words, encoded by the encode stage
(``tiny-random-clip``; with ``--real-size``, ViT-L-14-336 with random weights) and cached
under ``--work``. ``--real-size`` trains against a Llama-shaped LLM with random weights (hidden
1024, 24 blocks, 16 heads, 4 KV heads, MLP 4096, a 128,256-token tied vocabulary: 0.5B
parameters), also cached; its tokenizer is ByT5's byte tokenizer (no files), so captions are
a token per byte, longer than a BPE tokenizer makes them. Measured in one run, in short windows
alternating ``--repeats`` times (the best of each counts: the least disturbed on a shared
machine; the ratio of each pair shows the noise):

1. from HDF5: the micro-batches of the trainer's own loader (FeatureDataset, EpochBatches,
   collate, ``--workers`` DataLoader processes, pinned memory on a GPU);
2. in memory: the same batches, collated (and pinned) beforehand into a list;

both through the trainer's own optimizer step (forward, loss, backward, clipping, AdamW,
schedule), after a few warm-up steps. Then ``--split-steps`` more steps from HDF5 with the step
cut into data wait, forward, backward and optimizer (CUDA synchronised at each cut), and the
peak memory: RSS of this process and of the largest DataLoader worker, and on a GPU the peak
allocated memory of each path.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import resource
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import cycle, islice
from pathlib import Path

import torch
from PIL import Image

from vlmdata.encode.models import resolve_device, resolve_precision
from vlmdata.encode.stage import EncodeConfig, run_encode
from vlmdata.errors import UserError
from vlmdata.pipeline.shards import read_state_json
from vlmdata.train.data import Batch, EpochBatches, FeatureDataset, collate
from vlmdata.train.distributed import Distributed
from vlmdata.train.trainer import TrainConfig, Trainer

# Per device: batch size, steps per repeat, DataLoader workers.
DEFAULTS = {"cpu": (16, 16, 1), "cuda": (32, 25, 4)}
REAL_SIZE_LLAMA = {
    "vocab_size": 128_256,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
    "rope_theta": 500_000.0,
    "tie_word_embeddings": True,
}
_WARMUP_STEPS = 3
_PREFETCH = 4  # batches the trainer's DataLoader keeps ready per worker (its prefetch_factor)
_DISTINCT_IMAGES = 32  # the corpus repeats these: the features' size is what counts here
_WORDS = "a red blue green small large circle square triangle on under the white wooden table"


def make_images(folder: Path, count: int) -> None:
    """``count`` 128 px JPEGs ``NNNNNN.jpg``, each with a caption ``NNNNNN.txt``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    distinct = []
    for i in range(_DISTINCT_IMAGES):
        out = io.BytesIO()
        Image.effect_noise((128, 128), 20 + i).convert("RGB").save(out, "JPEG", quality=90)
        distinct.append(out.getvalue())
    for i in range(count):
        (folder / f"{i:06d}.jpg").write_bytes(distinct[i % len(distinct)])
        caption = " ".join(rng.choices(_WORDS.split(), k=rng.randint(4, 24)))
        (folder / f"{i:06d}.txt").write_text(caption)


def encoded_corpus(work: Path, encoder: str, images: int, device: str) -> Path:
    """The encode output of ``images`` generated images with ``encoder`` (random weights),
    made once per (encoder, images) and kept in ``work``. Encoded in this process with no
    DataLoader workers: this process's only children are then the trainer's workers."""
    features = work / f"features-{encoder}-{images}"
    if (read_state_json(features / "stats.json", missing_ok=True) or {}).get("complete"):
        return features
    source = work / f"images-{images}"
    shutil.rmtree(source, ignore_errors=True)
    make_images(source, images)
    print(f"encoding {images} images with {encoder} into {features} (once)", flush=True)
    run_encode(
        EncodeConfig(
            input_dir=str(source),
            output_dir=str(features),
            model=encoder,
            pretrained="none",
            device=device,
            workers=0,
            placeholder_filter=False,
            shard_size=1000,
            quiet=True,
        )
    )
    shutil.rmtree(source)
    return features


def real_size_llm(work: Path, device: str) -> Path:
    """A local model directory: the 0.5B Llama-shaped LLM with seeded random weights (bf16) and
    ByT5's byte tokenizer, made once and kept in ``work``."""
    folder = work / "llama-0.5b-random"
    if (folder / "config.json").is_file():
        return folder
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    print(f"building the 0.5B random Llama in {folder} (once)", flush=True)
    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **REAL_SIZE_LLAMA,
    )
    torch.manual_seed(0)
    with torch.device(device):  # random initialisation of 0.5B weights: fast on a GPU
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = work / ".llama-0.5b-random.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def build_trainer(config: TrainConfig, device: str, precision: str) -> Trainer:
    """The trainer `vlmdata train` runs (features, examples, LLM, projector, optimizer,
    schedule), in one process, without its loop."""
    Path(config.out).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    return Trainer(config, Path(config.out), device, precision, Distributed(0, 1, 0, device))


def memory_batches(trainer: Trainer, start: int, count: int, pin: bool) -> list[Batch]:
    """Micro-batches ``start`` to ``start + count`` of the trainer's epoch 0 (the ones its loader
    yields there), collated now."""
    config = trainer.config
    dataset = FeatureDataset(
        trainer.files, trainer.examples.train, trainer.text, list(config.prompts), None, config.seed
    )
    order = EpochBatches(len(dataset), config.batch_size, config.seed, epoch=0)
    batches = []
    for indices in islice(order, start, start + count):
        batch = collate(dataset.__getitems__(indices), trainer.text.pad_id, config.padding_side)
        if pin:
            batch = Batch(
                **{
                    k: v.pin_memory() if isinstance(v, torch.Tensor) else v
                    for k, v in vars(batch).items()
                }
            )
        batches.append(batch)
    return batches


@dataclass
class Rate:
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    cuda_peak: int = 0  # bytes

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def train_steps(trainer: Trainer, batches: Iterator[Batch], steps: int) -> Rate:
    """``steps`` optimizer steps of the trainer on ``batches``, timed; tokens are sequence
    positions (image slots included), as the trainer's tokens/s counts them."""
    rate = Rate()
    if trainer.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step = [next(batches) for _ in range(trainer.config.grad_accum)]
        trainer.optimizer_step(step)  # ends with .item(): the GPU has finished the step
        rate.samples += sum(len(b.keys) for b in step)
        rate.tokens += sum(int(b.attention_mask.sum()) for b in step)
    rate.seconds = time.perf_counter() - started
    if trainer.device == "cuda":
        rate.cuda_peak = torch.cuda.max_memory_allocated()
    return rate


def step_split(trainer: Trainer, batches: Iterator[Batch], steps: int) -> dict[str, float]:
    """Seconds per optimizer step in data wait, forward, backward (with loss scaling and
    clipping) and the optimizer, cut by forward and optimizer hooks."""
    sync = torch.cuda.synchronize if trainer.device == "cuda" else lambda: None
    marks: dict[str, float] = {}
    spent = dict.fromkeys(("data wait", "forward", "backward", "optimizer"), 0.0)

    def start(name: str):
        def hook(*_: object) -> None:
            sync()
            marks[name] = time.perf_counter()

        return hook

    def stop(name: str):
        def hook(*_: object) -> None:
            sync()
            spent[name] += time.perf_counter() - marks[name]

        return hook

    handles = [
        trainer.model.register_forward_pre_hook(start("forward")),
        trainer.model.register_forward_hook(stop("forward")),
        trainer.optimizer.register_step_pre_hook(start("optimizer")),
        trainer.optimizer.register_step_post_hook(stop("optimizer")),
    ]
    total = 0.0
    try:
        for _ in range(steps):
            sync()
            started = time.perf_counter()
            step = [next(batches) for _ in range(trainer.config.grad_accum)]
            spent["data wait"] += time.perf_counter() - started
            trainer.optimizer_step(step)
            total += time.perf_counter() - started
    finally:
        for handle in handles:
            handle.remove()
    spent["backward"] = total - sum(spent.values())
    return {name: seconds / steps for name, seconds in spent.items()}


@dataclass
class Results:
    from_disk: list[Rate]
    in_memory: list[Rate]
    split: dict[str, float]
    in_memory_bytes: int


def measure(trainer: Trainer, steps: int, repeats: int, split_steps: int) -> Results:
    """Alternately ``steps`` steps from HDF5 and the same steps' batches from memory,
    ``repeats`` times, then the split of ``split_steps`` steps from HDF5."""
    accum = trainer.config.grad_accum
    settle = _settle_steps(trainer.config.workers, accum)
    starts = [(_WARMUP_STEPS + r * (settle + steps) + settle) * accum for r in range(repeats)]
    in_ram = [
        memory_batches(trainer, start, steps * accum, trainer.device == "cuda") for start in starts
    ]
    from_disk = trainer.micro_batches()
    train_steps(trainer, from_disk, _WARMUP_STEPS)  # starts the workers
    train_steps(trainer, cycle(in_ram[0]), _WARMUP_STEPS)
    disk_runs, ram_runs = [], []
    for batches in in_ram:
        train_steps(trainer, from_disk, settle)
        disk_runs.append(train_steps(trainer, from_disk, steps))
        ram_runs.append(train_steps(trainer, iter(batches), steps))
    split = step_split(trainer, from_disk, split_steps) if split_steps else {}
    from_disk.close()  # ends the DataLoader: its workers' peak RSS counts from here on
    size = sum(
        t.nbytes
        for window in in_ram
        for b in window
        for t in vars(b).values()
        if isinstance(t, torch.Tensor)
    )
    return Results(disk_runs, ram_runs, split, size)


def _settle_steps(workers: int, accum: int) -> int:
    """Untimed steps before each HDF5 window: they use up the batches the workers read ahead
    while the in-memory window ran, so the window sees the loader's steady state."""
    return -(-_PREFETCH * workers // accum)


def steps_from_disk(steps: int, repeats: int, split_steps: int, workers: int, accum: int) -> int:
    """Micro-batches :func:`measure` reads from HDF5."""
    settle = _settle_steps(workers, accum)
    return (_WARMUP_STEPS + repeats * (settle + steps) + split_steps) * accum


def report(trainer: Trainer, results: Results, args: argparse.Namespace, precision: str) -> None:
    device, llm = trainer.device, trainer.model.llm
    params = sum(p.numel() for p in llm.parameters()) / 1e6
    where = torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPU cores"
    workers = f"{args.workers} DataLoader worker{'s' if args.workers != 1 else ''}"
    print(
        f"\n{Path(trainer.config.llm).name} ({params:.1f}M parameters, --train-llm "
        f"{args.train_llm}), {args.projector} projector; features: {args.encoder}, "
        f"{trainer.files.tokens} tokens x {trainer.files.width}, "
        f"{len(trainer.examples.train)} examples; {trainer.text.slots} image positions"
    )
    print(
        f"batch {args.batch_size} x {args.grad_accum}, {args.steps} steps x {args.repeats} "
        f"repeats (the best counts), {precision} on {device} ({where}), "
        f"{torch.get_num_threads()} threads, {workers}"
    )
    best = {
        name: max(runs, key=lambda r: r.samples_per_s)
        for name, runs in (
            ("from HDF5 (the trainer's DataLoader)", results.from_disk),
            ("in memory (the same batches)", results.in_memory),
        )
    }
    print(f"\n{'run':<40}{'samples/s':>11}{'tokens/s':>12}{'ms/step':>10}")
    for name, rate in best.items():
        print(
            f"{name:<40}{rate.samples_per_s:>11.1f}{rate.tokens_per_s:>12.0f}"
            f"{1000 * rate.seconds / args.steps:>10.1f}"
        )
    disk, ram = best.values()
    pairs = [
        d.samples_per_s / r.samples_per_s
        for d, r in zip(results.from_disk, results.in_memory, strict=True)
    ]
    print(
        f"\nfrom HDF5 / in memory = {disk.samples_per_s / ram.samples_per_s:.2f} (goal >= 0.9); "
        f"window by window: {' '.join(f'{p:.2f}' for p in pairs)} "
        f"(median {statistics.median(pairs):.2f})"
    )
    if results.split:
        parts = ", ".join(f"{name} {1000 * s:.1f}" for name, s in results.split.items())
        print(f"step from HDF5 ({args.split_steps} steps, ms each): {parts}")
    children = (
        f"largest DataLoader worker {_peak_rss_mib(resource.RUSAGE_CHILDREN):.0f} MiB "
        "(pages shared with this process included)"
        if args.workers
        else "no workers"
    )
    print(
        f"peak RSS: this process {_peak_rss_mib(resource.RUSAGE_SELF):.0f} MiB (in-memory "
        f"batches {results.in_memory_bytes / 2**20:.0f} MiB of it), {children}"
    )
    if device == "cuda":
        peaks = [
            max(r.cuda_peak for r in runs) / 2**30
            for runs in (results.from_disk, results.in_memory)
        ]
        print(
            f"peak GPU memory allocated: from HDF5 {peaks[0]:.2f} GiB, in memory {peaks[1]:.2f} GiB"
        )


def _peak_rss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--precision", default="auto")
    parser.add_argument(
        "--real-size",
        action="store_true",
        help="the 0.5B Llama-shaped LLM, ViT-L-14-336 features (for a GPU)",
    )
    parser.add_argument("--llm", help="default: tiny-random-llama, the 0.5B one with --real-size")
    parser.add_argument("--encoder", help="default: tiny-random-clip, ViT-L-14-336 (--real-size)")
    parser.add_argument("--projector", default="mlp2x_gelu")
    parser.add_argument("--train-llm", default="none", help="none, full or lora")
    parser.add_argument("--batch-size", type=int, help="default: 16 on CPU, 32 on a GPU")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, help="per repeat; default: 16 on CPU, 25 on a GPU")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--split-steps", type=int, default=16)
    parser.add_argument("--workers", type=int, help="default: 1 on CPU, 4 on a GPU")
    parser.add_argument(
        "--work",
        default=Path(tempfile.gettempdir()) / "vlmdata-train-bench",
        help="where the corpus and the 0.5B LLM are kept between runs",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", message=".*random weights")
    from transformers.utils import logging

    logging.disable_progress_bar()  # loading and saving the LLM
    try:
        device = resolve_device(args.device, args.precision)
        precision = resolve_precision(args.precision, device)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    batch_size, steps, workers = DEFAULTS[device]
    args.batch_size = args.batch_size or batch_size
    args.steps = args.steps or steps
    args.workers = workers if args.workers is None else args.workers
    args.encoder = args.encoder or ("ViT-L-14-336" if args.real_size else "tiny-random-clip")
    # Examples enough for one epoch to hold every step: a DataLoader restarts once an epoch,
    # and a real epoch is far longer than this benchmark.
    micro = steps_from_disk(
        args.steps, args.repeats, args.split_steps, args.workers, args.grad_accum
    )
    images = int(micro * args.batch_size * 1.05) + 64

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    features = encoded_corpus(work, args.encoder, images, device)
    llm = args.llm or (str(real_size_llm(work, device)) if args.real_size else "tiny-random-llama")
    out = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    config = TrainConfig(
        features=(str(features),),
        llm=llm,
        out=str(out),
        projector=args.projector,
        train_llm=args.train_llm,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_steps=10**9,
        warmup=0,
        precision=precision,
        device=device,
        workers=args.workers,
        val_fraction=0.0,
        quiet=True,
    )
    try:
        trainer = build_trainer(config, device, precision)
        results = measure(trainer, args.steps, args.repeats, args.split_steps)
        trainer.metrics.close()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    report(trainer, results, args, precision)


if __name__ == "__main__":
    main()
