"""The CLI's own behaviour around the stages: `run` needs its pipeline file, `run` and `demo`
take --config as every command does, the demo's defaults are DemoConfig's, the usage-error
wording other modules reuse, and an internal error's log when the usual log folder is taken."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from vlmdata.cli import app
from vlmdata.demo import DemoConfig

runner = CliRunner(env={"COLUMNS": "200"})
CLI = typer.main.get_command(app)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _one_error_line(result: object) -> str:
    assert result.exit_code == 2, result.output
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "extra", [[], ["--input", "urls.parquet", "--output", "OUT"], ["--dry-run"]]
)
def test_run_without_a_pipeline_file_is_one_line(tmp_path, extra):
    args = ["run", *(str(tmp_path / word) if word == "OUT" else word for word in extra)]
    line = _one_error_line(runner.invoke(app, args, prog_name="vlmdata"))
    assert line == "error: pass a PIPELINE.toml (vlmdata run --print-config writes one)"
    assert not (tmp_path / "OUT").exists()


def test_run_takes_its_options_from_a_config_file(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'pipeline = "{EXAMPLES / "capsfusion.toml"}"\ndry-run = true\n')
    result = runner.invoke(app, ["run", "--config", str(config)], prog_name="vlmdata")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("vlmdata download ") and lines[-1].startswith("vlmdata report")


def test_demo_takes_its_options_from_a_config_file(tmp_path):
    config = tmp_path / "demo.toml"
    config.write_text(f'out-dir = "{tmp_path / "d"}"\nimages = 12\nsteps = 2\n')
    demo = CLI.commands["demo"]
    with demo.make_context("vlmdata demo", ["--config", str(config), "--steps", "5"]) as ctx:
        assert ctx.params["out_dir"] == str(tmp_path / "d")
        assert (ctx.params["images"], ctx.params["steps"]) == (12, 5)  # the flag over the file
    config.write_text("image = 12\n")
    line = _one_error_line(runner.invoke(app, ["demo", "--config", str(config)]))
    assert "demo has no option 'image'; did you mean 'images'?" in line


def test_the_demo_defaults_are_the_demo_config():
    defaults = {param.name: param.default for param in CLI.commands["demo"].params}
    expected = DemoConfig()
    assert (defaults["out_dir"], defaults["images"], defaults["steps"]) == (
        expected.out, expected.images, expected.steps,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("message", "line"),
    [("Missing option '--llm'.", "missing option '--llm'"),
     ("No such command 'encod'.", "no such command 'encod'"),
     ("HDF5 file is bad.", "HDF5 file is bad")],
)  # fmt: skip
def test_usage_error_line_words_click_messages_as_vlmdata_errors(message, line):
    from vlmdata.cli.failures import UsageError, usage_error_line

    assert usage_error_line(UsageError(message)) == line


def test_usage_error_line_is_the_message_the_cli_prints():
    from vlmdata.cli.failures import UsageError, usage_error_line

    with pytest.raises(UsageError) as raised:
        CLI.commands["train"].make_context("vlmdata train", ["x", "--out", "o"])
    line = usage_error_line(raised.value)
    printed = _one_error_line(runner.invoke(app, ["train", "x", "--out", "o"], prog_name="vlmdata"))
    assert line == "missing option '--llm'"
    assert printed == f"error: {line}; see `vlmdata train --help`"


def test_the_failures_module_is_light():
    # vlmdata.workflow imports it: it must not pull the workflow back in, nor a stage dependency.
    code = "import sys, vlmdata.cli.failures; print(*sorted(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert "vlmdata.workflow" not in loaded
    heavy = {"torch", "polars", "numpy", "pyarrow", "PIL", "aiohttp", "h5py"}
    assert not {name.split(".")[0] for name in loaded} & heavy


def test_an_internal_error_is_logged_in_the_temp_dir_when_the_log_folder_is_taken(
    tmp_path, monkeypatch
):
    # Another user's /tmp/vlmdata-logs, which this user cannot write to; as root a chmod would
    # not stop the write, so a file of that name stands in for it.
    (tmp_path / "vlmdata-logs").write_text("not a folder")
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))

    def broken(path: str) -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr("vlmdata.describe.describe", broken)
    result = runner.invoke(app, ["inspect", "anything"], prog_name="vlmdata")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "internal error (RuntimeError: boom)" in lines[0], result.stderr
    log = Path(re.search(r"the traceback is in (\S+);", lines[0]).group(1))
    assert log.parent == tmp_path and log.name.startswith("vlmdata-") and log.suffix == ".log"
    assert "RuntimeError: boom" in log.read_text()


def test_a_closed_output_is_one_line_not_an_internal_error():
    """`vlmdata ... | head` ended in "internal error (BrokenPipeError ...)"."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "vlmdata", "labels", "taxonomy"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        process.stdout.close()  # the reader is gone before a byte is written
        stderr = process.stderr.read().decode()
        assert process.wait(timeout=120) == 141
    assert stderr.splitlines() == [
        "stopped: the output was closed; rerun the same command to resume"
    ], stderr
