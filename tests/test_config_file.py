"""`--config FILE.toml` on every command: its keys are the command's option (and argument)
names, the flags given override them, and a key the command does not have is one line naming
the closest one."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import one_error_line
from vlmdata.cli import app

runner = CliRunner(env={"COLUMNS": "200"})


pytestmark = pytest.mark.usefixtures("quiet_random_weights")


def test_a_config_file_sets_options_and_flags_override_it(shape_features, tmp_path):
    run = tmp_path / "run"
    config = tmp_path / "train.toml"
    config.write_text(
        f'features = ["{shape_features}"]\nllm = "tiny-random-llama"\nout = "{run}"\n'
        "max-steps = 3\nbatch_size = 8\nworkers = 0\nquiet = true\nprompt = ['Describe.']\n"
    )
    result = runner.invoke(app, ["train", "--config", str(config), "--max-steps", "1"])
    assert result.exit_code == 0, result.output
    assert "trained 1/1 steps" in result.output  # the flag over the file's 3
    options = json.loads((run / "config.json").read_text())["options"]
    assert (options["batch_size"], options["workers"], options["prompts"]) == (8, 0, ["Describe."])


@pytest.mark.parametrize(
    ("command", "key", "suggestion"),
    [(["train", "x"], "batchsize", "batch-size"), (["encode", "a", "b"], "modle", "model"),
     (["labels", "classify", "a", "b"], "top_kk", "top-k"), (["download", "a", "b"], "zzz", None)],
)  # fmt: skip
def test_an_unknown_key_names_the_closest_option(tmp_path, command, key, suggestion):
    config = tmp_path / "c.toml"
    config.write_text(f"{key} = 1\n")
    line = one_error_line(runner.invoke(app, [*command, "--config", str(config)]))
    assert f"no option {key!r}" in line
    if suggestion:
        assert f"did you mean {suggestion!r}" in line
    else:
        assert "did you mean" not in line


def test_an_unreadable_config_is_one_line(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("max-steps = \n")
    assert "pass a TOML file" in one_error_line(
        runner.invoke(app, ["train", "x", "--config", str(broken)])
    )
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    assert "pass a TOML file" in one_error_line(
        runner.invoke(app, ["train", "x", "--config", str(binary)])
    )
    table = tmp_path / "table.toml"
    table.write_text("[download]\nconcurrency = 3\n")
    assert "put download's options at the top level" in one_error_line(
        runner.invoke(app, ["download", "a", "b", "--config", str(table)])
    )
    missing = tmp_path / "missing.toml"
    assert "cannot read --config" in one_error_line(
        runner.invoke(app, ["train", "x", "--config", str(missing)])
    )


def test_a_value_of_the_wrong_type_is_refused(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('batch-size = "many"\n')
    result = runner.invoke(app, ["train", "x", "--llm", "l", "--out", "o", "--config", str(config)])
    assert result.exit_code == 2 and "batch-size" in result.output


@pytest.mark.parametrize(
    ("setting", "message"),
    [('output-dir = ["x", "y"]', "output-dir is a list; give it one value"),
     ("output-dir = {a = 1}", "output-dir is a table; give it a value"),
     ("output-dir = 2024-01-01T00:00:00Z", "output-dir is a date or time"),
     ("device = true", "device is true/false; give it a value"),
     ("quiet = 'yes'", "quiet is a flag: give true or false"),
     ('reference = "one.png"', "reference is not a list of values")],
)  # fmt: skip
def test_a_value_of_the_wrong_shape_is_one_line(tmp_path, setting, message):
    """click would take a list or table as its text: a directory named "['x', 'y']"."""
    config = tmp_path / "c.toml"
    config.write_text(f'input-dir = "{tmp_path}"\n{setting}\n')
    line = one_error_line(runner.invoke(app, ["encode", "--config", str(config)]))
    assert message in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]
