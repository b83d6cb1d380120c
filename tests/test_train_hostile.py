"""`vlmdata train` used the wrong way: damaged inputs and run directories, odd options, moved
and changed runs. Each test pins one defect found by trying to break the command; a user
mistake must be one line and exit 2, and nothing the user has may be lost or silently wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import encode_folder, write_shape_images
from vlmdata.cli import app
from vlmdata.train.checkpoints import load_trained
from vlmdata.train.llm import load_llm
from vlmdata.train.trainer import TrainConfig, run_train

runner = CliRunner(env={"COLUMNS": "200"})
FAST = ["--llm", "tiny-random-llama", "--batch-size", "8", "--workers", "0", "--quiet"]


pytestmark = pytest.mark.usefixtures("quiet_random_weights")


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 shapes in 2 shards (read-only: copy to change it)."""
    root = tmp_path_factory.mktemp("hostile")
    write_shape_images(root / "images", 48)
    return encode_folder(root / "images", root / "features", shard_size=24)


def _cli(*args: object) -> object:
    return runner.invoke(app, ["train", *map(str, args)])


def _train(features: object, out: Path, *args: object) -> object:
    return _cli(features, "--out", out, *FAST, *args)


def _one_line(result: object, code: int = 2) -> str:
    """The single ``error:`` line of a refused command (no traceback, no internal error)."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "internal error" not in lines[0], lines[0]
    return lines[0]


def _copy(features: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(features, tmp_path / "features"))


def _adapter(run: Path, step: int) -> bytes:
    return (run / f"checkpoints/step-{step:08d}/projector.safetensors").read_bytes()


def _rewind(run: Path, step: int) -> None:
    """The run as a kill right after checkpoint ``step`` left it."""
    (run / "checkpoints/latest.json").write_text(json.dumps({"name": f"step-{step:08d}",
                                                             "step": step}))  # fmt: skip
    for later in (run / "checkpoints").glob("step-*"):
        if int(later.name.removeprefix("step-")) > step:
            shutil.rmtree(later)


# --- what the user already has is never overwritten ----------------------------------------


def test_out_holding_another_programs_config_json_is_refused(features, tmp_path):
    # The natural slip: --out naming the model directory (or any folder with a config.json).
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    result = _train(features, model, "--max-steps", 1)
    assert (model / "config.json").read_text() == '{"model_type": "llama"}'
    _one_line(result)


@pytest.mark.parametrize("inside", [False, True])
def test_out_in_a_features_dir_is_refused(features, tmp_path, inside):
    copy = _copy(features, tmp_path)
    out = copy / "run" if inside else copy
    _one_line(_train(copy, out, "--max-steps", 1))


def test_checkpoints_without_their_config_are_not_overwritten(features, tmp_path):
    run = tmp_path / "run"
    assert _train(features, run, "--max-steps", 1).exit_code == 0
    saved = _adapter(run, 1)
    (run / "config.json").unlink()
    for again in (["--resume"], []):
        result = _train(features, run, "--max-steps", 1, "--seed", 7, *again)
        assert _adapter(run, 1) == saved, result.output
        _one_line(result)


# --- nothing silently wrong -----------------------------------------------------------------


def test_non_finite_features_stop_the_run_instead_of_saving_nan_weights(features, tmp_path):
    copy = _copy(features, tmp_path)
    for h5 in copy.glob("*.h5"):
        with h5py.File(h5, "r+") as f:
            f["tokens"][...] = np.float16(np.nan)
    run = tmp_path / "run"
    result = _train(copy, run, "--max-steps", 2)
    for adapter in run.glob("checkpoints/step-*/projector.safetensors"):
        assert all(torch.isfinite(v).all() for v in load_file(adapter).values()), result.output
    metrics = run / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        json.loads(line, parse_constant=_not_json)  # NaN is not JSON: other readers refuse it
    assert result.exit_code != 0, result.output
    _one_line(result, result.exit_code)


def _not_json(name: str) -> None:
    raise AssertionError(f"metrics.jsonl holds {name}")


def test_one_dir_named_two_ways_is_read_once(features, tmp_path, monkeypatch):
    monkeypatch.chdir(features.parent)
    runs = [
        run_train(TrainConfig(features=names, out=str(tmp_path / f"r{i}"), llm="tiny-random-llama",
                              batch_size=8, workers=0, quiet=True, max_steps=1))
        for i, names in enumerate([(features.name,), (features.name, str(features))])
    ]  # fmt: skip
    assert runs[1].examples == runs[0].examples


def test_resume_refuses_features_that_changed(features, tmp_path):
    copy = _copy(features, tmp_path)
    hidden = copy / "00001.stats.json"
    stats = hidden.read_bytes()
    hidden.unlink()  # an encode still running: its second shard is not finished yet
    run, options = tmp_path / "run", ["--allow-incomplete", "--max-steps", 4, "--save-every", 2]
    assert _train(copy, run, *options).exit_code == 0
    _rewind(run, 2)
    hidden.write_bytes(stats)  # the encode finished meanwhile: twice the examples now
    _one_line(_train(copy, run, *options, "--resume"))


def test_steps_whose_answers_are_all_cut_away_are_refused(features, tmp_path):
    # 66 image positions and the prompt leave no room for any answer token at 82.
    result = _train(features, tmp_path / "run", "--max-steps", 1, "--max-length", 82)
    assert "train loss 0.0000" not in result.output
    _one_line(result)


def test_metrics_log_the_learning_rate_each_step_used(features, tmp_path):
    run = tmp_path / "run"
    assert _train(features, run, "--max-steps", 2, "--warmup", 0, "--lr", 1e-3).exit_code == 0
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["lr"] == pytest.approx(1e-3)  # no warmup: step 1 trains at the peak rate


# --- damaged or odd input is one line, before any training ---------------------------------


def test_a_data_row_whose_image_lies_beyond_max_length_is_caught_before_training(
    features, tmp_path
):
    turns = [{"from": "human", "value": "x" * 600 + "<image>"}, {"from": "gpt", "value": "red"}]
    late = {"image": "0003.jpg", "conversations": turns}
    data = tmp_path / "data.json"
    data.write_text(json.dumps([late]))
    run = tmp_path / "run"
    # One epoch of 5 batches, read by a worker process: the row is drawn somewhere in it.
    result = _cli(features, "--out", run, *FAST, "--workers", 1, "--max-steps", 6,
                  "--data", data)  # fmt: skip
    if result.exit_code == 0:  # skipped and reported, like a row naming no image
        assert "--data rows not used" in result.output
        return
    _one_line(result)
    assert not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text()


def test_damaged_keys_in_a_feature_shard_are_one_line(features, tmp_path):
    copy = _copy(features, tmp_path)
    h5 = copy / "00001.h5"
    with h5py.File(h5, "r") as f:
        chunk = f["keys"].id.get_chunk_info(0)
    with open(h5, "r+b") as f:  # the file opens, its keys point nowhere
        f.seek(chunk.byte_offset)
        f.write(b"\xab" * chunk.size)
    assert "00001.h5" in _one_line(_train(copy, tmp_path / "run", "--max-steps", 1))


@pytest.mark.parametrize("damage", ["trainer_state.pt", "projector.safetensors"])
def test_a_damaged_checkpoint_is_one_line(features, tmp_path, damage):
    run = tmp_path / "run"
    options = ["--max-steps", 4, "--save-every", 2]
    assert _train(features, run, *options).exit_code == 0
    _rewind(run, 2)
    (run / "checkpoints/step-00000002" / damage).write_bytes(b"junk" * 8)
    _one_line(_train(features, run, *options, "--resume"))


def test_unknown_precision_is_refused(features, tmp_path):
    assert "--precision" in _one_line(_train(features, tmp_path / "r", "--max-steps", 1,
                                             "--precision", "fp8"))  # fmt: skip


def test_an_empty_prompt_is_refused_not_replaced(features, tmp_path):
    assert "--prompt" in _one_line(_train(features, tmp_path / "r", "--max-steps", 1,
                                          "--prompt", " "))  # fmt: skip


def test_a_seed_out_of_range_is_one_line(features, tmp_path):
    assert "--seed" in _one_line(_train(features, tmp_path / "r", "--seed", 2**70))


def test_init_from_a_resampler_with_other_queries_is_one_line(features, tmp_path):
    first = tmp_path / "first"
    resampler = ["--projector", "resampler", "--max-steps", 1]
    assert _train(features, first, *resampler, "--queries", 16).exit_code == 0
    result = _train(features, tmp_path / "second", *resampler, "--queries", 4, "--init", first)
    assert "--queries" in _one_line(result)


# --- a run directory stays usable -----------------------------------------------------------


def test_a_moved_run_resumes(features, tmp_path):
    run, options = tmp_path / "run", ["--max-steps", 2, "--save-every", 1]
    assert _train(features, run, *options).exit_code == 0
    _rewind(run, 1)
    moved = Path(shutil.move(run, tmp_path / "moved"))
    result = _train(features, moved, *options, "--resume")
    assert result.exit_code == 0, result.output
    assert "trained 2/2" in result.output


def test_resuming_a_finished_run_keeps_its_summary(features, tmp_path):
    run = tmp_path / "run"
    assert _train(features, run, "--max-steps", 1).exit_code == 0
    before = json.loads((run / "summary.json").read_text())
    assert _train(features, run, "--max-steps", 1, "--resume").exit_code == 0
    after = json.loads((run / "summary.json").read_text())
    assert after["train_loss"] == before["train_loss"] and after["val_loss"] == before["val_loss"]


def test_a_relative_llm_directory_is_found_from_elsewhere(features, tmp_path, monkeypatch):
    llm = load_llm("tiny-random-llama", "cpu", torch.float32)
    llm.model.save_pretrained(tmp_path / "llm")
    llm.tokenizer.save_pretrained(tmp_path / "llm")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert _cli(features, "--out", run, *FAST, "--llm", "llm", "--max-steps", 1).exit_code == 0
    monkeypatch.chdir(features)  # caption, eval and --init run from anywhere
    assert load_trained(run, None, "cpu", torch.float32).checkpoint.name == "step-00000001"


def test_quiet_prints_no_progress_bar(features, tmp_path):
    llm = load_llm("tiny-random-llama", "cpu", torch.float32)
    llm.model.save_pretrained(tmp_path / "llm")
    llm.tokenizer.save_pretrained(tmp_path / "llm")
    result = _cli(features, "--out", tmp_path / "r", *FAST, "--llm", tmp_path / "llm",
                  "--max-steps", 1)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "it/s]" not in result.output, result.output


def test_a_second_stage_run_outlives_its_first_stage(features, tmp_path):
    # A frozen-LLM first stage leaves nothing the second needs but its adapter, read at start.
    first, second = tmp_path / "first", tmp_path / "second"
    assert _train(features, first, "--max-steps", 1).exit_code == 0
    assert _train(features, second, "--max-steps", 1, "--init", first).exit_code == 0
    shutil.move(first, tmp_path / "archived")
    assert load_trained(second, None, "cpu", torch.float32).checkpoint.name == "step-00000001"
