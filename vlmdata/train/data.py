"""Training examples from the HDF5 feature shards: the index, the split, the batches.

An example is one cached image (a row of an ``NNNNN.h5``) and one conversation: its own caption
under a prompt sampled from ``--prompts``, or a conversation from ``--data`` joined to it. The
index holds only (file, row, conversation) triples: tokens and captions are read by the
DataLoader workers, each with its own HDF5 handles, a batch at a time in row order per file.

The validation split is a function of the key alone (a 64-bit hash), so it is the same
in every run, with any other feature directories added, on any number of processes.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from vlmdata.errors import UserError, one_line
from vlmdata.labels.features import open_features
from vlmdata.train.conversations import Conversations
from vlmdata.train.sequence import IGNORE, ConversationFormat

# Root attributes every .h5 of one training run must share: features from another model, layer
# or grid would be a different input space for the projector.
MATCHING_ATTRS = ("model", "pretrained", "weights_sha256", "layer", "token_grid", "width")
CAPTION = -1  # conversation index of an example trained on its own caption


@dataclass(frozen=True)
class FeatureFiles:
    """The feature shards of one run, and what they were made with."""

    paths: list[Path]
    shard_dirs: list[tuple[Path, str]]  # (encode output, shard name) of each path
    rows: list[int]
    attrs: dict  # the shared root attributes (of the first file)

    @property
    def tokens(self) -> int:
        return int(self.attrs["tokens"])

    @property
    def width(self) -> int:
        return int(self.attrs["width"])


def open_feature_files(dirs: Sequence[str | Path], allow_incomplete: bool = False) -> FeatureFiles:
    """Every finished ``.h5`` of the encode outputs ``dirs``, checked to share one model,
    layer and grid (the first mismatch is a one-line error naming both files)."""
    if not dirs:
        raise UserError("pass at least one FEATURES_DIR (an output of `vlmdata encode`)")
    paths, shard_dirs, rows, first = [], [], [], None
    for folder in dict.fromkeys(Path(d).resolve() for d in dirs):  # one dir named two ways
        features = open_features(folder, allow_incomplete)
        for shard in features.shards:
            attrs = _attrs(shard.h5)
            if first is None:
                first = (shard.h5, attrs)
            _check_matching(first, shard.h5, attrs)
            paths.append(shard.h5)
            shard_dirs.append((folder, shard.name))
            rows.append(shard.rows)
    assert first is not None  # open_features refuses an output without a finished shard
    return FeatureFiles(paths=paths, shard_dirs=shard_dirs, rows=rows, attrs=first[1])


def _attrs(h5: Path) -> dict:
    try:
        with h5py.File(h5, "r") as f:
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            shape = f["tokens"].shape
    except (OSError, KeyError) as e:
        raise UserError(f"{h5} is damaged ({one_line(e, 120)}); rerun the encode") from None
    attrs.setdefault("tokens", shape[1])
    attrs.setdefault("width", shape[2])
    return attrs


def _plain(value: object) -> object:
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value.item() if isinstance(value, np.generic) else value


def _check_matching(first: tuple[Path, dict], h5: Path, attrs: dict) -> None:
    for name in MATCHING_ATTRS:
        if first[1].get(name) != attrs.get(name):
            raise UserError(
                f"{h5} has {name}={attrs.get(name)!r} but {first[0]} has {first[1].get(name)!r}: "
                "train on features of one model, layer and grid at a time"
            )


def split_fraction(keys: np.ndarray) -> np.ndarray:
    """Each key's place in [0, 1): FNV-1a (64-bit) of its bytes and murmur3's finaliser,
    vectorised over columns."""
    raw = np.asarray(keys, dtype="S")
    if raw.size == 0:
        return np.zeros(0)
    codes = raw.view(np.uint8).reshape(len(raw), raw.itemsize)
    hashed = np.full(len(raw), 0xCBF29CE484222325, dtype=np.uint64)
    prime = np.uint64(0x100000001B3)
    with np.errstate(over="ignore"):
        for column in codes.T:  # fixed-width: the zero padding after a short key is skipped
            mixed = (hashed ^ column.astype(np.uint64)) * prime
            hashed = np.where(column != 0, mixed, hashed)
        # FNV leaves the last bytes in the low bits: murmur3's finaliser spreads them.
        for shift, multiplier in ((33, 0xFF51AFD7ED558CCD), (33, 0xC4CEB9FE1A85EC53)):
            hashed = (hashed ^ (hashed >> np.uint64(shift))) * np.uint64(multiplier)
        hashed ^= hashed >> np.uint64(33)
    return (hashed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass
class Examples:
    """(file, row, conversation) of every example, split into train and validation."""

    train: np.ndarray  # int64 [N, 3]
    val: np.ndarray  # int64 [M, 3]
    unmatched: int  # --data rows that name no cached image
    ambiguous: int  # --data rows that name several
    too_long: int  # --data rows whose image lies past --max-length


def build_examples(
    files: FeatureFiles,
    val_fraction: float,
    conversations: Conversations | None,
    captions: bool,
    text: ConversationFormat | None = None,
) -> Examples:
    """The example index: every row (on its caption, when ``captions``) and every joined
    conversation (whose image fits ``text``'s --max-length, when given), split by key."""
    parts, is_val = [], []
    joined = conversations.join(files) if conversations is not None else None
    too_long = 0
    if joined is not None and text is not None:  # found now, not by a worker mid-training
        for index, rows in list(joined.by_file.items()):
            fits = np.array([text.image_fits(conversations.turns(int(c))) for c in rows[:, 1]])
            too_long += int((~fits).sum())
            joined.by_file[index] = rows[fits]
    for index, path in enumerate(files.paths):
        try:
            with h5py.File(path, "r") as f:
                keys = f["keys"][:]
        except (OSError, KeyError) as e:
            raise UserError(f"{path} is damaged ({one_line(e, 120)}); rerun the encode") from None
        val_rows = split_fraction(keys) < val_fraction
        if captions:
            rows = np.arange(len(keys))
            parts.append(
                np.stack([np.full_like(rows, index), rows, np.full_like(rows, CAPTION)], 1)
            )
            is_val.append(val_rows)
        if joined is not None and (mine := joined.rows_of(index)) is not None:
            parts.append(np.stack([np.full(len(mine), index), mine[:, 0], mine[:, 1]], 1))
            is_val.append(val_rows[mine[:, 0]])
    if not parts:
        raise UserError("no training examples: --no-captions and no --data row matched")
    table = np.concatenate(parts).astype(np.int64)
    val = np.concatenate(is_val)
    return Examples(
        train=table[~val], val=table[val],
        unmatched=joined.unmatched if joined else 0, ambiguous=joined.ambiguous if joined else 0,
        too_long=too_long,
    )  # fmt: skip


class FeatureDataset(torch.utils.data.Dataset):
    """Examples by position in ``table``; ``__getitems__`` reads a whole batch, file by file in
    row order. HDF5 handles are opened lazily per process (a forked worker never shares its
    parent's)."""

    def __init__(
        self,
        files: FeatureFiles,
        table: np.ndarray,
        text: ConversationFormat,
        prompts: list[str],
        conversations: Conversations | None,
        seed: int,
    ) -> None:
        self.paths, self.table, self.text = files.paths, table, text
        self.prompts, self.conversations, self.seed = prompts, conversations, seed
        self.epoch = 0
        self._handles: dict[int, tuple[h5py.Dataset, h5py.Dataset, h5py.Dataset]] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        chosen = self.table[indices]
        out: list[dict | None] = [None] * len(indices)
        for file_index in np.unique(chosen[:, 0]):
            at = np.flatnonzero(chosen[:, 0] == file_index)
            rows = chosen[at, 1]
            order = np.argsort(rows, kind="stable")
            unique_rows, inverse = np.unique(rows[order], return_inverse=True)
            token_rows, key_rows, caption_rows = self._datasets(int(file_index))
            # Row by row, a plain read of each row's chunk: h5py's fancy indexing over
            # [16, 64, 1024] tokens costs ~50 ms, these reads ~0.3 ms.
            tokens = np.stack([token_rows[r] for r in unique_rows.tolist()])
            keys = key_rows[unique_rows]  # h5py wants increasing, unique indices
            captions = caption_rows[unique_rows]
            for j, position in enumerate(at[order]):
                u = inverse[j]
                out[position] = self._example(
                    int(indices[position]), chosen[position], tokens[u],
                    _text(keys[u]), _text(captions[u]),
                )  # fmt: skip
        return out  # type: ignore[return-value]

    def _example(self, index: int, entry: np.ndarray, tokens: np.ndarray, key: str,
                 caption: str) -> dict:  # fmt: skip
        conversation = int(entry[2])
        if conversation == CAPTION:
            # Reproducible for (seed, epoch, example) whatever the worker or the resume point.
            pick = random.Random(f"{self.seed}:{self.epoch}:{index}").randrange(len(self.prompts))
            turns = [(self.prompts[pick], caption)]
        else:
            assert self.conversations is not None
            turns = self.conversations.turns(conversation)
        encoded = self.text.encode(turns)
        return {"tokens": tokens, "ids": encoded.ids, "labels": encoded.labels,
                "image_at": encoded.image_at, "key": key, "caption": caption,
                "truncated": encoded.truncated}  # fmt: skip

    def _datasets(self, index: int) -> tuple[h5py.Dataset, h5py.Dataset, h5py.Dataset]:
        """(tokens, keys, captions) of file ``index``, opened once per process (looking a
        dataset up costs ~0.1 ms a time)."""
        if self._pid != os.getpid():  # forked into a worker: the parent's handles are not ours
            self._handles, self._pid = {}, os.getpid()
        if index not in self._handles:
            f = h5py.File(self.paths[index], "r")
            self._handles[index] = (f["tokens"], f["keys"], f["captions"])
        return self._handles[index]


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclass
class Batch:
    """Padded, ready for the model. ``image_at`` is each row's image-begin position."""

    input_ids: torch.Tensor  # long [B, L]
    labels: torch.Tensor  # long [B, L], IGNORE on image, prompt and padding
    attention_mask: torch.Tensor  # long [B, L]
    position_ids: torch.Tensor  # long [B, L]: 0.. from each row's first real token
    image_at: torch.Tensor  # long [B]
    tokens: torch.Tensor  # float16 [B, T, C]
    keys: list[str]
    truncated: int = 0  # sequences cut at --max-length

    def to(self, device: str) -> Batch:
        moved = {
            name: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for name, value in vars(self).items()
        }
        return Batch(**moved)

    @property
    def target_tokens(self) -> int:
        """Tokens with a loss (the shifted labels that are not IGNORE)."""
        return int((self.labels[:, 1:] != IGNORE).sum())


def collate(examples: list[dict], pad_id: int, padding_side: str = "right") -> Batch:
    """Pad to the longest example on ``padding_side``; positions count real tokens only."""
    length = max(len(e["ids"]) for e in examples)
    count = len(examples)
    ids = torch.full((count, length), pad_id, dtype=torch.long)
    labels = torch.full((count, length), IGNORE, dtype=torch.long)
    mask = torch.zeros((count, length), dtype=torch.long)
    image_at = torch.zeros(count, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["ids"])
        start = length - n if padding_side == "left" else 0
        ids[i, start : start + n] = torch.tensor(e["ids"])
        labels[i, start : start + n] = torch.tensor(e["labels"])
        mask[i, start : start + n] = 1
        image_at[i] = start + e["image_at"]
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    tokens = torch.from_numpy(np.stack([e["tokens"] for e in examples]))
    keys = [e["key"] for e in examples]
    cut = sum(bool(e.get("truncated")) for e in examples)
    return Batch(ids, labels, mask, positions, image_at, tokens, keys, cut)


class EpochBatches(torch.utils.data.Sampler):
    """Index lists of one rank's micro-batches: a seeded permutation per epoch, cut into global
    batches of ``batch_size * world`` (the incomplete last one dropped), each rank taking its
    slice. ``start`` skips micro-batches already trained (a resume mid-epoch reads nothing
    for them)."""

    def __init__(self, count: int, batch_size: int, seed: int, epoch: int, start: int = 0,
                 rank: int = 0, world: int = 1) -> None:  # fmt: skip
        self.count, self.batch_size, self.seed, self.epoch = count, batch_size, seed, epoch
        self.start, self.rank, self.world = start, rank, world

    def __len__(self) -> int:
        return max(0, self.count // (self.batch_size * self.world) - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.count, generator=generator).tolist()
        span = self.batch_size * self.world
        for b in range(self.start, self.count // span):
            first = b * span + self.rank * self.batch_size
            yield order[first : first + self.batch_size]


def batches_per_epoch(count: int, batch_size: int, world: int) -> int:
    return count // (batch_size * world)


def evaluation_batches(
    count: int, batch_size: int, rank: int = 0, world: int = 1
) -> list[list[int]]:
    """Every validation example once, in order, dealt to ranks batch by batch."""
    batches = [list(range(i, min(i + batch_size, count))) for i in range(0, count, batch_size)]
    return batches[rank::world]
