"""`vlmdata inspect` on damaged outputs: one line per bad file, never a traceback, and the rest of
the directory still described."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_image
from vlmdata.cli import app
from vlmdata.describe import describe
from vlmdata.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore:tiny-random-clip has random weights")
runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    """A finished preprocess output (3 tar shards) and the encode output made from it."""
    from vlmdata.encode.stage import EncodeConfig, run_encode
    from vlmdata.pipeline.preprocess import PreprocessConfig, run_preprocess

    root = tmp_path_factory.mktemp("outputs")
    photos = root / "photos"
    photos.mkdir()
    for i in range(5):
        (photos / f"{i}.jpg").write_bytes(make_image(160 + 10 * i, 120, seed=i))
    squares, features = root / "squares", root / "features"
    run_preprocess(
        PreprocessConfig(str(photos), str(squares), shard_size=2, processes=1, quiet=True)
    )
    encode = dict(model="tiny-random-clip", device="cpu", workers=0, batch_size=4, quiet=True)
    run_encode(EncodeConfig(str(squares), str(features), placeholder_filter=False, **encode))
    return {"preprocess": squares, "encode": features}


@pytest.fixture
def features(outputs, tmp_path) -> Path:
    return Path(shutil.copytree(outputs["encode"], tmp_path / "features"))


@pytest.fixture
def squares(outputs, tmp_path) -> Path:
    return Path(shutil.copytree(outputs["preprocess"], tmp_path / "squares"))


def random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(5000))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def text(content: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(content)


def inspect_cli(path: Path) -> tuple[int, str]:
    result = runner.invoke(app, ["inspect", str(path)])
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "internal error" not in output, output
    return result.exit_code, output


def test_the_fixtures_are_whole(features, squares):
    for directory in (features, squares):
        report = describe(str(directory))
        assert "corrupt" not in report and "missing" not in report, report
    assert "encode output, 3 shards done" in describe(str(features))


# --- one damaged file given alone: one UserError line ---------------------------------------


@pytest.mark.parametrize(
    ("name", "damage", "kind"),
    [
        ("00000.h5", random_bytes, "HDF5"),
        ("00000.h5", truncate, "HDF5"),
        ("00000.h5", empty, "HDF5"),
        ("00000.parquet", random_bytes, "parquet"),
        ("00000.parquet", truncate, "parquet"),
    ],
)
def test_a_damaged_shard_file_is_one_user_error(features, name, damage, kind):
    target = features / name
    damage(target)
    with pytest.raises(UserError) as caught:
        describe(str(target))
    message = str(caught.value)
    assert "\n" not in message and f"not a readable {kind} file" in message, message
    assert name in message
    code, output = inspect_cli(target)
    assert code == 2 and f"not a readable {kind} file" in output


@pytest.mark.parametrize("damage", [random_bytes, truncate])
def test_a_damaged_tar_is_one_user_error(squares, damage):
    target = squares / "00000.tar"
    damage(target)
    with pytest.raises(UserError, match="not a readable tar file") as caught:
        describe(str(target))
    assert "\n" not in str(caught.value)
    code, output = inspect_cli(target)
    assert code == 2 and "not a readable tar file" in output


# --- a directory: one line per damaged file, and the rest still reported -----------------------


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("plan.json", empty),
        ("plan.json", text('{"stage": "enc')),
        ("plan.json", text('["encode"]')),
        ("stats.json", empty),
        ("stats.json", text("[1, 2]")),
        ("stats.json", text('{"complete": true}')),
        ("stats.json", text('{"rows": 5, "status": "all fine"}')),
        ("manifest.json", truncate),
        ("manifest.json", text('{"rows": 3}')),
        ("manifest.json", text('{"rows": 3, "shards": [], "attrs": {"model": "x"}}')),
        ("00001.stats.json", truncate),
        ("00001.stats.json", text('"done"')),
        ("00001.h5", random_bytes),
        ("00001.h5", truncate),
        ("00001.parquet", random_bytes),
        ("00001.parquet", truncate),
    ],
)
def test_a_damaged_file_in_an_encode_output_is_one_line(features, name, damage):
    damage(features / name)
    report = describe(str(features))
    bad = [line for line in report.splitlines() if line.strip().startswith(f"{name}:")]
    assert len(bad) == 1 and "corrupt (" in bad[0], report
    assert sum("corrupt" in line for line in report.splitlines()) == 1, report
    assert "encode output" in report or name == "plan.json"
    code, output = inspect_cli(features)
    assert code == 0 and bad[0] in output


@pytest.mark.parametrize("damage", [random_bytes, truncate])
def test_a_damaged_tar_in_a_preprocess_output_is_one_line(squares, damage):
    damage(squares / "00001.tar")
    report = describe(str(squares))
    assert "00001.tar: corrupt (" in report, report
    assert "preprocess output, 3 shards done" in report and "rows: 5" in report
    code, output = inspect_cli(squares)
    assert code == 0 and "00001.tar: corrupt (" in output


def test_a_missing_manifest_of_a_complete_run_is_reported(features):
    (features / "manifest.json").unlink()
    report = describe(str(features))
    assert "manifest.json: missing" in report and "rows: 5" in report, report


def test_every_damaged_file_gets_its_line_and_the_rest_is_reported(features):
    empty(features / "plan.json")
    text("[1]")(features / "stats.json")
    random_bytes(features / "00000.h5")
    truncate(features / "00001.parquet")
    truncate(features / "00002.stats.json")
    report = describe(str(features))
    for name in ("plan.json", "stats.json", "00000.h5", "00001.parquet", "00002.stats.json"):
        assert f"  {name}: corrupt (" in report, (name, report)
    assert "2 shards done" in report  # the damaged marker marks nothing
    assert "features: 5 rows in 3 .h5 files" in report  # the manifest is still read
    code, output = inspect_cli(features)
    assert code == 0 and "00001.parquet: corrupt" in output


def test_a_directory_whose_plan_is_not_an_object_still_lists_its_files(features):
    text("null")(features / "plan.json")
    report = describe(str(features))
    assert report.splitlines()[0].endswith("? output, 3 shards done"), report
    assert "  plan.json: corrupt (not a JSON object)" in report


def test_many_damaged_files_are_counted_past_a_limit(features):
    from vlmdata.describe import MAX_PROBLEM_LINES

    for i in range(3, 3 + MAX_PROBLEM_LINES + 7):
        (features / f"{i:05d}.stats.json").write_text("{")
    report = describe(str(features))
    assert sum("corrupt (" in line for line in report.splitlines()) == MAX_PROBLEM_LINES
    assert report.splitlines()[-1] == "  ... and 7 more damaged files"
    assert "encode output, 3 shards done" in report
