"""`vlmdata run PIPELINE.toml` and the `vlmdata.toml` record every command leaves: the stages
run in order, each resuming as it does alone; the whole file is checked before any runs; the
record of a run is a config file that runs it again."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import one_error_line, write_shape_images
from vlmdata import __version__
from vlmdata.cli import app

runner = CliRunner(env={"COLUMNS": "200"})
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

SMALL_PIPELINE = """\
input = "{images}"
output = "{out}"

[encode]
model = "tiny-random-clip"
pretrained = "none"
no-placeholder-filter = true
workers = 0
shard-size = 20

[labels]
{labels}
[train]
llm = "tiny-random-llama"
max-steps = 3
batch-size = 4
workers = 0
val-fraction = 0.2

[eval]
samples = 3
max-new-tokens = 4
"""


pytestmark = pytest.mark.usefixtures("quiet_random_weights")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("run") / "images"
    write_shape_images(folder, 40)
    return folder


def _pipeline(tmp_path: Path, images: Path, labels: str = "") -> tuple[Path, Path]:
    out = tmp_path / "out"
    path = tmp_path / "pipeline.toml"
    path.write_text(SMALL_PIPELINE.format(images=images, out=out, labels=labels))
    return path, out


def test_a_pipeline_runs_its_stages_records_them_and_a_rerun_redoes_nothing(tmp_path, images):
    pipeline, out = _pipeline(tmp_path, images)
    first = runner.invoke(app, ["run", str(pipeline), "--quiet"])
    assert first.exit_code == 0, first.output
    for step in ("vlmdata encode", "vlmdata labels classify", "vlmdata train", "vlmdata eval",
                 "vlmdata report"):  # fmt: skip
        assert step in first.output
    assert "vlmdata labels report" not in first.output  # a plain image folder: no shards
    assert f"report: {out / 'report.html'}" in first.output
    assert "Nothing to do" not in first.output
    metrics = (out / "train" / "metrics.jsonl").read_text()
    recorded = tomllib.loads((out / "pipeline.toml").read_text())
    assert (recorded["input"], recorded["output"]) == (str(images), str(out))
    assert recorded["labels"] == {} and recorded["train"]["max-steps"] == 3

    again = runner.invoke(app, ["run", str(out / "pipeline.toml"), "--quiet"])
    assert again.exit_code == 0, again.output
    assert again.output.count("Nothing to do") == 2  # encode and labels
    assert (out / "train" / "metrics.jsonl").read_text() == metrics  # not trained again
    # Each stage directory records how it was made, readable as a --config file.
    for stage, key, value in [("encode", "model", "tiny-random-clip"), ("labels", "top-k", 5),
                              ("train", "max-steps", 3)]:  # fmt: skip
        text = (out / stage / "vlmdata.toml").read_text()
        assert text.startswith(f"# vlmdata {__version__}: `vlmdata ")
        assert tomllib.loads(text)[key] == value


def test_a_failed_stage_stops_the_run_and_a_rerun_continues_from_it(tmp_path, images):
    pipeline, out = _pipeline(tmp_path, images, labels=f'taxonomy = "{tmp_path / "no.json"}"')
    failed = runner.invoke(app, ["run", str(pipeline), "--quiet"])
    assert failed.exit_code == 2, failed.output
    assert "stopped at labels classify" in failed.output
    assert f"rerun vlmdata run {pipeline}" in failed.output
    assert (out / "encode" / "stats.json").exists() and not (out / "train").exists()

    pipeline.write_text(pipeline.read_text().replace(f'taxonomy = "{tmp_path / "no.json"}"', ""))
    fixed = runner.invoke(app, ["run", str(pipeline), "--quiet"])
    assert fixed.exit_code == 0, fixed.output
    assert f"Nothing to do: all 2 shards (40 rows) in {out / 'encode'}" in fixed.output
    assert (out / "labels" / "stats.json").exists() and (out / "train" / "summary.json").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("[labels]", "[label]"), "unknown key 'label'; did you mean 'labels'?"),
        (("workers = 0\nshard", "worker = 0\nshard"), "[encode]: encode has no option 'worker'; "
                                                      "did you mean 'workers'?"),
        (("[labels]", "[labels]\noutput-dir = 'x'"), "'output-dir' is set by vlmdata run"),
        (("max-steps = 3", "max-steps = 'many'"), "[train] invalid value for '--max-steps'"),
        (('llm = "tiny-random-llama"', ""), "[train] missing option '--llm'"),
        (("output = ", "outputs = "), "unknown key 'outputs'; did you mean 'output'?"),
        (("[eval]", "eval = 3\n[evaluation]"), "unknown key 'evaluation'"),
        (("[encode]", "encode = 1\n[x]"), "encode must be a table"),
        (("[train]", "[labels.reprot]\n[train]"), "[labels.reprot] is no table vlmdata run knows"),
    ],
)  # fmt: skip
def test_pipeline_mistakes_are_one_line_before_any_stage_runs(tmp_path, images, edit, message):
    pipeline, out = _pipeline(tmp_path, images)
    pipeline.write_text(pipeline.read_text().replace(*edit, 1))
    line = one_error_line(runner.invoke(app, ["run", str(pipeline)]))
    assert message in line
    assert not out.exists()


def test_the_printed_template_and_the_examples_are_valid_pipelines(tmp_path):
    printed = runner.invoke(app, ["run", "--print-config"])
    assert printed.exit_code == 0, printed.output
    template = tmp_path / "pipeline.toml"
    template.write_text(printed.output)
    stages = tomllib.loads(printed.output)
    assert {"download", "encode", "labels", "train", "eval"} <= set(stages)
    assert "# [preprocess]" in printed.output and "# batch-size = 64" in printed.output
    demo = ["--input", "u.parquet", "--output", "d"]  # the demo supplies them
    for path, extra in [(template, []), (EXAMPLES / "capsfusion.toml", []),
                        (EXAMPLES / "demo.toml", demo)]:  # fmt: skip
        dry = runner.invoke(app, ["run", str(path), "--dry-run", *extra])
        assert dry.exit_code == 0, (path, dry.output)
        lines = dry.output.splitlines()
        assert lines[0].startswith("vlmdata download ") and lines[-1].startswith("vlmdata report")
    capsfusion = runner.invoke(app, ["run", str(EXAMPLES / "capsfusion.toml"), "--dry-run"])
    assert "--model ViT-L-14-336 --pretrained openai" in capsfusion.output
    assert "--keep-col laion_2b --keep-col laion_coco --resize 448" in capsfusion.output


def test_a_record_runs_the_same_command_again(tmp_path, images):
    out = tmp_path / "features"
    made = runner.invoke(app, ["encode", str(images), str(out), "--model", "tiny-random-clip",
                               "--pretrained", "none", "--workers", "0", "--quiet"])  # fmt: skip
    assert made.exit_code == 0, made.output
    record = tomllib.loads((out / "vlmdata.toml").read_text())
    assert record["batch-size"] == 64 and record["placeholder-threshold"] == 0.92  # defaults too
    assert "quiet" not in record and "config" not in record
    again = runner.invoke(app, ["encode", "--config", str(out / "vlmdata.toml")])
    assert again.exit_code == 0, again.output
    assert "Nothing to do" in again.output


def _dry_run(tmp_path: Path, text: str, *flags: str) -> list[str]:
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(text)
    result = runner.invoke(app, ["run", str(pipeline), "--dry-run", *flags])
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def test_each_stage_reads_what_the_stage_before_it_wrote(tmp_path):
    chain = _dry_run(tmp_path, 'input = "u.parquet"\noutput = "o"\n[download]\n[preprocess]\n'
                               "[encode]\n[labels]\n[train]\nllm = 'x'\n[eval]\n")  # fmt: skip
    assert chain == [
        "vlmdata download u.parquet o/download",
        "vlmdata preprocess o/download o/preprocess",
        "vlmdata encode o/preprocess o/encode",
        "vlmdata labels classify o/encode o/labels",
        "vlmdata labels report o/labels --images o/preprocess",
        "vlmdata train o/encode --out o/train --resume --llm x",
        "vlmdata eval o/train o/encode --images o/preprocess",
        "vlmdata report o",
    ]


def test_a_pipeline_may_start_from_features(tmp_path):
    """The input of a pipeline that starts after encode is the features; without one, the
    features an earlier run encoded into OUTPUT/encode. Eval then has no images to show
    unless its table names them."""
    given = _dry_run(tmp_path, 'input = "feats"\noutput = "o"\n[labels]\n[train]\nllm = "x"\n'
                               "[eval]\n")  # fmt: skip
    assert given[:2] == ["# no labels report: it shows thumbnails from image shards, and this "
                         "pipeline has none (run download or preprocess in it)",
                         "# eval without thumbnails: the pipeline does not know the images (set "
                         'images = "DIR" under [eval])']  # fmt: skip
    assert given[2:] == ["vlmdata labels classify feats o/labels",
                         "vlmdata train feats --out o/train --resume --llm x",
                         "vlmdata eval o/train feats", "vlmdata report o"]  # fmt: skip
    earlier = _dry_run(tmp_path, 'output = "o"\n[train]\nllm = "x"\n[eval]\nimages = "shards"\n')
    assert earlier[-3:] == ["vlmdata train o/encode --out o/train --resume --llm x",
                            "vlmdata eval o/train o/encode --images shards",
                            "vlmdata report o"]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "flags", "said"),
    [
        ("[encode]\nmodel = 'x'\n", ["--input", "shards", "--output", "s3://b/pipe"],
         "output s3://b/pipe: this command reads and writes local paths; write to a local"),
        ("[train]\nllm = 'x'\n", ["--input", "s3://b/features", "--output", "o"],
         "input s3://b/features: this command reads and writes local paths; copy it to a"),
    ],
)  # fmt: skip
def test_an_object_store_url_where_the_pipeline_needs_a_path_is_refused(
    text, flags, said, tmp_path, monkeypatch
):
    """The pipeline's output became a local directory named "s3:" (Path squeezes "//")."""
    monkeypatch.chdir(tmp_path)
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(text)
    line = one_error_line(runner.invoke(app, ["run", str(pipeline), "--dry-run", *flags]))
    assert said in line
    assert not (tmp_path / "s3:").exists()


