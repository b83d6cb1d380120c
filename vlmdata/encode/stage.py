"""The encode stage: image shards in, HDF5 feature shards out (DESIGN.md, "encode").

Per image shard: the main process indexes the shard (a tar's member headers, or a folder's
files) and DataLoader workers each read, decode and square their own runs of consecutive
samples (the crop/pad rule of preprocess, at the model's input size), so every input byte is
read once; they hand back uint8 pixels, and the main process normalises them on the device and
regroups them into forward batches. One forward pass gives the pooled patch tokens and the
CLIP embedding; images too close to a placeholder reference are left out; a writer thread
appends the rest to ``NNNNN.h5``. ``NNNNN.parquet`` has a row per
input sample (success, placeholder or failed_to_decode, with the placeholder similarity) and
``NNNNN.stats.json`` marks the shard done. A killed run redoes only its unfinished shards.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info

from vlmdata import __version__
from vlmdata.encode.features import PatchFeatures, token_grid_side
from vlmdata.encode.models import LoadedClip, load_clip, resolve_device, resolve_precision
from vlmdata.encode.placeholders import builtin_placeholders, load_references
from vlmdata.encode.store import FeatureShardWriter
from vlmdata.errors import MachineFailure, UserError, require_at_least, require_finite
from vlmdata.pipeline.distributor import Progress, die_with_parent
from vlmdata.pipeline.image_sources import ImageShard, SampleRef, expected_samples
from vlmdata.pipeline.imageops import SquareOptions, make_square
from vlmdata.pipeline.ray_distributor import RayOptions, on_cluster, worker_count
from vlmdata.pipeline.runner import (
    Stage,
    check_output_location,
    check_ownership,
    input_location,
    output_location,
    run_stage,
)
from vlmdata.pipeline.shards import (
    PLACEHOLDER,
    PLAN,
    RECORD_SCHEMA,
    STAGE_DATA_FILES,
    SUCCESS,
    ShardFiles,
    atomic_write_json,
    data_sizes,
    duplicate_fields,
    read_state_json,
    shard_stats,
    write_parquet_atomic,
)
from vlmdata.pipeline.stats import RunSummary
from vlmdata.pipeline.upstream import (
    check_tar_complete,
    expected_keys,
    input_marker,
    open_image_input,
)

# For real CLIP weights: re-encodings of one image score above ~0.95, unrelated images well
# below 0.9. Tune it from placeholder_similarity_histogram in the stats (README, "Placeholders").
DEFAULT_PLACEHOLDER_THRESHOLD = 0.92

ENCODE_SCHEMA = pa.schema(
    [
        RECORD_SCHEMA.field(name)
        for name in ("key", "url", "caption", "status", "error_kind", "error")
    ]
    + [
        ("placeholder_similarity", pa.float32()),
        ("row", pa.int32()),  # index in NNNNN.h5, for rows that are in it
        ("source", pa.string()),
    ]
)


@dataclass
class EncodeConfig:
    """Everything `vlmdata encode` takes; the CLI flags map one to one."""

    input_dir: str
    output_dir: str
    model: str = "ViT-L-14-336"
    pretrained: str = "openai"
    layer: int = -2
    tokens: str = "64"
    batch_size: int = 64
    device: str = "auto"
    precision: str = "auto"
    workers: int = 4
    references: tuple[str, ...] = ()
    placeholder_threshold: float = DEFAULT_PLACEHOLDER_THRESHOLD
    placeholder_filter: bool = True
    square: SquareOptions = field(default_factory=lambda: SquareOptions(size=448))
    max_pixels: int = 100_000_000
    shard_size: int = 10_000  # plain image folders only
    allow_incomplete: bool = False  # take the finished shards of an unfinished upstream
    quiet: bool = False
    ray: RayOptions | None = None  # --distributor ray: Ray actors, one model each

    def __post_init__(self) -> None:
        require_at_least(1, batch_size=self.batch_size, max_pixels=self.max_pixels,
                         shard_size=self.shard_size)  # fmt: skip
        require_at_least(0, workers=self.workers)
        require_finite("--placeholder-threshold", self.placeholder_threshold, -1, 1)
        if self.references and not self.placeholder_filter:
            raise UserError("--reference has no effect with --no-placeholder-filter; drop one")


def run_encode(config: EncodeConfig) -> RunSummary:
    """Encode every image of ``config.input_dir`` into HDF5 shards under ``config.output_dir``."""
    out, remote = output_location(config.output_dir, inputs=(config.input_dir,))
    source, cache = input_location(config.input_dir, "INPUT_DIR", lazy=(".tar", ".parquet"))
    images = open_image_input(source, config.shard_size, config.allow_incomplete)
    if remote is None:  # user mistakes first: before the model loads
        check_output_location(out, [source])
    check_ownership(out, "encode", remote)
    # A worker's decoding processes are its CPUs: Ray places workers by what they use.
    ray = config.ray and replace(config.ray, cpus_per_worker=1 + config.workers)
    device, precision = _resolve_for_workers(config, ray)
    if config.precision == "auto" and remote is None:  # before the model loads
        _check_auto_precision(out, images.fingerprint, precision, device)
    references = {} if not config.placeholder_filter else {
        **builtin_placeholders(), **load_references(list(config.references))
    }  # fmt: skip
    # Loaded here for what the cache records; on Ray the workers load their own copies.
    here, here_precision = (device, precision) if ray is None else ("cpu", "fp32")
    clip = load_clip(config.model, config.pretrained, here, here_precision)
    features = PatchFeatures(clip, config.layer, token_grid_side(config.tokens, clip))
    attrs = _attributes(config, clip, features, references, precision)
    work = EncodeWork(replace(config, ray=None), device, precision, attrs, references, str(out))
    if ray is None:
        work.loaded = _ShardEncoder(config, clip, features, attrs, references)
    stage = Stage(
        name="encode",
        output_dir=out,
        # The square options by their flags first: a refused resume names what changed.
        plan={
            "stage": "encode",
            "input": images.fingerprint,
            "pad_threshold": config.square.pad_threshold,
            "fill": list(config.square.fill),
            "max_pixels": config.max_pixels,
            # A weights file is the same weights wherever it lies: its sha256 is compared,
            # not its path (moved, or named relative to another directory, it still resumes).
            **{k: v for k, v in attrs.items() if k != "pretrained" or not attrs["weights_sha256"]},
        },
        inputs=[source],
        data_files=STAGE_DATA_FILES["encode"],
        planned_shards=[shard.name for shard in images.shards],
        unit="img",
        total_rows=expected_samples(images.shards),
        quiet=config.quiet,
        partial_input=images.partial,
        input_markers={shard.name: input_marker(shard) for shard in images.shards},
        before_complete=lambda out, names, stats: _write_manifest(out, names, stats, attrs),
        run_files=("manifest.json",),
        remote=remote,
        input_cache=cache,
        ray=ray,
    )
    return run_stage(stage, lambda stage: images.shards, work)


def _resolve_for_workers(config: EncodeConfig, ray: RayOptions | None) -> tuple[str, str]:
    """The device and precision the encoding runs with: here, or on Ray's workers (``auto``
    precision on a GPU is what such a worker resolves, whatever this machine has)."""
    device = resolve_device(config.device, config.precision, ray and ray.gpus_per_worker)
    if ray is None:
        return device, resolve_precision(config.precision, device)
    worker_count(ray)  # before the model loads: a cluster without the CPUs or GPUs asked for
    if device == "cuda" and config.precision == "auto":
        return device, on_cluster(resolve_precision, "auto", "cuda", gpus=ray.gpus_per_worker)
    return device, resolve_precision(config.precision, device)


@dataclass
class EncodeWork:
    """The encode stage's work: a model in this process (loaded on first use: a Ray worker
    loads its own), shard after shard."""

    config: EncodeConfig
    device: str
    precision: str
    attrs: dict
    references: dict[str, bytes]
    out: str
    loaded: _ShardEncoder | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "loaded": None}  # a worker loads the model itself

    def __call__(self, shards: Iterator[ImageShard], progress: Progress) -> None:
        if self.loaded is None:
            self.loaded = self._load()
        for shard in shards:  # one model in this process: shards one after another
            self.loaded.encode(shard, Path(self.out), progress)

    def _load(self) -> _ShardEncoder:
        config = self.config
        clip = load_clip(config.model, config.pretrained, self.device, self.precision)
        features = PatchFeatures(clip, config.layer, token_grid_side(config.tokens, clip))
        made = _attributes(config, clip, features, self.references, self.precision)
        if made != self.attrs:  # another vlmdata or weights on this worker: not one cache
            changed = next(k for k in self.attrs if made.get(k) != self.attrs[k])
            raise UserError(
                f"a Ray worker's {config.model} differs from the driver's in "
                f"{changed}; install the same vlmdata and weights on every node"
            )
        return _ShardEncoder(config, clip, features, self.attrs, self.references)


def _check_auto_precision(out: Path, input_fingerprint: dict, precision: str, device: str) -> None:
    """Refuse to resume an output in another precision than it was made with because
    ``--precision auto`` resolves differently here (another GPU, or none): one cache, one
    precision. The flag that goes on with it is named."""
    previous = read_state_json(out / PLAN, missing_ok=True)
    if previous is None or previous.get("input") != input_fingerprint:
        return  # a new output, or another input: the plan check says what is wrong
    before = previous.get("precision")
    if before in (None, precision):
        return
    fix = (
        "resume it on a GPU (fp16 does not run on CPU)"
        if before == "fp16" and device == "cpu"
        else f"pass --precision {before} to go on with it"
    )
    raise UserError(
        f"{out} was made with --precision {before}, and --precision auto means {precision} "
        f"on this machine ({device}); {fix}, or use another directory"
    )


def _attributes(
    config: EncodeConfig,
    clip: LoadedClip,
    features: PatchFeatures,
    references: dict,
    precision: str,
) -> dict:
    """What the HDF5 root attributes (and the plan) record: enough to reuse the cache."""
    return {
        "model": clip.name,
        "pretrained": clip.pretrained,
        "weights_sha256": clip.weights_sha256,
        "layer": features.layer,
        "layer_requested": config.layer,
        "tokens": features.side**2,
        "source_grid": clip.grid,
        "token_grid": features.side,
        "width": clip.width,
        "embed_dim": clip.embed_dim,
        "image_size": clip.image_size,
        "patch_size": clip.patch_size,
        "image_mean": list(clip.mean),
        "image_std": list(clip.std),
        "preprocessing": (
            f"EXIF orientation, RGB (alpha on fill {','.join(map(str, config.square.fill))}), "
            f"crop if min/max side >= {config.square.pad_threshold} else pad, "
            f"Lanczos resize to {clip.image_size}, normalize mean/std"
        ),
        "precision": precision,  # resolved: what auto became on this machine
        "placeholder_threshold": config.placeholder_threshold if references else None,
        "placeholder_references": sorted(references),
        "vlmdata_version": __version__,
    }


class DecodedChunk(NamedTuple):
    """A run of consecutive samples of a shard, decoded and squared on a worker."""

    items: list[dict]  # per sample, in order: what its parquet row needs, and "decoded"
    images: torch.Tensor | None  # uint8 [n, 3, S, S]: the decoded items' squares, in order
    # A UserError's one line (a tar cut since it was indexed), passed as data: raised from a
    # worker, DataLoader would wrap it in the worker's traceback.
    error: str | None = None


@dataclass(frozen=True)
class LoaderShape:
    """How the decoding is spread: worker processes, images per chunk, chunks per worker in
    flight (their pixels wait in shared memory, /dev/shm)."""

    workers: int
    chunk: int
    prefetch: int | None  # None without workers


_CHUNK_IMAGES = 16  # a worker's unit: a short sequential read, 5 MB of pixels at 336 px
_SHM_SHARE = 0.5  # of the free /dev/shm, what the chunks in flight may take


def loader_shape(workers: int, batch_size: int, image_size: int) -> LoaderShape:
    """The decoding for ``workers`` processes feeding forward batches of ``batch_size``: two
    batches in flight, fewer when /dev/shm cannot hold them, and decoding in this process
    (with a warning) when it cannot hold one image per worker."""
    chunk = min(batch_size, _CHUNK_IMAGES)
    if workers == 0:
        return LoaderShape(0, chunk, None)
    prefetch = min(8, max(2, math.ceil(2 * batch_size / (workers * chunk))))
    free = _shm_free_bytes()
    if free is None:
        return LoaderShape(workers, chunk, prefetch)
    per_worker = int(free * _SHM_SHARE) // (3 * image_size**2) // workers  # images each
    if per_worker < 1:
        warnings.warn(
            f"/dev/shm has only {_size(free)} free, too little to pass images between "
            "processes: decoding in the main process instead (slower); raise the container's "
            "--shm-size (e.g. docker run --shm-size=2g) to decode on --workers processes",
            stacklevel=2,
        )
        return LoaderShape(0, chunk, None)
    chunk = min(chunk, per_worker)
    return LoaderShape(workers, chunk, max(1, min(prefetch, per_worker // chunk)))


def _shm_free_bytes() -> int | None:
    """Free bytes in /dev/shm, where DataLoader workers put the tensors they pass (None when
    there is no /dev/shm to measure)."""
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def _size(count: int) -> str:
    return f"{count >> 20} MB" if count >= 1 << 20 else f"{count >> 10} KB"


def image_loader(
    shard: ImageShard,
    options: SquareOptions,
    max_pixels: int,
    shape: LoaderShape,
    pin_memory: bool = False,
) -> DataLoader:
    """The shard's images decoded and squared by ``options``, as :class:`DecodedChunk` in shard
    order. The shard is indexed here, once; each worker reads only its own runs."""
    refs = shard.index()
    runs = [refs[i : i + shape.chunk] for i in range(0, len(refs), shape.chunk)]
    workers = min(shape.workers, len(runs))  # a small shard forks no idle worker
    return DataLoader(
        _SquaredImages(shard, runs, options, max_pixels), batch_size=None,
        num_workers=workers, worker_init_fn=partial(_decoding_worker, parent=os.getpid()),
        pin_memory=pin_memory, prefetch_factor=shape.prefetch if workers else None,
    )  # fmt: skip


class _SquaredImages(Dataset):
    """A shard's samples in runs of consecutive ones: item i is run i, read and decoded."""

    def __init__(
        self, shard: ImageShard, runs: list[list[SampleRef]], options: SquareOptions,
        max_pixels: int,
    ) -> None:  # fmt: skip
        self.shard, self.runs, self.options, self.max_pixels = shard, runs, options, max_pixels

    def __len__(self) -> int:
        return len(self.runs)

    def __getitem__(self, index: int) -> DecodedChunk:
        try:
            return self._decode(self.runs[index])
        except UserError as e:
            return DecodedChunk([], None, str(e))

    def _decode(self, run: list[SampleRef]) -> DecodedChunk:
        items, squares = [], []
        for sample in self.shard.read(run):
            item = {"key": sample.key, "caption": sample.caption or "", "decoded": False,
                    "url": sample.meta.get("url"), "source": sample.source}  # fmt: skip
            if sample.duplicate:  # the first of a repeated key is kept: no decode
                items.append({**item, **duplicate_fields()})
                continue
            result, square = make_square(sample.image, self.options, self.max_pixels)
            items.append({**item, "decoded": square is not None, "status": result.status,
                          "error_kind": result.error_kind, "error": result.error})  # fmt: skip
            if square is not None:
                squares.append(pixels(square))
        return DecodedChunk(items, _shared(torch.stack(squares)) if squares else None)


