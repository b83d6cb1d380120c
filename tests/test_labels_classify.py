"""`vlmdata labels classify`: zero-shot labels over cached embeddings, refusals, resume, cache."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import make_image
from vlmdata.cli import app
from vlmdata.encode.models import load_clip
from vlmdata.encode.stage import EncodeConfig, run_encode
from vlmdata.encode.store import FeatureShardWriter
from vlmdata.errors import UserError
from vlmdata.labels.classify import ClassifyConfig, run_classify
from vlmdata.labels.taxonomy import load_templates
from vlmdata.labels.text import CACHE_FILE, text_embeddings
from vlmdata.pipeline.shards import (
    STAGE_DATA_FILES,
    ShardFiles,
    atomic_write_json,
    data_sizes,
    shard_stats,
    write_parquet_atomic,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:tiny-random-clip has random weights"),
    pytest.mark.filterwarnings("ignore:unrecognised weights file"),
]
runner = CliRunner(env={"COLUMNS": "200"})
TINY = "tiny-random-clip"
EMBED_DIM = 32  # tiny-random-clip's
TAXONOMY = {
    "animals": ["a tabby cat asleep on a sofa", "a dog running on a beach", "a horse in a field"],
    "food": ["a pepperoni pizza", "a bowl of tomato soup", "a chocolate cake"],
    "vehicles": ["a red sports car", "a bicycle leaning on a wall", "a freight train"],
}
DESCRIPTIONS = [text for texts in TAXONOMY.values() for text in texts]
CATEGORY = {text: category for category, texts in TAXONOMY.items() for text in texts}
RANDOM_ATTRS = {"model": TINY, "pretrained": "random"}


def write_taxonomy(path: Path, taxonomy: dict = TAXONOMY) -> Path:
    path.write_text(json.dumps({"categories": taxonomy}))
    return path


def write_features(
    out: Path, shards: list[np.ndarray], attrs: dict | list[dict] = RANDOM_ATTRS,
    complete: bool = True, key_offset: int = 0,
) -> Path:  # fmt: skip
    """An encode output written directly (as the encode stage lays it out): per shard a
    ``.h5`` of ``embeds`` (tokens are a stub), its ``.parquet`` and stats; plan and totals."""
    out.mkdir(parents=True, exist_ok=True)
    per_shard = attrs if isinstance(attrs, list) else [attrs] * len(shards)
    names, start = [], key_offset
    for index, (embeds, shard_attrs) in enumerate(zip(shards, per_shard, strict=True)):
        files = ShardFiles(out, name := f"{index:05d}")
        keys = [f"{start + i:09d}" for i in range(len(embeds))]
        start += len(embeds)
        writer = FeatureShardWriter(files.data(".h5"), 1, 4, EMBED_DIM, shard_attrs)
        writer.append(keys, ["a caption"] * len(keys), np.zeros((len(keys), 1, 4), np.float16),
                      embeds.astype(np.float16))  # fmt: skip
        writer.close()
        rows = [{"key": k, "status": "success", "error_kind": None, "row": i}
                for i, k in enumerate(keys)]  # fmt: skip
        write_parquet_atomic(files.parquet, pa.Table.from_pylist(rows))
        sizes = data_sizes(files, STAGE_DATA_FILES["encode"])
        atomic_write_json(files.stats, shard_stats(name, rows, 0.0, None, sizes))
        names.append(name)
    atomic_write_json(out / "plan.json", {"stage": "encode", "input": {"test": str(out)},
                                          "embed_dim": EMBED_DIM, **per_shard[0]})  # fmt: skip
    atomic_write_json(out / "stats.json", {"rows": start - key_offset, "shard_names": names,
                                           "complete": complete})  # fmt: skip
    return out


def unit_rows(count: int, seed: int = 0) -> np.ndarray:
    return F.normalize(torch.randn(count, EMBED_DIM, generator=torch.Generator().manual_seed(seed)),
                       dim=-1).numpy()  # fmt: skip


def classify(features: Path, out: Path, taxonomy: Path | None, **options) -> object:
    defaults = dict(device="cpu", quiet=True, taxonomy=str(taxonomy) if taxonomy else None)
    return run_classify(ClassifyConfig(str(features), str(out), **{**defaults, **options}))


def labels_of(out: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("[0-9]*.parquet")))


@pytest.fixture
def taxonomy(tmp_path: Path) -> Path:
    return write_taxonomy(tmp_path / "taxonomy.json")


@pytest.fixture(scope="module")
def description_embeddings() -> torch.Tensor:
    """The descriptions through tiny-random-clip's real text tower, with the default templates."""
    clip = load_clip(TINY, "random", "cpu", "fp32")
    return text_embeddings(clip, DESCRIPTIONS, load_templates(None))