def test_an_option_set_twice_is_refused(tmp_path, images):
    pipeline, _ = _pipeline(tmp_path, images)
    pipeline.write_text(
        pipeline.read_text().replace("max-steps = 3", "max-steps = 3\nmax_steps = 4")
    )
    line = one_error_line(runner.invoke(app, ["run", str(pipeline)]))
    assert "[train]: 'max_steps' is set twice; keep one" in line


def test_the_rerun_hint_keeps_the_input_and_output_given(tmp_path, images):
    pipeline = tmp_path / "p.toml"
    missing = tmp_path / "none.json"
    pipeline.write_text("[encode]\nmodel = 'tiny-random-clip'\npretrained = 'none'\n"
                        f"workers = 0\n[labels]\ntaxonomy = '{missing}'\n")  # fmt: skip
    out = tmp_path / "o"
    result = runner.invoke(app, ["run", str(pipeline), "--input", str(images), "--output",
                                 str(out), "--quiet"])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"rerun vlmdata run {pipeline} --input {images} --output {out} to continue" in (
        result.output
    )


def test_a_record_stays_valid_toml_whatever_the_directory_is_called(tmp_path, images):
    out = tmp_path / "feat\nures [x]"
    made = runner.invoke(app, ["encode", str(images), str(out), "--model", "tiny-random-clip",
                               "--pretrained", "none", "--workers", "0", "--quiet"])  # fmt: skip
    assert made.exit_code == 0, made.output
    text = (out / "vlmdata.toml").read_text()
    assert tomllib.loads(text)["output-dir"] == str(out)
    assert all(line.startswith("#") for line in text.splitlines()[:3])
