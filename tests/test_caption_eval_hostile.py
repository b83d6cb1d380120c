"""`vlmdata caption` and `vlmdata eval` under hostile input: each test is a bug found by
misusing them, and asks for one `error:` line and exit 2 (or a bounded run) instead of an
internal error, a misleading message or a runaway generation."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import one_error_line
from vlmdata.cli import app
from vlmdata.train.model import VisionLanguageModel

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights")
runner = CliRunner(env={"COLUMNS": "200"})


def an_image(features: Path) -> Path:
    return sorted((features.parent / "images").glob("*.jpg"))[0]


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *words: str) -> None:
    """One `error:` line naming the problem, exit 2, no internal error."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "internal error" not in errors[0], result.stderr
    for word in words:
        assert word in errors[0], errors[0]


def test_eval_out_that_is_a_file_is_a_user_error(trained_run, shape_features, tmp_path):
    # evaluate.py:128 out.mkdir() raises FileExistsError -> "internal error ... please report"
    taken = tmp_path / "results.json"
    taken.write_text("{}")
    result = invoke("eval", trained_run, shape_features, "--samples", 1, "--quiet", "--out", taken)
    assert_user_error(result, "--out")


def test_eval_out_that_cannot_be_made_is_a_user_error(trained_run, shape_features, tmp_path):
    # a parent that is a file: mkdir raises NotADirectoryError/FileExistsError -> internal error
    parent = tmp_path / "file"
    parent.write_text("")
    result = invoke("eval", trained_run, shape_features, "--samples", 1, "--quiet",
                    "--out", parent / "eval")  # fmt: skip
    assert_user_error(result, "--out")


def test_run_dir_that_is_a_file_is_not_called_a_damaged_config(trained_run, shape_features):
    # checkpoints.py:47 read_state_json(trained_run / CONFIG) raises NotADirectoryError, reported as
    # "RUN/config.json/config.json is damaged ...; delete it and rerun the stage"
    result = invoke("caption", trained_run / "config.json", an_image(shape_features))
    assert_user_error(result, "not a vlmdata training run")


def test_max_new_tokens_past_the_llm_context_is_refused(trained_run, shape_features, monkeypatch):
    # caption.py:164 only checks >= 1: --max-new-tokens 100000 runs generation far past the
    # LLM's 2048 positions (transformers warns, then it runs for many minutes on CPU).
    def generate(self, batch, stop_ids, max_new_tokens, *args, **kwargs):
        limit = self.llm.config.max_position_embeddings
        raise AssertionError(f"generated up to {max_new_tokens} tokens past a {limit} context")

    monkeypatch.setattr(VisionLanguageModel, "generate", generate)
    result = invoke("caption", trained_run, an_image(shape_features), "--max-new-tokens", 100_000)
    assert_user_error(result, "--max-new-tokens")


def test_num_does_not_multiply_the_generation_batch_unbounded(
    trained_run, shape_features, monkeypatch
):
    # caption.py:89 generates images x --num sequences in one call: --num 100000 allocates
    # gigabytes at once and dies with "internal error (RuntimeError: ... can't allocate
    # memory)". Either refuse such a --num, or generate at most --batch-size sequences a call.
    real = VisionLanguageModel.generate
    rows: list[int] = []

    def generate(self, batch, stop_ids, max_new_tokens, temperature=0.0, top_p=1.0, num=1):
        rows.append(len(batch.input_ids) * num)
        if rows[-1] > 64:
            raise AssertionError(f"{rows[-1]} sequences in one generate call")
        return real(self, batch, stop_ids, max_new_tokens, temperature, top_p, num)

    monkeypatch.setattr(VisionLanguageModel, "generate", generate)
    result = invoke("caption", trained_run, an_image(shape_features), "--num", 100_000,
                    "--temperature", 1, "--max-new-tokens", 1, "--batch-size", 4)  # fmt: skip
    if result.exit_code != 2:
        assert result.exit_code == 0, result.output
        assert max(rows) <= 4


def test_more_captions_than_a_batch_are_generated_in_rounds(
    trained_run, shape_features, monkeypatch
):
    real = VisionLanguageModel.generate
    rows: list[int] = []

    def generate(self, batch, stop_ids, max_new_tokens, temperature=0.0, top_p=1.0, num=1):
        rows.append(len(batch.input_ids) * num)
        return real(self, batch, stop_ids, max_new_tokens, temperature, top_p, num)

    monkeypatch.setattr(VisionLanguageModel, "generate", generate)
    result = invoke("caption", trained_run, an_image(shape_features), an_image(shape_features),
                    "--num", 6, "--temperature", 1, "--max-new-tokens", 2,
                    "--batch-size", 4)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert max(rows) <= 4 and sum(rows) == 12
    assert sum(line.count(" [") for line in result.output.splitlines()) == 12


@pytest.mark.parametrize(
    ("command", "said"),
    [
        (["eval", "{run}", "{features}", "--out", ""], "--out is empty; pass a path"),
        (["eval", "{run}", "{features}", "--images", ""], "--images is empty; pass a path"),
        (["caption", "{run}", "a.jpg", "--json", ""], "--json is empty; pass a path"),
        (["train", "{features}", "--llm", "tiny-random-llama", "--out", "o", "--init", ""],
         "--init is empty; pass a path"),
        (["train", "{features}", "--llm", "tiny-random-llama", "--out", "o", "--data", ""],
         "--data is empty; pass a path"),
        (["train", "{features}", "--llm", "", "--out", "o"],
         "--llm is empty; pass a model directory or a hub id"),
    ],
)  # fmt: skip
def test_an_empty_path_option_is_refused_not_taken_as_unset(command, said, trained_run,
                                                            shape_features, tmp_path,
                                                            monkeypatch):  # fmt: skip
    """eval --out '' wrote to the default place and train --init '' started from scratch,
    while ' ' was refused; --llm '' loaded the current directory."""
    monkeypatch.chdir(tmp_path)
    args = [a.format(run=trained_run, features=shape_features) for a in command]
    line = one_error_line(runner.invoke(app, args))
    assert said in line
    assert not (tmp_path / "o").exists()
