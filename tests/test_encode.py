"""`vlmdata encode` with the built-in tiny random CLIP: features, placeholders, HDF5, resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import make_image
from vlmdata.cli import app
from vlmdata.encode.models import load_clip
from vlmdata.encode.placeholders import builtin_placeholders
from vlmdata.encode.stage import EncodeConfig, _ShardEncoder, normalize, pixels, run_encode
from vlmdata.errors import UserError
from vlmdata.pipeline.imageops import SquareOptions, make_square

pytestmark = pytest.mark.filterwarnings("ignore:tiny-random-clip has random weights")
runner = CliRunner(env={"COLUMNS": "200"})
TINY = "tiny-random-clip"
# Random weights map every image close to every other (0.8-0.96 here): only an identical
# image reaches 0.99, so the tests filter at that.
THRESHOLD = 0.99


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(10):
        width, height = (300 + 20 * i, 200) if i % 3 else (120, 600)  # some padded
        (folder / f"{i:02d}.jpg").write_bytes(make_image(width, height, seed=i))
    (folder / "10.jpg").write_bytes(b"broken")
    return folder


def encode(input_dir: Path, out: Path, **options) -> object:
    defaults = dict(model=TINY, device="cpu", workers=0, batch_size=4, quiet=True,
                    placeholder_threshold=THRESHOLD)  # fmt: skip
    return run_encode(EncodeConfig(str(input_dir), str(out), **{**defaults, **options}))


def h5_rows(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rows = {}
    for path in sorted(out.glob("*.h5")):
        with h5py.File(path, "r") as f:
            for i, key in enumerate(f["keys"].asstr()[:]):
                rows[key] = (f["tokens"][i], f["embeds"][i])
    return rows


def test_features_equal_an_independent_computation(photos, tmp_path):
    out = tmp_path / "features"
    encode(photos, out, tokens="16", layer=-2, placeholder_filter=False, shard_size=4)
    stored = h5_rows(out)
    assert len(stored) == 10  # the broken file is not in the HDF5
    clip = load_clip(TINY, "none", "cpu", "fp32")
    model = clip.model
    options = SquareOptions(size=clip.image_size)
    mean, std = torch.tensor(clip.mean).view(3, 1, 1), torch.tensor(clip.std).view(3, 1, 1)
    for i in range(10):
        _, square = make_square((photos / f"{i:02d}.jpg").read_bytes(), options, 10**8)
        x = normalize(pixels(square), mean, std)[None]
        with torch.no_grad():
            # open_clip's own intermediate API: block outputs without the CLS token, as a grid
            result = model.visual.forward_intermediates(x, indices=[clip.layers - 2])
            grid = result["image_intermediates"][0]  # [1, C, 12, 12]
            expected_tokens = F.adaptive_avg_pool2d(grid, 4).flatten(2).transpose(1, 2)[0]
            expected_embed = F.normalize(model.encode_image(x), dim=-1)[0]
        tokens, embed = stored[f"{i:09d}"]
        assert tokens.shape == (16, clip.width) and tokens.dtype == np.float16
        np.testing.assert_allclose(tokens, expected_tokens.numpy(), rtol=1e-2, atol=2e-3)
        np.testing.assert_allclose(embed, expected_embed.numpy(), rtol=1e-2, atol=2e-3)


def test_placeholders_are_filtered_and_similarity_recorded(photos, tmp_path):
    (photos / "20.png").write_bytes(builtin_placeholders()["white-image-not-found"])
    user_reference = tmp_path / "our-placeholder.png"
    user_reference.write_bytes(make_image(200, 200, "PNG", seed=99))
    (photos / "21.png").write_bytes(user_reference.read_bytes())
    out = tmp_path / "features"
    summary = encode(photos, out, references=(str(user_reference),))
    rows = {
        Path(r["source"]).name: r
        for p in sorted(out.glob("*.parquet"))
        for r in pq.read_table(p).to_pylist()
    }
    assert rows["20.png"]["status"] == rows["21.png"]["status"] == "placeholder"
    assert rows["20.png"]["placeholder_similarity"] > 0.999
    assert all(rows[f"{i:02d}.jpg"]["status"] == "success" for i in range(10))
    assert rows["10.jpg"]["status"] == "failed_to_decode"
    decoded = [r for r in rows.values() if r["status"] != "failed_to_decode"]
    assert all(r["placeholder_similarity"] is not None for r in decoded)
    assert set(h5_rows(out)) == {rows[f"{i:02d}.jpg"]["key"] for i in range(10)}
    stats = json.loads((out / "stats.json").read_text())
    assert sum(stats["placeholder_similarity_histogram"]) == 12
    assert stats["placeholder_similarity_histogram"][-1] >= 2
    assert summary.totals["status"] == {"success": 10, "placeholder": 2, "failed_to_decode": 1}


def test_hdf5_layout_and_attributes(photos, tmp_path):
    out = tmp_path / "features"
    encode(photos, out, shard_size=6)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["00000.h5", "00001.h5"]
    with h5py.File(out / "00000.h5", "r") as f:  # plain h5py, nothing of vlmdata
        assert f["tokens"].shape == (6, 64, 64) and f["tokens"].dtype == np.float16
        assert f["tokens"].chunks == (1, 64, 64)  # one row per chunk: random row reads
        assert f["embeds"].shape == (6, 32) and f["embeds"].dtype == np.float16
        assert list(f["keys"].asstr()[:]) == [f"{i:09d}" for i in range(6)]
        assert f["captions"].asstr()[0] == ""
        attrs = dict(f.attrs)
    for name in ("model", "pretrained", "layer", "source_grid", "token_grid", "image_size",
                 "preprocessing", "vlmdata_version", "image_mean",
                 "placeholder_threshold"):  # fmt: skip
        assert name in attrs, name
    assert (attrs["source_grid"], attrs["token_grid"], attrs["layer"]) == (12, 8, 1)
    assert sum(s["rows"] for s in manifest["shards"]) == manifest["rows"] == 10


def test_encodes_preprocess_output_with_its_keys_and_captions(tmp_path):
    from vlmdata.pipeline.preprocess import PreprocessConfig, run_preprocess

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(make_image(300, 200, seed=i))
        (folder / f"{i}.txt").write_text(f"caption {i}")
    run_preprocess(
        PreprocessConfig(str(folder), str(tmp_path / "squares"), processes=1, quiet=True)
    )
    out = tmp_path / "features"
    encode(tmp_path / "squares", out)
    with h5py.File(out / "00000.h5", "r") as f:
        assert list(f["captions"].asstr()[:]) == [f"caption {i}" for i in range(3)]


def test_local_weights_file_is_used(photos, tmp_path):
    clip = load_clip(TINY, "none", "cpu", "fp32")
    with torch.no_grad():
        for parameter in clip.model.parameters():
            parameter.add_(0.05)  # different from the seeded random weights
    weights = tmp_path / "weights.pt"
    torch.save(clip.model.state_dict(), weights)
    with pytest.warns(UserWarning, match="unrecognised weights file"):
        encode(photos, tmp_path / "a", pretrained=str(weights), placeholder_filter=False)
    encode(photos, tmp_path / "b", placeholder_filter=False)
    with (
        h5py.File(tmp_path / "a" / "00000.h5", "r") as a,
        h5py.File(tmp_path / "b" / "00000.h5", "r") as b,
    ):
        assert not np.allclose(a["embeds"][:], b["embeds"][:])
        assert len(a.attrs["weights_sha256"]) == 64


def test_a_moved_weights_file_still_resumes(photos, tmp_path):
    """The plan compares a weights file by its sha256, not by where it lies."""
    clip = load_clip(TINY, "none", "cpu", "fp32")
    weights = tmp_path / "weights.pt"
    torch.save(clip.model.state_dict(), weights)
    out = tmp_path / "features"
    with pytest.warns(UserWarning, match="unrecognised weights file"):
        encode(photos, out, pretrained=str(weights), placeholder_filter=False)
    (out / "stats.json").unlink()  # a run killed before its end
    moved = tmp_path / "elsewhere.pt"
    weights.rename(moved)
    with pytest.warns(UserWarning, match="unrecognised weights file"):
        assert encode(photos, out, pretrained=str(moved), placeholder_filter=False)
    torch.save({k: v + 1 for k, v in clip.model.state_dict().items()}, weights)
    with pytest.raises(UserError, match="--pretrained weights with sha256"):
        encode(photos, out, pretrained=str(weights), placeholder_filter=False)


def test_a_failure_in_the_forward_stops_the_decoding_workers_at_once(photos, tmp_path, monkeypatch):
    """The workers hold the output's lock: kept alive by a traceback someone keeps (IPython's
    last error, a test's pytest.raises), they would lock out the retry in the same process."""

    def out_of_memory(*args):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(_ShardEncoder, "_encode_batch", out_of_memory)
    out = tmp_path / "features"
    with pytest.raises(RuntimeError, match="out of memory") as kept:
        encode(photos, out, workers=2, placeholder_filter=False)
    monkeypatch.undo()
    assert encode(photos, out, workers=2, placeholder_filter=False).totals["rows"] == 11
    del kept


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"tokens": "50"},
            "not a square number (4, 16, 64, ...); the patch grid of tiny-random-clip is 12x12",
        ),
        ({"tokens": "196"}, "needs a 14x14 grid but the patch grid of tiny-random-clip is 12x12"),
        ({"layer": 3}, "--layer 3 is out of range"),
        ({"model": "ViT-Q-99"}, "unknown --model"),
        (
            {"model": "ViT-B-32", "pretrained": "no-such-tag"},
            "neither a weights file nor a pretrained tag",
        ),
        ({"model": "ViT-B-32", "pretrained": "openai"}, "not in the local cache"),
        ({"precision": "fp16"}, "fp16 is not supported on CPU"),
        ({"references": ("/nope.png",)}, "--reference /nope.png"),
    ],
)
def test_bad_options_are_user_errors(photos, tmp_path, options, message):
    with pytest.raises(UserError, match=re.escape(message)):
        encode(photos, tmp_path / "out", **options)