def test_noisy_copies_of_description_embeddings_get_those_descriptions(
    tmp_path, taxonomy, description_embeddings
):
    truth = [i % len(DESCRIPTIONS) for i in range(40)]
    noise = torch.randn(40, EMBED_DIM, generator=torch.Generator().manual_seed(1))
    embeds = F.normalize(description_embeddings[truth] + 0.05 * F.normalize(noise, dim=-1), dim=-1)
    assert (embeds * description_embeddings[truth]).sum(1).max() < 0.9995  # really noisy
    features = write_features(tmp_path / "features", [embeds[:25].numpy(), embeds[25:].numpy()])
    out = tmp_path / "labels"
    summary = classify(features, out, taxonomy, top_k=len(DESCRIPTIONS), batch_size=7)
    assert summary.rows_this_run == summary.images_this_run == 40  # counted chunk by chunk
    table = labels_of(out).to_pylist()
    assert [r["description"] for r in table] == [DESCRIPTIONS[i] for i in truth]
    assert [r["category"] for r in table] == [CATEGORY[DESCRIPTIONS[i]] for i in truth]
    assert [r["key"] for r in table] == [f"{i:09d}" for i in range(40)]
    assert [r["row"] for r in table] == [*range(25), *range(15)]  # the row in its own .h5
    for row, embed in zip(table, embeds, strict=True):
        probabilities = row["top_k_probabilities"]
        assert sum(probabilities) == pytest.approx(1, abs=1e-5)  # over every description
        assert probabilities == sorted(probabilities, reverse=True)
        assert row["top_k_descriptions"][0] == row["description"]
        assert row["probability"] == probabilities[0]
        assert row["cosine"] == pytest.approx(float(embed @ description_embeddings[
            DESCRIPTIONS.index(row["description"])]), abs=2e-3)  # float16 storage  # fmt: skip
        by_category = {}
        for text, p in zip(row["top_k_descriptions"], probabilities, strict=True):
            by_category[CATEGORY[text]] = by_category.get(CATEGORY[text], 0) + p
        assert row["top_category"] == max(by_category, key=by_category.get)
        assert row["top_category_probability"] == pytest.approx(max(by_category.values()), 1e-5)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["complete"] and stats["rows"] == 40 and stats["shards"] == 2
    assert stats["description"] == {text: 40 // 9 + (i < 40 % 9) for i, text in
                                    enumerate(DESCRIPTIONS)}  # fmt: skip
    assert stats["category"] == {"animals": 15, "food": 13, "vehicles": 12}


def test_real_encode_output_top_k_and_nothing_to_do(tmp_path, taxonomy):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        (photos / f"{i}.jpg").write_bytes(make_image(120 + 10 * i, 100, seed=i))
    features = tmp_path / "features"
    run_encode(EncodeConfig(str(photos), str(features), model=TINY, device="cpu", workers=0,
                            quiet=True, placeholder_filter=False, shard_size=4))  # fmt: skip
    out = tmp_path / "labels"
    args = ["labels", "classify", str(features), str(out), "--taxonomy", str(taxonomy),
            "--device", "cpu", "--top-k", "3", "--quiet"]  # fmt: skip
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "6 rows in 2 shards" in first.stdout
    for name in ("00000", "00001"):
        with __import__("h5py").File(features / f"{name}.h5", "r") as f:
            keys = f["keys"].asstr()[:].tolist()
        table = pq.read_table(out / f"{name}.parquet")
        assert table["key"].to_pylist() == keys  # one row per key, in .h5 order
        assert all(len(top) == 3 for top in table["top_k_descriptions"].to_pylist())
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "Nothing to do" in again.stdout, again.output


def test_empty_feature_shard_gives_an_empty_parquet(tmp_path, taxonomy):
    features = write_features(tmp_path / "features", [unit_rows(3), unit_rows(0)])
    out = tmp_path / "labels"
    classify(features, out, taxonomy)
    empty = pq.read_table(out / "00001.parquet")
    assert empty.num_rows == 0 and "top_k_descriptions" in empty.column_names
    assert json.loads((out / "00001.stats.json").read_text())["rows"] == 0
    assert json.loads((out / "stats.json").read_text())["rows"] == 3


