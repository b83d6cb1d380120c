"""``vlmdata demo``: the whole job, offline, on built-in data, in a few minutes.

A generated corpus (shapes, textures and scenes with captions that describe them, a few
"image not available" stand-ins, dead links, slow and broken answers) is served on 127.0.0.1
and goes through the pipeline in ``pipeline.toml`` (the same file as ``examples/demo.toml``):
download with ``--resize 448``, encode with tiny-random-clip, labels, a projector and
tiny-random-llama trained on the captions, eval; then a few images the run never saw are
captioned, and one ``report.html`` links it all. A rerun resumes like ``vlmdata run``.
"""

from __future__ import annotations

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
    from vlmdata.demo.corpus import build_corpus, write_url_list
    from vlmdata.demo.server import DemoServer
    from vlmdata.pipeline.shards import atomic_write_json
    from vlmdata.workflow import RunConfig, RunSummary, command_step, plan_pipeline, run_steps

    out = Path(config.out)
    corpus = out / "corpus"
    record = _check_demo_dir(out, config.images)
    entries = build_corpus(config.images + UNSEEN)
    unseen = [entry for entry in entries if entry.kind == "image"][-UNSEEN:]
    listed = [entry for entry in entries if entry.name not in {e.name for e in unseen}]
    with DemoServer(entries, port=record.get("port", 0)) as server:
        urls = corpus / "urls.parquet"
        if not record:  # a rerun keeps its URL list: download resumes from it
            corpus.mkdir(parents=True, exist_ok=True)
            write_url_list(listed, server.base_url, urls)
            atomic_write_json(corpus / RECORD, {"images": config.images, "port": server.port,
                                                "vlmdata_version": __version__})  # fmt: skip
        overrides = {"train": {"max_steps": config.steps}} if config.steps else {}
        steps, _ = plan_pipeline(
            RunConfig(str(PIPELINE), input=str(urls), output=str(out), quiet=config.quiet,
                      overrides=overrides),
            app,
        )  # fmt: skip
        caption = command_step(
            app, "caption", [str(out / "train"), *(f"{server.base_url}/{e.name}" for e in unseen)],
            {"allow_private_network": True, "json_out": str(out / "captions.json"),
             "max_new_tokens": 80},
        )  # fmt: skip
        steps.insert(len(steps) - 1, caption)  # before the report, which shows its captions
        typer.echo(f"demo: {len(listed)} URLs served on {server.base_url} -> {urls}")
        return run_steps(steps, RunSummary(out, again=f"vlmdata demo {out}"))


def _check_demo_dir(out: Path, images: int) -> dict:
    """The record of an earlier demo in ``out`` ({} for a new or empty directory); anything
    else there, or a demo of another size, is refused."""
    from vlmdata.pipeline.shards import read_state_json

    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return {}
    record = read_state_json(out / "corpus" / RECORD, missing_ok=True) if out.is_dir() else None
    if not record:
        raise UserError(f"{out} is not empty and holds no vlmdata demo; pass a new directory")
    if record.get("images") != images:
        size = record.get("images")
        raise UserError(f"{out} holds a demo of --images {size}; pass --images {size} to "
                        "resume it, or a new directory")  # fmt: skip
    return record