def _shared(images: torch.Tensor) -> torch.Tensor:
    """``images`` in shared memory when on a worker: a full /dev/shm then fails here, where
    the loader reports it, not in the queue's feeder thread, which would drop the chunk."""
    return images.share_memory_() if get_worker_info() is not None else images


def pixels(square: Image.Image) -> torch.Tensor:
    """An RGB Pillow image -> its pixels ``[3, H, W]`` uint8 (a view of a copy of its bytes)."""
    data = torch.frombuffer(bytearray(square.tobytes()), dtype=torch.uint8)
    return data.view(square.height, square.width, 3).permute(2, 0, 1)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 pixels ``[..., 3, H, W]`` -> the model's input: scaled to [0, 1], minus the mean,
    over the std (``mean``/``std`` shaped ``[3, 1, 1]``), in float32."""
    return (images / 255.0 - mean) / std


def _forward_batches(
    chunks: Iterable[DecodedChunk], size: int, to_input: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[tuple[list[dict], list[dict], torch.Tensor | None]]:
    """Regroup the chunks into forward batches of ``size`` decoded images (the last may hold
    fewer): (items that did not decode, decoded items, their model inputs). The batches are the
    same whatever the number of workers. ``to_input`` takes each chunk's pixels as they come
    (to the device), so the chunks leave shared memory at once."""
    failed: list[dict] = []
    decoded: list[dict] = []
    inputs: list[torch.Tensor] = []
    for chunk in chunks:
        failed += [item for item in chunk.items if not item["decoded"]]
        decoded += [item for item in chunk.items if item["decoded"]]
        if chunk.images is not None:
            inputs.append(to_input(chunk.images))
        while len(decoded) >= size:
            images = torch.cat(inputs) if len(inputs) > 1 else inputs[0]
            yield failed, decoded[:size], images[:size]
            rest = images[size:]
            failed, decoded, inputs = [], decoded[size:], [rest] if len(rest) else []
    if failed or decoded:
        yield failed, decoded, torch.cat(inputs) if inputs else None


def _decoding_worker(worker_id: int, parent: int) -> None:
    # A killed encode must not leave its decoders running, even one forked just before the
    # kill: by the parent's pid, since a sibling may hold the multiprocessing sentinel open.
    die_with_parent(parent_pid=parent)
    torch.set_num_threads(1)  # decoding workers must not fight the model for cores


class _ShardEncoder:
    def __init__(self, config: EncodeConfig, clip: LoadedClip, features: PatchFeatures, attrs: dict,
                 references: dict[str, bytes]) -> None:  # fmt: skip
        self.config, self.clip, self.features, self.attrs = config, clip, features, attrs
        # The square rule at the model's input size: a 448 preprocess output is just resized.
        self.options = SquareOptions(
            size=clip.image_size, pad_threshold=config.square.pad_threshold, fill=config.square.fill
        )
        self.shape = loader_shape(config.workers, config.batch_size, clip.image_size)
        self.mean = torch.tensor(clip.mean, device=clip.device).view(3, 1, 1)
        self.std = torch.tensor(clip.std, device=clip.device).view(3, 1, 1)
        self.references = self._reference_embeds(references)

    def encode(self, shard: ImageShard, out: Path, progress: Progress) -> None:
        config, clip = self.config, self.clip
        started = time.monotonic()
        files = ShardFiles(out, shard.name)
        expected = expected_keys(shard.tar) if shard.tar is not None else None
        marker = input_marker(shard)  # before reading: a rewrite meanwhile makes it stale
        loader = image_loader(shard, self.options, config.max_pixels, self.shape,
                              pin_memory=clip.device == "cuda")  # fmt: skip
        writer = FeatureShardWriter(
            out / f"{shard.name}.h5", self.features.side**2, clip.width, clip.embed_dim, self.attrs
        )
        records: list[dict] = []
        chunks = _chunks(loader, shard)
        try:
            for failed, decoded, images in _forward_batches(chunks, config.batch_size, self._input):
                for item in failed:
                    records.append(_record(item, item["status"]))
                    progress.record(item["status"], item["error_kind"], 0)
                if decoded:
                    records += self._encode_batch(decoded, images, writer, progress)
            check_tar_complete(shard.tar, expected, {r["key"] for r in records})
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            chunks.close()  # the decoding workers stop now, whatever happened
        records.sort(key=lambda r: r["key"])
        write_parquet_atomic(files.parquet, pa.Table.from_pylist(records, schema=ENCODE_SCHEMA))
        sizes = data_sizes(files, STAGE_DATA_FILES["encode"])
        stats = shard_stats(shard.name, records, time.monotonic() - started, marker, sizes)
        atomic_write_json(files.stats, stats)

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> the model's input on its device (from pinned memory on a GPU: the
        copy overlaps with the forward)."""
        images = images.to(self.clip.device, non_blocking=True)
        return normalize(images, self.mean, self.std).to(self.clip.dtype)

    def _encode_batch(
        self, decoded: list[dict], images: torch.Tensor, writer: FeatureShardWriter,
        progress: Progress,
    ) -> list[dict]:  # fmt: skip
        tokens, embeds = self.features(images)
        if self.references is not None:
            similarity = (embeds @ self.references.T).max(dim=1).values.cpu().tolist()
        else:
            similarity = [None] * len(embeds)
        keep = [s is None or s < self.config.placeholder_threshold for s in similarity]
        kept = [i for i, k in enumerate(keep) if k]
        first = writer.append(
            [decoded[i]["key"] for i in kept],
            [decoded[i]["caption"] for i in kept],
            tokens[kept].to(torch.float16).cpu().numpy(),
            embeds[kept].to(torch.float16).cpu().numpy(),
        )
        records = []
        rows = iter(range(first, first + len(kept)))
        for item, is_kept, score in zip(decoded, keep, similarity, strict=True):
            status = SUCCESS if is_kept else PLACEHOLDER
            records.append(_record(item, status, score, next(rows) if is_kept else None))
            progress.record(status, None if is_kept else "placeholder", 0)
        return records

    def _reference_embeds(self, references: dict[str, bytes]) -> torch.Tensor | None:
        """Unit CLIP embeddings of the references, made exactly like the data's."""
        if not references:
            return None
        squares = [
            make_square(data, self.options, _REFERENCE_MAX_PIXELS)[1]
            for data in references.values()
        ]
        return self.features(self._input(torch.stack([pixels(square) for square in squares])))[1]


