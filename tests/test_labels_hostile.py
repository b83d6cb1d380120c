"""`vlmdata labels` against a hostile user: malformed taxonomies, damaged features and caches,
odd label text, and the places the outputs land. Each test is one way it broke (or one that
holds and no other test covers); a refusal is one line and exit 2, never a traceback."""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
import warnings
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
from test_labels_classify import (
    TAXONOMY,
    TINY,
    labels_of,
    tiny_weights,
    unit_rows,
    write_features,
    write_taxonomy,
)
from test_labels_report import synthetic_rows, write_labels
from typer.testing import CliRunner

from conftest import make_image
from vlmdata.cli import app
from vlmdata.encode.stage import EncodeConfig, run_encode
from vlmdata.errors import UserError
from vlmdata.labels.classify import ClassifyConfig, run_classify
from vlmdata.labels.text import CACHE_FILE
from vlmdata.pipeline.shards import STAGE_DATA_FILES, ShardFiles, atomic_write_json, data_sizes

pytestmark = [
    pytest.mark.filterwarnings("ignore:tiny-random-clip has random weights"),
    pytest.mark.filterwarnings("ignore:unrecognised weights file"),
]
runner = CliRunner(env={"COLUMNS": "200"})


def invoke(*args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


def assert_refused(result, *fragments: str) -> None:
    """Exit 2, one line on stderr, no traceback, holding every fragment."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def classify_args(features: Path, out: Path, *more: object) -> list:
    return ["labels", "classify", features, out, "--device", "cpu", "--quiet", *more]


@pytest.fixture
def features(tmp_path: Path) -> Path:
    return write_features(tmp_path / "features", [unit_rows(6, 0), unit_rows(5, 1)])


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A webdataset folder of one tar (its keys are not the labels' keys: nothing is shown)."""
    folder = tmp_path / "images"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for name, data in (("x.jpg", make_image(40, 40)), ("x.txt", b"a caption")):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return folder


# --- taxonomy and template files -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text"),
    [
        # json raises ValueError (not JSONDecodeError) past Python's 4300-digit int limit
        ("bigint.json", '{"categories": {"a": [' + "9" * 5000 + "]}}"),
        # nesting past the recursion limit: RecursionError from the parser
        ("deep.json", '{"categories": {"a": ' + "[" * 100_000 + "]" * 100_000 + "}}"),
        # a lone surrogate escape is valid JSON syntax but not text: UnicodeEncodeError later
        ("surrogate.json", '{"categories": {"a": ["a cat \\ud800"]}}'),
        ("surrogate_category.json", '{"categories": {"\\ud800": ["a cat"]}}'),
    ],
    ids=["huge-integer", "deep-nesting", "lone-surrogate", "lone-surrogate-category"],
)
def test_malformed_taxonomy_json_is_a_one_line_refusal(tmp_path, features, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    assert_refused(invoke(*classify_args(features, tmp_path / "out", "--taxonomy", path,
                                         "--top-k", "1")), name)  # fmt: skip


def test_deeply_nested_taxonomy_yaml_is_a_one_line_refusal(tmp_path, features):
    pytest.importorskip("yaml")
    path = tmp_path / "deep.yaml"
    path.write_text("categories:\n  a: " + "[" * 20_000 + "]" * 20_000 + "\n")
    assert_refused(invoke(*classify_args(features, tmp_path / "out", "--taxonomy", path)),
                   "deep.yaml")  # fmt: skip


def test_lone_surrogate_in_templates_is_a_one_line_refusal(tmp_path, features):
    taxonomy = write_taxonomy(tmp_path / "taxonomy.json")
    templates = tmp_path / "templates.json"
    templates.write_text('["a photo of {} \\udc80"]')
    assert_refused(invoke(*classify_args(features, tmp_path / "out", "--taxonomy", taxonomy,
                                         "--templates", templates)), "templates.json")  # fmt: skip


@pytest.mark.parametrize("where", ["descriptions", "template"])
def test_text_past_the_models_context_is_not_silently_cut(tmp_path, features, where):
    """CLIP's tokenizer keeps 77 tokens: two descriptions that differ only after that (or any
    descriptions behind a long template) embed identically, and every probability is then
    1/len(descriptions) without a word to the user."""
    padding = "a very long and wordy preamble " * 20
    if where == "descriptions":
        taxonomy = {"animals": [padding + "with a cat", padding + "with a dog"],
                    "vehicles": ["a red sports car"]}  # fmt: skip
        templates = None
    else:
        taxonomy = TAXONOMY
        templates = tmp_path / "templates.json"
        templates.write_text(json.dumps([padding + "{}"]))
    path = write_taxonomy(tmp_path / "taxonomy.json", taxonomy)
    config = ClassifyConfig(str(features), str(tmp_path / "out"), taxonomy=str(path),
                            templates=str(templates) if templates else None, top_k=1,
                            device="cpu", quiet=True)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run_classify(config)
        except UserError as e:
            assert re.search(r"(?i)token|too long|context|shorten", str(e)), e
            return
    said = [str(w.message) for w in caught if "random weights" not in str(w.message)]
    assert any(re.search(r"(?i)token|too long|context|truncat", s) for s in said), said


def test_a_refused_taxonomy_fixed_reruns_into_the_same_directory(tmp_path, features):
    """The prompt-length check ran after plan.json recorded the refused taxonomy: the fixed
    one was then refused as "made with --taxonomy ..." in the same OUTPUT_DIR."""
    long = {"animals": ["a very long and wordy preamble " * 20 + "with a cat", "a dog"],
            "vehicles": ["a red sports car"]}  # fmt: skip
    path = write_taxonomy(tmp_path / "taxonomy.json", long)
    out = tmp_path / "out"
    assert_refused(invoke(*classify_args(features, out, "--taxonomy", path, "--top-k", "1")),
                   "shorten")  # fmt: skip
    write_taxonomy(path, {"animals": ["a cat", "a dog"], "vehicles": ["a red sports car"]})
    result = invoke(*classify_args(features, out, "--taxonomy", path, "--top-k", "1"))
    assert result.exit_code == 0, result.output
    assert labels_of(out).num_rows == 11


def test_labels_taxonomy_out_empty_is_a_one_line_refusal():
    assert_refused(invoke("labels", "taxonomy", "--out", ""), "--out")


def test_labels_taxonomy_out_through_a_symlink_keeps_the_link(tmp_path):
    """`--out /dev/stdout` (a symlink) as root replaced the system's /dev/stdout, and
    `--out /dev/full` the device node, by a regular file: the atomic rename replaces the link
    itself. Writing through the link, or refusing it, are both fine; replacing it is not."""
    target = tmp_path / "real.json"
    target.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    result = invoke("labels", "taxonomy", "--out", link)
    if result.exit_code == 2:
        return  # refused: the link is left alone
    assert result.exit_code == 0, result.output
    assert link.is_symlink(), "the symlink was replaced by a regular file"
    assert json.loads(target.read_text())["categories"]


# --- damaged or edited features --------------------------------------------------------------


def _refresh_marker(features: Path, name: str) -> None:
    """Record the shard's current file sizes in its marker, so it still vouches for them."""
    files = ShardFiles(features, name)
    stats = json.loads(files.stats.read_text())
    sizes = data_sizes(files, STAGE_DATA_FILES["encode"])
    atomic_write_json(files.stats, {**stats, "sizes": sizes})


def _corrupt_chunk_index(h5: Path) -> None:
    """Break the B-tree that indexes ``embeds``' chunks (the file opens, its data cannot be
    read), as a flipped block on a disk would; the file keeps its size."""
    data = h5.read_bytes()
    for match in re.finditer(b"TREE", data):
        damaged = data[: match.start()] + b"XXXX" + data[match.end() :]
        h5.write_bytes(damaged)
        try:
            with h5py.File(h5, "r") as f:
                assert f["keys"].shape and f["embeds"].shape
                try:
                    f["embeds"][:]
                except OSError:
                    return  # the one: opens, but its embeddings cannot be read
        except (OSError, KeyError):
            pass
        h5.write_bytes(data)
    pytest.fail("no B-tree of embeds found to damage")


def test_damaged_h5_data_is_a_one_line_refusal(tmp_path):
    features = write_features(tmp_path / "features", [unit_rows(600, 0)])
    _corrupt_chunk_index(features / "00000.h5")
    taxonomy = write_taxonomy(tmp_path / "taxonomy.json")
    assert_refused(invoke(*classify_args(features, tmp_path / "out", "--taxonomy", taxonomy)),
                   "00000.h5")  # fmt: skip


def _drop_keys(f: h5py.File) -> None:
    del f["keys"]


def _cut_keys(f: h5py.File) -> None:
    keys = f["keys"][:]
    del f["keys"]
    f.create_dataset("keys", data=keys[:3], dtype=h5py.string_dtype())


def _flat_embeds(f: h5py.File) -> None:
    embeds = f["embeds"][:]
    del f["embeds"]
    f["embeds"] = embeds[:, 0]


def _number_keys(f: h5py.File) -> None:
    del f["keys"]
    f["keys"] = np.arange(6)


@pytest.mark.parametrize("damage", [_drop_keys, _cut_keys, _flat_embeds, _number_keys])
def test_a_malformed_h5_is_a_one_line_refusal(tmp_path, features, damage):
    """A feature shard without keys, with fewer keys than embeddings, with 1-D embeddings or
    with number keys: not an encode shard; `labels classify` should say so, not crash."""
    with h5py.File(features / "00000.h5", "r+") as f:
        damage(f)
    _refresh_marker(features, "00000")
    taxonomy = write_taxonomy(tmp_path / "taxonomy.json")
    assert_refused(invoke(*classify_args(features, tmp_path / "out", "--taxonomy", taxonomy)),
                   "00000.h5")  # fmt: skip


def test_an_unknown_model_in_the_h5_attributes_names_the_features_not_a_flag(tmp_path):
    features = write_features(tmp_path / "features", [unit_rows(3)],
                              {"model": "no-such-model", "pretrained": "random"})  # fmt: skip
    taxonomy = write_taxonomy(tmp_path / "taxonomy.json")
    result = invoke(*classify_args(features, tmp_path / "out", "--taxonomy", taxonomy))
    assert_refused(result, "no-such-model")
    assert "--model" not in result.stderr, "the user passed no --model: the .h5 names it"


def test_non_finite_embeddings_get_no_made_up_label(tmp_path):
    """An embedding of NaN (fp16 overflow in the encoder, or a damaged chunk) used to get a
    description and category anyway, with a NaN probability. It is left unlabelled (nulls, as
    the report counts them) and counted apart; the other rows are labelled as before."""
    embeds = unit_rows(4)
    embeds[1] = np.nan
    embeds[2, 0] = np.inf
    features = write_features(tmp_path / "features", [embeds])
    taxonomy = write_taxonomy(tmp_path / "taxonomy.json")
    out = tmp_path / "out"
    run_classify(ClassifyConfig(str(features), str(out), taxonomy=str(taxonomy), top_k=2,
                                device="cpu", quiet=True))  # fmt: skip
    rows = labels_of(out).to_pylist()
    for i in (1, 2):
        assert {k: v for k, v in rows[i].items() if k not in ("key", "row")} == dict.fromkeys(
            ["description", "category", "cosine", "probability", "top_category",
             "top_category_probability", "top_k_descriptions", "top_k_probabilities"]
        )  # fmt: skip
    for i in (0, 3):
        assert rows[i]["description"] is not None and len(rows[i]["top_k_descriptions"]) == 2
        assert math.isfinite(rows[i]["probability"]) and math.isfinite(rows[i]["cosine"])
    stats = json.loads((out / "00000.stats.json").read_text())
    assert stats["unlabelled"] == 2 and sum(stats["description"].values()) == 2
    assert json.loads((out / "stats.json").read_text())["unlabelled"] == 2


def test_weights_file_given_by_a_relative_path_is_found_from_another_directory(
    tmp_path, monkeypatch
):
    """encode records --pretrained as typed: a relative path is then looked up from wherever
    `labels classify` runs, and the file that never moved is reported "no longer at"."""
    photos = tmp_path / "encode_here" / "photos"
    photos.mkdir(parents=True)
    for i in range(3):
        (photos / f"{i}.jpg").write_bytes(make_image(64, 64, seed=i))
    tiny_weights(tmp_path / "encode_here" / "tiny.pt", 1)
    monkeypatch.chdir(tmp_path / "encode_here")
    run_encode(EncodeConfig("photos", str(tmp_path / "features"), model=TINY,
                            pretrained="tiny.pt", device="cpu", workers=0, quiet=True,
                            placeholder_filter=False))  # fmt: skip
    taxonomy = write_taxonomy(tmp_path / "taxonomy.json")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run_classify(ClassifyConfig(str(tmp_path / "features"), str(tmp_path / "labels"),
                                taxonomy=str(taxonomy), device="cpu", quiet=True))  # fmt: skip
    assert labels_of(tmp_path / "labels").num_rows == 3


def test_a_cache_of_the_wrong_shape_is_rebuilt_not_trusted(tmp_path, features):
    """The cache is keyed by model, weights, taxonomy and templates; one whose key matches but
    whose matrix does not fit the taxonomy (hand-edited, or written by a buggy tool) must be
    rebuilt like a damaged one, not fed to the matrix product."""
    taxonomy = write_taxonomy(tmp_path / "taxonomy.json")
    out = tmp_path / "labels"
    config = ClassifyConfig(str(features), str(out), taxonomy=str(taxonomy), device="cpu",
                            quiet=True)  # fmt: skip
    run_classify(config)
    whole = labels_of(out)
    with np.load(out / CACHE_FILE) as cache:
        key = str(cache["key"])
    with open(out / CACHE_FILE, "wb") as f:
        np.savez(f, key=np.array(key), embeddings=np.zeros((3, 7), np.float32),
                 logit_scale=np.array(100.0))  # fmt: skip
    (out / "00001.stats.json").unlink()
    run_classify(config)
    assert labels_of(out) == whole


# --- the report ------------------------------------------------------------------------------


def test_report_survives_dollar_signs_in_label_text(tmp_path, images):
    """matplotlib reads text between two $ as mathtext: a description such as a price list
    crashed the charts (an internal ValueError), and others are drawn garbled."""
    rows = synthetic_rows(40, 0, np.random.default_rng(0))
    for i, row in enumerate(rows):
        if i % 2:
            text = "a shelf label #1 for $3 and #2 for $4"
            row.update(description=text, top_k_descriptions=[text])
    labels = write_labels(tmp_path / "labels", [rows])
    result = invoke("labels", "report", labels, "--images", images, "--quiet")
    assert result.exit_code == 0, result.output
    page = (labels / "report" / "index.html").read_text(encoding="utf-8")
    assert "a shelf label #1 for $3 and #2 for $4" in page


def test_report_on_nan_scores_names_a_file_that_exists(tmp_path, images):
    """Labels with a NaN probability (see test_non_finite_embeddings_get_no_made_up_label) made
    the report call "00000..00001.parquet" damaged and ask to delete "00000..00001.stats.json":
    neither exists, and neither file is damaged."""
    rng = np.random.default_rng(0)
    shards = [synthetic_rows(20, 0, rng), synthetic_rows(20, 20, rng)]
    shards[1][3].update(probability=float("nan"), cosine=float("nan"))
    labels = write_labels(tmp_path / "labels", shards)
    result = invoke("labels", "report", labels, "--images", images, "--quiet")
    if result.exit_code == 0:
        return  # reported (the NaN row counted apart or left out): fine
    assert_refused(result)
    for named in re.findall(r"(\S+\.(?:parquet|stats\.json))", result.stderr):
        assert Path(named).exists(), f"the message names {named}, which does not exist"


def test_report_folder_is_as_readable_as_its_files(tmp_path, images):
    """The report folder is made by tempfile.mkdtemp (mode 0700) and renamed into place: the
    page a user means to share or serve is unreadable to anyone else, unlike every file in it
    and every other output."""
    labels = write_labels(tmp_path / "labels", [synthetic_rows(10, 0, np.random.default_rng(0))])
    result = invoke("labels", "report", labels, "--images", images, "--quiet")
    assert result.exit_code == 0, result.output
    report = labels / "report"
    assert report.stat().st_mode & 0o777 == (report / "thumbs").stat().st_mode & 0o777


# --- what holds, not covered elsewhere ---------------------------------------------------------


def test_html_in_keys_captions_and_category_names_is_escaped(tmp_path):
    """Keys, captions and label text from the data end up in the page: all escaped, and a
    key that is not a plain file name still gets a thumbnail inside the report."""
    keys = ["<img src=x onerror=alert(1)>", "q\"uo'te", "a#b", "ünï", "dir/x"]
    folder = tmp_path / "wds"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for i, key in enumerate(keys):
            for suffix, data in ((".jpg", make_image(50, 50, seed=i)),
                                 (".txt", b"<script>alert('x')</script>")):  # fmt: skip
                member = tarfile.TarInfo(key + suffix)
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    features = tmp_path / "features"
    run_encode(EncodeConfig(str(folder), str(features), model=TINY, pretrained="none",
                            device="cpu", workers=0, quiet=True,
                            placeholder_filter=False))  # fmt: skip
    odd = {"<b>bold</b>": ["a <i>cat</i>"], "dogs & co": ["a dog"]}
    taxonomy = write_taxonomy(tmp_path / "taxonomy.json", odd)
    labels = tmp_path / "labels"
    assert invoke(*classify_args(features, labels, "--taxonomy", taxonomy, "--top-k", "1")
                  ).exit_code == 0  # fmt: skip
    assert sorted(pq.read_table(labels / "00000.parquet")["key"].to_pylist()) == sorted(keys)
    result = invoke("labels", "report", labels, "--images", folder, "--quiet")
    assert result.exit_code == 0, result.output
    assert f"{len(keys)} thumbnails" in result.stdout and "could not" not in result.stdout
    page = (labels / "report" / "index.html").read_text(encoding="utf-8")
    for raw in ("<script>", "<img src=x", "<b>bold", "<i>cat"):
        assert raw not in page, raw
    assert "&lt;script&gt;" in page
    thumbs = labels / "report" / "thumbs"
    assert all(p.parent == thumbs for p in thumbs.rglob("*"))
