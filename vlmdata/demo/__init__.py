"""``vlmdata demo``: the whole job, offline, on built-in data, in a few minutes.

A generated corpus (shapes, textures and scenes with captions that describe them, a few
"image not available" stand-ins, dead links, slow and broken answers) is served on 127.0.0.1
and goes through the pipeline in ``pipeline.toml`` (the same file as ``examples/demo.toml``):
download with ``--resize 448``, encode with tiny-random-clip, labels, a projector and
tiny-random-llama trained on the captions, eval; then a few images the run never saw are
captioned, and one ``report.html`` links it all. A rerun resumes like ``vlmdata run``.
"""

from __future__ import annotations

import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from vlmdata import __version__
from vlmdata.errors import UserError

if TYPE_CHECKING:
    from vlmdata.workflow import RunSummary

PIPELINE = Path(__file__).with_name("pipeline.toml")
RECORD = "demo.json"  # OUT/corpus/demo.json: the corpus size and the server's port
UNSEEN = 4  # images served but left out of the URL list: captioned at the end


# Bounds that keep the demo a demo: enough images to fill its training batches, few enough to
# draw in seconds (the corpus is built in memory, ~8 KB and ~1.4 ms a picture).
IMAGES_RANGE = (40, 10_000)
STEPS_RANGE = (1, 100_000)


@dataclass(frozen=True)
class DemoConfig:
    out: str = "vlmdata-demo"
    images: int = 300  # pictures in the corpus (failures and placeholders come on top)
    steps: int | None = None  # train --max-steps; default: the pipeline file's
    quiet: bool = False

    def __post_init__(self) -> None:
        for flag, value, (low, high) in (("--images", self.images, IMAGES_RANGE),
                                         ("--steps", self.steps, STEPS_RANGE)):  # fmt: skip
            if value is not None and not low <= value <= high:
                raise UserError(f"{flag} {value} is out of the demo's range; pass {low} to "
                                f"{high:,}")  # fmt: skip

    def again(self) -> str:
        """The command line that continues this demo."""
        return demo_command(self.out, self.images, self.steps)


def demo_command(out: str, images: int, steps: int | None) -> str:
    """``vlmdata demo OUT --images N [--steps N]``, quoted for a shell."""
    words = ["vlmdata", "demo", out, "--images", str(images)]
    return shlex.join(words + (["--steps", str(steps)] if steps is not None else []))


def run_demo(config: DemoConfig, app: typer.core.TyperGroup) -> RunSummary:
    """Generate and serve the corpus, run the demo pipeline and caption unseen images."""
    from vlmdata.pipeline.shards import exclusive_output

    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; pass a directory for the demo")
    if out.is_dir() and any(p.name != ".lock" for p in out.iterdir()):
        _check_demo_dir(out, config)  # before the lock: leave a foreign directory untouched
    with exclusive_output(out):  # a second demo here waits for none: it stops in one line
        return _run_demo(config, app, out, _check_demo_dir(out, config))


def _run_demo(config: DemoConfig, app: typer.core.TyperGroup, out: Path, record: dict):
    from vlmdata.demo.corpus import build_corpus, write_url_list
    from vlmdata.demo.server import DemoServer
    from vlmdata.pipeline.shards import atomic_write_bytes, atomic_write_json
    from vlmdata.workflow import RunConfig, RunSummary, command_step, plan_pipeline, run_steps

    corpus = out / "corpus"
    entries = build_corpus(config.images + UNSEEN)
    unseen = [entry for entry in entries if entry.kind == "image"][-UNSEEN:]
    listed = [entry for entry in entries if entry.name not in {e.name for e in unseen}]
    urls, new = corpus / "urls.parquet", corpus / "new"
    with DemoServer(listed, port=record.get("port", 0)) as server:
        if not record:  # a rerun keeps its URL list: download resumes from it
            new.mkdir(parents=True, exist_ok=True)
            for entry in unseen:
                atomic_write_bytes(new / entry.name, entry.body)
            write_url_list(listed, server.base_url, urls)
            atomic_write_json(corpus / RECORD, {"images": config.images, "steps": config.steps,
                                                "port": server.port,
                                                "vlmdata_version": __version__})  # fmt: skip
        overrides = {"train": {"max_steps": config.steps}} if config.steps is not None else {}
        run = RunConfig(str(PIPELINE), input=str(urls), output=str(out), quiet=config.quiet,
                        overrides=overrides)  # fmt: skip
        steps = plan_pipeline(run, app).steps
        # Images the run never saw, captioned onto the run's page of the report (the last step).
        images = [str((new / entry.name).resolve()) for entry in unseen]
        json_out = str(out / "train" / "captions.json")
        options = {"json_out": json_out, "max_new_tokens": 80}
        steps.insert(len(steps) - 1, command_step(app, "caption", [str(out / "train"), *images],
                                                  options))  # fmt: skip
        typer.echo(f"demo: {len(listed)} URLs served on {server.base_url} -> {urls}")
        typer.echo(
            "demo: the models are tiny-random-clip and tiny-random-llama, random weights "
            "trained here from scratch: expect captions of colours and shapes"
        )
        with warnings.catch_warnings():  # said once above, not by every stage
            warnings.filterwarnings("ignore", message=".*has random weights.*")
            return run_steps(steps, RunSummary(out, again=config.again()))


def _check_demo_dir(out: Path, config: DemoConfig) -> dict:
    """The record of an earlier demo in ``out`` ({} for a new or empty directory, or one
    holding only the corpus of a demo killed before its record); anything else there, or a
    demo of another size, is refused."""
    from vlmdata.pipeline.shards import read_state_json

    entries = sorted(p.name for p in out.iterdir() if p.name != ".lock") if out.is_dir() else []
    if not entries:
        return {}
    record = read_state_json(out / "corpus" / RECORD, missing_ok=True)
    if not record:
        if entries == ["corpus"]:  # killed while writing its corpus
            return {}
        raise UserError(f"{out} is not empty and holds no vlmdata demo; pass a new directory")
    made = DemoConfig(str(out), record.get("images"), record.get("steps"))
    if (made.images, made.steps) != (config.images, config.steps):
        raise UserError(f"{out} holds a demo made with other options; continue it with "
                        f"{made.again()}, or pass a new directory")  # fmt: skip
    return record