_REFERENCE_MAX_PIXELS = 10**9  # references are the user's own files


def _chunks(loader: DataLoader, shard: ImageShard) -> Iterator[DecodedChunk]:
    """The loader's chunks; a decoding worker that dies (the OOM killer, a full /dev/shm)
    stops the run with one line instead of a DataLoader traceback, and so does a worker's
    UserError (a tar cut since it was indexed). The shard is redone on the rerun.

    However the iteration ends (done, failed, or closed by a failure in the caller), the
    loader's iterator is dropped at once: its workers hold this run's output lock, and must
    stop now, not whenever a traceback that reaches them is collected."""
    chunks = iter(loader)
    failure: Exception | None = None
    try:
        for chunk in chunks:
            if chunk.error is not None:
                failure = UserError(chunk.error)
                break
            yield chunk
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        failure = _worker_failure(e, shard)
    finally:
        del chunks
    if failure is not None:
        raise failure


def _worker_failure(error: RuntimeError, shard: ImageShard) -> MachineFailure:
    """The one line for a decoding worker that died or could not hand its images over."""
    if any(sign in str(error) for sign in _SHM_FULL):
        free = _shm_free_bytes()
        return MachineFailure(
            f"the decoding workers ran out of shared memory while encoding shard {shard.name} "
            f"(/dev/shm: {'?' if free is None else _size(free)} free); raise the container's "
            "--shm-size (e.g. docker run --shm-size=2g) or lower --workers, and rerun the same "
            "command to resume"
        )
    return MachineFailure(
        f"a decoding worker died while encoding shard {shard.name} "
        f"({str(error).splitlines()[0][:120]}); it was likely killed for memory: lower "
        "--workers or --batch-size and rerun the same command to resume"
    )