def test_kill_mid_run_then_resume(photos, tmp_path):
    for i in range(11, 40):
        (photos / f"{i:02d}.jpg").write_bytes(make_image(200, 160, seed=i))
    out = tmp_path / "features"
    args = [sys.executable, "-m", "vlmdata", "encode", str(photos), str(out), "--model", TINY,
            "--device", "cpu", "--workers", "1", "--batch-size", "2", "--shard-size", "4",
            "--quiet", "--placeholder-threshold", str(THRESHOLD)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        args, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.stats.json"))) < 3 and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)
    done_before = sorted(p.name for p in out.glob("*.stats.json"))
    assert 3 <= len(done_before) < 10
    # A .h5 under its real name is always whole; a torn one can only be a hidden temp file.
    for path in out.glob("*.h5"):
        with h5py.File(path, "r") as f:
            assert len(f["keys"]) == f["tokens"].shape[0] == f["embeds"].shape[0] > 0
    finished = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert sorted(p.name for p in out.glob("*.h5")) == [f"{i:05d}.h5" for i in range(10)]
    keys = [k for p in sorted(out.glob("*.h5")) for k in h5py.File(p, "r")["keys"].asstr()[:]]
    assert len(keys) == len(set(keys)) == 39  # every decodable image once
    assert not list(out.glob(".*.tmp"))


def test_inspect_cli(photos, tmp_path):
    out = tmp_path / "features"
    encode(photos, out)
    for target, expected in ((out, "encode output, 1 shards done"), (out / "00000.h5", "tokens"),
                             (out / "00000.parquet", "status: success")):  # fmt: skip
        result = runner.invoke(app, ["inspect", str(target)])
        assert result.exit_code == 0 and expected in result.stdout, result.output
    bad = runner.invoke(app, ["inspect", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "does not exist" in bad.stderr


def test_encode_cli_summary(photos, tmp_path):
    result = runner.invoke(
        app, ["encode", str(photos), str(tmp_path / "o"), "--model", TINY, "--device", "cpu",
              "--workers", "0", "--quiet", "--tokens", "all", "--no-placeholder-filter"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "11 rows in 1 shards" in result.stdout and "success" in result.stdout
    with h5py.File(tmp_path / "o" / "00000.h5", "r") as f:
        assert f["tokens"].shape == (10, 144, 64)


@pytest.mark.parametrize(("change", "words"), [
    ({"square": SquareOptions(pad_threshold=0.8)}, "made with --pad-threshold 0.6, this run has "
                                                   "--pad-threshold 0.8"),
    ({"layer": 0}, "made with --layer 1, this run has --layer 0"),
    ({"tokens": "16"}, "made with --tokens 64, this run has --tokens 16"),
    ({"model": "ViT-B-32", "pretrained": "none", "tokens": "16"},
     "made with --model tiny-random-clip, this run has --model ViT-B-32"),
])  # fmt: skip
def test_a_refused_resume_names_the_flag_that_changed(photos, tmp_path, change, words):
    out = tmp_path / "features"
    encode(photos, out, tokens="64")
    with pytest.raises(UserError) as refused:
        encode(photos, out, **{"tokens": "64", **change})
    assert words in str(refused.value)
