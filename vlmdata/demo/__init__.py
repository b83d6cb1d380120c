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


@dataclass(frozen=True)
class DemoConfig:
    out: str = "vlmdata-demo"
    images: int = 300  # pictures in the corpus (failures and placeholders come on top)
    steps: int | None = None  # train --max-steps; default: the pipeline file's
    quiet: bool = False


def run_demo(config: DemoConfig, app: typer.core.TyperGroup) -> RunSummary:
    """Generate and serve the corpus, run the demo pipeline and caption unseen images."""
    from vlmdata.demo.corpus import MIN_IMAGES, build_corpus, write_url_list
    from vlmdata.demo.server import DemoServer
    from vlmdata.pipeline.shards import atomic_write_bytes, atomic_write_json
    from vlmdata.workflow import RunConfig, RunSummary, command_step, plan_pipeline, run_steps

    if config.images < MIN_IMAGES:
        raise UserError(f"--images {config.images} is too few for the demo; pass --images "
                        f"{MIN_IMAGES} or more")  # fmt: skip
    out = Path(config.out)
    corpus = out / "corpus"
    record = _check_demo_dir(out, config.images)
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
            atomic_write_json(corpus / RECORD, {"images": config.images, "port": server.port,
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
            return run_steps(steps, RunSummary(out, again=f"vlmdata demo {shlex.quote(str(out))}"
                                               f" --images {config.images}"))  # fmt: skip


def _check_demo_dir(out: Path, images: int) -> dict:
    """The record of an earlier demo in ``out`` ({} for a new or empty directory, or one
    holding only the corpus of a demo killed before its record); anything else there, or a
    demo of another size, is refused."""
    from vlmdata.pipeline.shards import read_state_json

    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return {}
    if not out.is_dir():
        raise UserError(f"{out} is a file; pass a directory for the demo")
    record = read_state_json(out / "corpus" / RECORD, missing_ok=True)
    if not record:
        if [p.name for p in out.iterdir()] == ["corpus"]:  # killed while writing its corpus
            return {}
        raise UserError(f"{out} is not empty and holds no vlmdata demo; pass a new directory")
    if record.get("images") != images:
        size = record.get("images")
        raise UserError(f"{out} holds a demo of --images {size}; pass --images {size} to "
                        "resume it, or a new directory")  # fmt: skip
    return record
