"""Instruction data in LLaVA's conversation format (``--data FILE``), joined to cached images.

A row is ``{"image": ..., "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": ...}, ...]}`` (``id`` optional), in a JSON list or JSON lines. Its
image is found among the cached rows by, in this order: ``image`` as the sample key or the URL
or source path recorded upstream, its file name against theirs, its file name's stem against
the key (LLaVA names images ``KEY.jpg``), and last the row's ``id``. A row that names no cached
image, or several equally well, is counted and reported, never silently dropped. The join
runs in polars over the encode shards' parquets, lazily: only rows whose names occur in the
data are materialised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from vlmdata.errors import UserError, one_line

if TYPE_CHECKING:
    from vlmdata.train.data import FeatureFiles

_USER, _ASSISTANT = ("human", "user"), ("gpt", "assistant")


@dataclass
class Joined:
    """Which cached row each conversation trains on."""

    by_file: dict[int, np.ndarray]  # file index -> int64 [k, 2]: (row, conversation)
    matched: int
    unmatched: int
    ambiguous: int

    def rows_of(self, file_index: int) -> np.ndarray | None:
        return self.by_file.get(file_index)


class Conversations:
    """The conversations of ``--data FILE``, with the names each gives its image."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._turns: list[list[tuple[str, str]]] = []
        self._names: list[tuple[str, str | None]] = []  # (image, id)
        for number, row in enumerate(_rows(path), start=1):
            self._names.append(_image_names(row, path, number))
            self._turns.append(_pairs(row, path, number))
        if not self._turns:
            raise UserError(f"--data {path} holds no conversation")

    def __len__(self) -> int:
        return len(self._turns)

    def turns(self, index: int) -> list[tuple[str, str]]:
        return self._turns[index]

    def join(self, files: FeatureFiles) -> Joined:
        """Each conversation's cached row, by the names its image goes by."""
        wanted = self._wanted()
        found = _feature_names(files).join(wanted.lazy(), on="name", how="inner").collect()
        best = (
            found.with_columns(rank=pl.col("feature_rank") + pl.col("data_rank"))
            .filter(pl.col("rank") == pl.col("rank").min().over("conversation"))
            .group_by("conversation")
            .agg(
                pl.col("file").first(),
                pl.col("row").first(),
                places=pl.struct("file", "row").n_unique(),
            )
        )
        unique = best.filter(pl.col("places") == 1)
        by_file = {
            int(file): group.select("row", "conversation").to_numpy().astype(np.int64)
            for (file,), group in unique.sort("conversation").group_by("file", maintain_order=True)
        }
        return Joined(
            by_file=by_file,
            matched=unique.height,
            unmatched=len(self) - best.height,
            ambiguous=best.height - unique.height,
        )

    def _wanted(self) -> pl.DataFrame:
        """(name, conversation, data_rank): the names of each row's image, exact ones first."""
        names, rows, ranks = [], [], []
        for index, (image, row_id) in enumerate(self._names):
            base = image.rsplit("/", 1)[-1]
            stem = base.rsplit(".", 1)[0]
            # LLaVA's "id" is the dataset's own number: trusted last, after the file names.
            for name, rank in ((image, 0), (base, 1), (stem, 2), (row_id, 3)):
                if name:
                    names.append(name)
                    rows.append(index)
                    ranks.append(rank)
        return pl.DataFrame(
            {"name": names, "conversation": rows, "data_rank": ranks},
            schema={"name": pl.String, "conversation": pl.Int64, "data_rank": pl.Int64},
        ).unique()


def _feature_names(files: FeatureFiles) -> pl.LazyFrame:
    """(name, file, row, feature_rank) of every cached row: its key, URL and source, then the
    file names of the URL and source."""
    frames = []
    for index, (folder, shard) in enumerate(files.shard_dirs):
        rows = (
            pl.scan_parquet(folder / f"{shard}.parquet")
            .filter(pl.col("row").is_not_null())
            .select("key", "url", "source", pl.col("row").cast(pl.Int64), file=pl.lit(index))
        )
        for column, rank in (("key", 0), ("url", 0), ("source", 0)):
            frames.append(_named(rows, pl.col(column), rank))
            if column != "key":
                base = pl.col(column).str.split("?").list.first().str.split("/").list.last()
                frames.append(_named(rows, base, 1))
    return pl.concat(frames)


def _named(rows: pl.LazyFrame, name: pl.Expr, rank: int) -> pl.LazyFrame:
    return rows.select(
        name.cast(pl.String).alias("name"),
        "file",
        "row",
        pl.lit(rank, pl.Int64).alias("feature_rank"),
    ).filter(pl.col("name").is_not_null() & (pl.col("name") != ""))


def _rows(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --data {path}: {one_line(e, 120)}") from None
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise UserError(
            f"--data {path} is not JSON or JSON lines ({one_line(e, 100)}); pass LLaVA's "
            "conversation format"
        ) from None
    return rows


def _image_names(row: object, path: Path, number: int) -> tuple[str, str | None]:
    image = row.get("image") if isinstance(row, dict) else None
    if not isinstance(image, str) or not image:
        raise UserError(
            f'--data {path} row {number} has no "image"; every row needs the image it is '
            "about (its key, URL or file name)"
        )
    row_id = row.get("id")
    return image, str(row_id) if row_id is not None else None


def _pairs(row: dict, path: Path, number: int) -> list[tuple[str, str]]:
    """The (user, assistant) turns of a row; a trailing user turn is dropped (no answer)."""
    turns = row.get("conversations")
    where = f"--data {path} row {number}"
    if not isinstance(turns, list) or not turns:
        raise UserError(f'{where} has no "conversations" list')
    pairs, pending = [], None
    for turn in turns:
        speaker = turn.get("from") if isinstance(turn, dict) else None
        value = turn.get("value") if isinstance(turn, dict) else None
        if not isinstance(value, str):
            raise UserError(f'{where}: every turn needs a "from" and a string "value"')
        if speaker in _USER and pending is None:
            pending = value
        elif speaker in _ASSISTANT and pending is not None:
            pairs.append((pending, value))
            pending = None
        elif speaker != "system":
            raise UserError(
                f"{where}: turns must alternate human, gpt (starting with human); got {speaker!r}"
            )
    if not pairs:
        raise UserError(f"{where} has no assistant turn")
    return pairs