def test_a_shard_encoded_again_is_labelled_again(tmp_path, taxonomy):
    features = write_features(tmp_path / "features", [unit_rows(5, 0), unit_rows(5, 1)])
    out = tmp_path / "labels"
    classify(features, out, taxonomy)
    kept = (out / "00001.stats.json").read_bytes()
    marker = features / "00000.stats.json"  # the encode shard 00000 is made again
    atomic_write_json(marker, {**json.loads(marker.read_text()), "finished_at": "later"})
    summary = classify(features, out, taxonomy)
    assert summary.rows_this_run == 5
    assert (out / "00001.stats.json").read_bytes() == kept


def test_a_failed_write_stops_the_run_and_leaves_its_shard_undone(tmp_path, taxonomy):
    """Shard files are written on a thread while the next shard is labelled: its error must
    end the run, as it would in line."""
    features = write_features(tmp_path / "features", [unit_rows(5, seed) for seed in range(3)])
    out = tmp_path / "labels"
    classify(features, out, taxonomy)
    whole = labels_of(out)
    for name in ("00001", "00002"):  # two shards to do again
        (out / f"{name}.stats.json").unlink()
    (out / ".00001.parquet.tmp").mkdir()  # where shard 00001's parquet is written: it fails
    with pytest.raises(OSError):
        classify(features, out, taxonomy)
    assert not (out / "00001.stats.json").exists() and not (out / "00002.stats.json").exists()
    assert not json.loads((out / "stats.json").read_text())["complete"]
    (out / ".00001.parquet.tmp").rmdir()
    classify(features, out, taxonomy)  # the rerun does the rest
    assert labels_of(out) == whole


def test_labels_taxonomy_prints_and_exports_the_default(tmp_path):
    printed = runner.invoke(app, ["labels", "taxonomy"])
    assert printed.exit_code == 0, printed.output
    default = json.loads(printed.stdout)
    assert len(default["categories"]) >= 24
    target = tmp_path / "mine.json"
    exported = runner.invoke(app, ["labels", "taxonomy", "--out", str(target)])
    assert exported.exit_code == 0 and str(target) in exported.stdout
    assert json.loads(target.read_text()) == default
    bad = runner.invoke(app, ["labels", "taxonomy", "--out", str(tmp_path / "no" / "x.json")])
    assert bad.exit_code == 2 and "cannot write" in bad.stderr


# --- refusals ----------------------------------------------------------------------------------