# How a full /dev/shm shows: torch's failed allocation ("unable to write to file </torch_...>:
# No space left on device", "unable to allocate shared memory(shm)"), or a worker killed by
# SIGBUS for a page tmpfs cannot back, when torch's handler (not its timeout) reports the death.
_SHM_FULL = ("No space left on device", "shared memory", "Bus error")


def _record(
    item: dict, status: str, similarity: float | None = None, row: int | None = None
) -> dict:
    return {
        "key": item["key"], "url": item["url"], "caption": item["caption"] or None,
        "status": status, "error_kind": item["error_kind"] if status != SUCCESS else None,
        "error": item["error"] if status != SUCCESS else None,
        "placeholder_similarity": similarity, "row": row, "source": item["source"],
    }  # fmt: skip


def _write_manifest(out: Path, names: list[str], stats: list[dict], attrs: dict) -> None:
    """``manifest.json``: the attributes, and every shard's file and row count."""
    shards = [{"name": name, "file": f"{name}.h5", "rows": shard["status"].get(SUCCESS, 0)}
              for name, shard in zip(names, stats, strict=True)]  # fmt: skip
    atomic_write_json(out / "manifest.json", {"attrs": attrs, "shards": shards,
                                              "rows": sum(s["rows"] for s in shards)})  # fmt: skip