def tiny_weights(path: Path, seed: int) -> tuple[Path, str]:
    """A weights file saved from tiny-random-clip (different seeds, different weights)."""
    torch.manual_seed(seed)
    model = load_clip(TINY, "random", "cpu", "fp32").model
    for parameter in model.parameters():
        parameter.data.add_(torch.randn_like(parameter) * 0.01 * seed)
    torch.save(model.state_dict(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def weights_features(tmp_path: Path) -> tuple[Path, Path, str]:
    """Features made with a weights file: (features dir, weights file, its sha256)."""
    weights, digest = tiny_weights(tmp_path / "tiny.pt", 1)
    attrs = {"model": TINY, "pretrained": str(weights), "weights_sha256": digest}
    return write_features(tmp_path / "features", [unit_rows(4)], attrs), weights, digest


def test_weights_file_found_by_path_moved_with_pretrained(tmp_path, taxonomy, weights_features):
    features, weights, _ = weights_features
    classify(features, tmp_path / "a", taxonomy)  # found where it was recorded
    moved = weights.rename(tmp_path / "moved.pt")
    with pytest.raises(UserError, match=r"no longer at .*tiny\.pt; pass --pretrained PATH"):
        classify(features, tmp_path / "b", taxonomy)
    classify(features, tmp_path / "b", taxonomy, pretrained=str(moved))
    assert labels_of(tmp_path / "b") == labels_of(tmp_path / "a")
    other, _ = tiny_weights(tmp_path / "other.pt", 2)
    with pytest.raises(UserError, match=r"other\.pt is not the weights file the features were"):
        classify(features, tmp_path / "c", taxonomy, pretrained=str(other))


def test_refusals(tmp_path, taxonomy, weights_features):
    features, _, _ = weights_features
    plain = tmp_path / "plain"
    plain.mkdir()
    cases = [
        (plain, {}, "is not a vlmdata encode output (no plan.json)"),
        (write_features(tmp_path / "unfinished", [unit_rows(2)], complete=False), {},
         "is an unfinished encode output (1 shards done so far); finish it"),
        (features, {"model": "ViT-B-32"}, "--model ViT-B-32 contradicts the features, made "
         f"with {TINY}; drop --model or pass {TINY}"),
        (features, {"top_k": 10}, "--top-k 10 is more than the taxonomy's 9 descriptions"),
        (features, {"top_k": 0}, "--top-k must be at least 1"),
    ]  # fmt: skip
    for source, options, message in cases:
        with pytest.raises(UserError, match=re.escape(message)):
            classify(source, tmp_path / "out", taxonomy, **options)
    atomic_write_json(plain / "plan.json", {"stage": "download", "input": {}})
    with pytest.raises(UserError, match="holds a download output, not encode features"):
        classify(plain, tmp_path / "out", taxonomy)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_features_of_two_models_are_refused_at_the_odd_shard(tmp_path, taxonomy):
    """The model is the encode plan's (no .h5 is opened to find it); each shard's attributes
    are checked as it is labelled."""
    mixed = write_features(tmp_path / "mixed", [unit_rows(2), unit_rows(2)],
                           [RANDOM_ATTRS, {"model": TINY, "pretrained": "x.pt",
                                           "weights_sha256": "ab" * 32}])  # fmt: skip
    message = ("mixes features of two models (00001.h5: tiny-random-clip (abababababababab), "
               "its plan.json: tiny-random-clip (random)); label the features of one model at "
               "a time")  # fmt: skip
    with pytest.raises(UserError, match=re.escape(message)):
        classify(mixed, tmp_path / "out", taxonomy)
    assert not ShardFiles(tmp_path / "out", "00001").stats.exists()


def test_unfinished_encode_with_allow_incomplete(tmp_path, taxonomy):
    features = write_features(tmp_path / "features", [unit_rows(2)], complete=False)
    summary = classify(features, tmp_path / "out", taxonomy, allow_incomplete=True)
    assert summary.partial_input and summary.totals["rows"] == 2
    assert not json.loads((tmp_path / "out" / "stats.json").read_text())["complete"]


def test_changed_taxonomy_on_resume_is_refused(tmp_path, taxonomy):
    features = write_features(tmp_path / "features", [unit_rows(3)])
    out = tmp_path / "labels"
    classify(features, out, taxonomy)
    other = write_taxonomy(tmp_path / "other.json", {**TAXONOMY, "maps": ["a city street map"]})
    with pytest.raises(UserError, match=r"was made with --taxonomy .*, this run has --taxonomy"):
        classify(features, out, other)
    result = runner.invoke(app, ["labels", "classify", str(features), str(out), "--device", "cpu",
                                 "--taxonomy", str(other)])  # fmt: skip
    assert result.exit_code == 2 and "--taxonomy" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- resume and the text embedding cache -------------------------------------------------------


def test_kill_mid_run_then_resume_gives_the_same_labels(tmp_path, taxonomy):
    shards = [unit_rows(30, seed) for seed in range(80)]
    features = write_features(tmp_path / "features", shards)
    whole = tmp_path / "whole"
    classify(features, whole, taxonomy)
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "vlmdata", "labels", "classify", str(features), str(out),
            "--taxonomy", str(taxonomy), "--device", "cpu", "--batch-size", "4",
            "--quiet"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        args, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not list(out.glob("*.stats.json")) and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)
    done_before = len(list(out.glob("*.stats.json")))
    assert 1 <= done_before < 80
    finished = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert f"{80 * 30} rows in 80 shards" in finished.stdout
    resumed = labels_of(out)
    assert resumed == labels_of(whole)
    assert len(set(resumed["key"].to_pylist())) == resumed.num_rows == 80 * 30
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "Nothing to do" in again.stdout, again.stderr


def test_text_embeddings_cached_reused_and_rebuilt_when_damaged(tmp_path, taxonomy):
    features = write_features(tmp_path / "features", [unit_rows(4, 0), unit_rows(4, 1)])
    out = tmp_path / "labels"
    classify(features, out, taxonomy)
    cache = out / CACHE_FILE
    first = labels_of(out)
    made = cache.stat()
    (out / "00001.parquet").unlink()  # one shard to redo: the text embeddings are needed
    classify(features, out, taxonomy)
    reused = cache.stat()
    assert (reused.st_ino, reused.st_mtime_ns) == (made.st_ino, made.st_mtime_ns)
    data = bytearray(cache.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a damaged byte in the middle: caught, not trusted
    cache.write_bytes(bytes(data))
    (out / "00001.parquet").unlink()
    classify(features, out, taxonomy)
    assert cache.read_bytes() != bytes(data)  # rebuilt
    assert labels_of(out) == first
