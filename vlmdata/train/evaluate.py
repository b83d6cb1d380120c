"""`vlmdata eval`: how well a run captions its held-out images.

The held-out examples are the run's own validation split (a function of the key and the run's
``--val-fraction``), read from the cached features: no image is decoded, no ViT runs.

- Validation loss and perplexity: over the examples and prompts the trainer validated on (the
  first ``--val-samples`` of the split, each with its sampled prompt), so the loss is the
  ``val_loss`` the run logged at that checkpoint.
- Captions: greedy, for ``--samples`` examples spread evenly over the split, scored against
  their reference captions with BLEU-1..4 and CIDEr-D (:mod:`caption_metrics`).

Written to ``OUT/eval.json`` (metrics and every caption); with ``--images`` also
``OUT/index.html``, thumbnails beside the reference and generated captions.
"""

from __future__ import annotations

import datetime as dt
import html
import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from vlmdata.errors import UserError, require_at_least
from vlmdata.pipeline.runner import path_argument
from vlmdata.pipeline.shards import PLAN, atomic_write_bytes, atomic_write_json, read_state_json
from vlmdata.train.caption import Captioner, check_prompt
from vlmdata.train.caption_metrics import METRIC_NAMES, METRICS, caption_scores
from vlmdata.train.checkpoints import checkpoint_of, read_run_config
from vlmdata.train.data import (
    MATCHING_ATTRS,
    FeatureDataset,
    FeatureFiles,
    build_examples,
    collate,
    evaluation_batches,
    open_feature_files,
)
from vlmdata.train.sequence import Encoded

if TYPE_CHECKING:
    from vlmdata.labels.thumbnails import ImageShards

RESULTS = "eval.json"
PAGE = "index.html"


@dataclass
class EvalConfig:
    """Everything `vlmdata eval` takes; the CLI flags map one to one."""

    run_dir: str
    features_dir: str
    samples: int = 100
    prompt: str | None = None
    images: str | None = None
    out: str | None = None  # default: RUN_DIR/eval/<checkpoint>
    checkpoint: int | None = None
    device: str = "auto"
    precision: str = "auto"
    max_new_tokens: int = 64
    batch_size: int = 16
    allow_incomplete: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        path_argument(self.run_dir, "RUN_DIR")
        path_argument(self.features_dir, "FEATURES_DIR")
        if self.images is not None:
            path_argument(self.images, "--images")
        if self.out is not None:
            path_argument(self.out, "--out", written=True)
        require_at_least(1, samples=self.samples, max_new_tokens=self.max_new_tokens,
                         batch_size=self.batch_size)  # fmt: skip
        check_prompt(self.prompt)


@dataclass
class EvalSummary:
    out: Path
    checkpoint: str
    metrics: dict
    captioned: int
    held_out: int
    page: Path | None

    def format(self) -> str:
        m = self.metrics
        rows = [
            ("validation loss", f"{m['val_loss']:.4f}",
             f"({m['loss_examples']} examples, {m['loss_tokens']} answer tokens)"),
            ("perplexity", f"{m['perplexity']:.2f}", ""),
            *((METRIC_NAMES[name], f"{m[name]:.2f}", "") for name in METRICS),
        ]  # fmt: skip
        lines = [f"eval of {self.checkpoint}: {self.captioned} of {self.held_out} held-out "
                 "images captioned (greedy)"]  # fmt: skip
        lines += [f"  {name:<16} {value:>9}   {note}".rstrip() for name, value, note in rows]
        written = [self.out / RESULTS] + ([self.page] if self.page else [])
        lines.append("wrote " + ", ".join(str(p) for p in written))
        return "\n".join(lines)


def run_eval(config: EvalConfig) -> EvalSummary:
    """Score the run ``config.run_dir`` on the held-out examples of ``config.features_dir``."""
    started = time.perf_counter()
    run_dir = Path(config.run_dir)
    run = read_run_config(run_dir)
    checkpoint = checkpoint_of(run_dir, config.checkpoint)  # before anything loads
    files = open_feature_files([config.features_dir], config.allow_incomplete)
    _check_same_features(run, files, config.features_dir)
    options = run["options"]
    val = build_examples(files, options["val_fraction"], None, captions=True).val
    if len(val) == 0:
        raise UserError(
            f"{config.features_dir} has no example in the run's validation split "
            f"(--val-fraction {options['val_fraction']}); evaluate a run trained with a "
            "--val-fraction above 0"
        )
    images = _open_images(Path(config.images), Path(config.features_dir)) if config.images else None
    out = Path(config.out) if config.out else run_dir / "eval" / checkpoint.name
    try:  # made now: a folder that cannot be is found before the evaluation runs
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make --out {out} ({e.strerror or e}); pass a folder you can "
                        "write")  from None  # fmt: skip
    captioner = Captioner(run_dir, config.checkpoint, config.device, config.precision)
    prompt = captioner.default_prompt if config.prompt is None else config.prompt
    encoded_prompt = captioner.prompt(prompt, config.max_new_tokens)

    loss_table = val[: options["val_samples"]]
    loss, tokens = _validation_loss(captioner, files, loss_table, config.batch_size)
    picks = np.unique(np.linspace(0, len(val) - 1, min(config.samples, len(val))).round())
    sample = val[picks.astype(np.int64)]
    captions = _generate(captioner, files, sample, prompt, encoded_prompt, config)
    metrics = {
        "val_loss": loss, "perplexity": math.exp(loss),
        "loss_examples": len(loss_table), "loss_tokens": tokens,
        **caption_scores([c["reference"] for c in captions], [c["generated"] for c in captions]),
    }  # fmt: skip
    record = {
        "run": str(run_dir.resolve()), "checkpoint": checkpoint.name,
        "features": str(Path(config.features_dir).resolve()), "prompt": prompt,
        "samples": len(captions), "held_out": len(val), "max_new_tokens": config.max_new_tokens,
        "metrics": metrics, "captions": captions,
    }  # fmt: skip
    atomic_write_json(out / RESULTS, record)
    page = None
    if images is not None:
        thumbs = _thumbnails(images, captions, out, config.quiet)
        page = out / PAGE
        atomic_write_bytes(page, _page(record, thumbs, time.perf_counter() - started).encode())
    return EvalSummary(out, f"{run_dir} at {checkpoint.name}", metrics, len(captions), len(val),
                       page)  # fmt: skip


def _generate(captioner: Captioner, files: FeatureFiles, sample: np.ndarray, prompt: str,
              encoded: Encoded, config: EvalConfig) -> list[dict]:  # fmt: skip
    """A greedy caption of each example of ``sample``, with its key, shard and reference."""
    rows = FeatureDataset(files, sample, captioner.text, [prompt], None, 0)
    captions = []
    batches = evaluation_batches(len(sample), config.batch_size)
    for indices in tqdm(batches, desc="captions", unit="batch", disable=config.quiet, leave=False):
        examples = rows.__getitems__(indices)
        generated = captioner.captions([e["tokens"] for e in examples], encoded,
                                       config.batch_size, config.max_new_tokens)  # fmt: skip
        captions += [{"key": e["key"], "shard": files.shard_dirs[int(sample[i, 0])][1],
                      "reference": e["caption"], "generated": g[0]}
                     for i, e, g in zip(indices, examples, generated, strict=True)]  # fmt: skip
    return captions


def _check_same_features(run: dict, files: FeatureFiles, features_dir: str) -> None:
    """Refuse features of another model, layer or grid than the run was trained on."""
    trained = run["features"]["attrs"]
    for name in MATCHING_ATTRS:
        if trained.get(name) != files.attrs.get(name):
            raise UserError(
                f"{features_dir} has {name}={files.attrs.get(name)!r} but the run was trained on "
                f"{name}={trained.get(name)!r}; evaluate on features made like its own"
            )


@torch.no_grad()
def _validation_loss(captioner: Captioner, files: FeatureFiles, table: np.ndarray,
                     batch_size: int) -> tuple[float, int]:  # fmt: skip
    """(mean loss per answer token, answer tokens) over ``table``, as the trainer computed it:
    the run's prompts sampled per example with its seed, its padding side."""
    run = captioner.config
    dataset = FeatureDataset(files, table, captioner.text, run["prompts"], None,
                             run["options"]["seed"])  # fmt: skip
    side = run["options"]["padding_side"]
    pad = partial(collate, pad_id=captioner.text.pad_id, padding_side=side)
    total, tokens = 0.0, 0
    for indices in evaluation_batches(len(table), batch_size):
        with captioner.autocast():
            loss, count = captioner.model(pad(dataset.__getitems__(indices)).to(captioner.device))
        total, tokens = total + loss.item(), tokens + count
    return total / max(tokens, 1), tokens


@dataclass(frozen=True)
class _Images:
    """Where the thumbnails come from: image shards by name, or one plain folder's listing."""

    shards: ImageShards
    folder_shard: str | None  # the one shard of a plain folder (else the features' shard names)


def _open_images(path: Path, features_dir: Path) -> _Images:
    """``--images``: the download/preprocess shards the features were made from, or the plain
    image folder they were encoded from (its keys are positions in its sorted listing)."""
    from vlmdata.labels.thumbnails import ImageShards, open_image_shards
    from vlmdata.pipeline.image_sources import find_image_shards

    if not path.is_dir() or any(path.glob("*.tar")):
        return _Images(open_image_shards(path), None)
    (shard,) = find_image_shards(path, sys.maxsize)  # one shard: keys count the whole listing
    encoded = (read_state_json(features_dir / PLAN, missing_ok=True) or {}).get("input", {})
    if "images" not in encoded:
        raise UserError(f"--images {path} is a folder of images but {features_dir} was encoded "
                        "from image shards; pass those shards")  # fmt: skip
    if encoded["images"] != len(shard.files):
        raise UserError(
            f"--images {path} holds {len(shard.files)} images but {features_dir} was encoded "
            f"from a folder of {encoded['images']}; pass the folder the features were made from"
        )
    return _Images(ImageShards(path, {shard.name: shard}), shard.name)


def _thumbnails(images: _Images, captions: list[dict], out: Path, quiet: bool) -> list:
    from vlmdata.labels.thumbnails import write_thumbnails

    wanted = [(images.folder_shard or c["shard"], c["key"]) for c in captions]
    made = write_thumbnails(images.shards, wanted, out, quiet)
    return [made[w] for w in wanted]


_CSS = """
:root { --ink:#1f2328; --muted:#656d76; --line:#d8dee4; --panel:#f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff;
  font: 15px/1.5 -apple-system, "Segoe UI", "Helvetica Neue", Arial, "DejaVu Sans", sans-serif; }
.wrap { max-width: 1160px; margin: 0 auto; padding: 0 32px; }
header { background: var(--panel); border-bottom: 1px solid var(--line); }
header .wrap { padding-top: 26px; padding-bottom: 20px; }
h1 { font-size: 24px; margin: 0 0 2px; font-weight: 650; }
.sub, .note { color: var(--muted); margin: 0 0 16px; overflow-wrap: anywhere; }
.note { font-size: 13px; margin: 10px 0 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(100px, 1fr)); gap: 10px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
.card .n { font-size: 22px; font-weight: 650; font-variant-numeric: tabular-nums; }
.card .l { color: var(--muted); font-size: 13px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(350px, 1fr)); gap: 14px;
  margin: 26px 0; }
.pair { display: flex; gap: 14px; border: 1px solid var(--line); border-radius: 8px;
  padding: 12px; }
.pair .image { flex: none; width: 112px; }
.pair img, .pair .missing { display: block; width: 112px; height: 112px; border-radius: 6px;
  border: 1px solid var(--line); object-fit: cover; }
.pair .missing { display: flex; align-items: center; justify-content: center; padding: 8px;
  text-align: center; color: var(--muted); font-size: 12px; background: var(--panel); }
.key { color: var(--muted); font-size: 12px; margin-top: 4px;
  font-family: ui-monospace, monospace; overflow-wrap: anywhere; }
.text { min-width: 0; overflow-wrap: anywhere; }
.text .l { color: var(--muted); font-size: 12px; text-transform: uppercase;
  letter-spacing: 0.04em; }
.text p { margin: 0 0 10px; }
.text .generated { font-weight: 500; color: #0a3069; }
.empty { color: var(--muted); font-style: italic; font-weight: 400; }
footer { color: var(--muted); font-size: 13px; margin: 8px 0 32px; overflow-wrap: anywhere; }
"""


def _page(record: dict, thumbs: list, elapsed: float) -> str:
    """The side-by-side page: the metrics on top, then each image with its two captions."""
    e = html.escape
    m = record["metrics"]
    cards = [(f"{m['val_loss']:.3f}", "validation loss"), (f"{m['perplexity']:.2f}", "perplexity"),
             *((f"{m[name]:.1f}", METRIC_NAMES[name]) for name in METRICS)]  # fmt: skip
    pairs = []
    for caption, thumb in zip(record["captions"], thumbs, strict=True):
        image = (f'<img src="{e(thumb.file)}" alt="" loading="lazy">' if thumb.file
                 else f'<div class="missing">{e(thumb.problem or "no image")}</div>')  # fmt: skip
        generated = e(caption["generated"]) or '<span class="empty">(empty)</span>'
        pairs.append(
            f'<div class="pair"><div class="image">{image}<div class="key">{e(caption["key"])}'
            '</div></div><div class="text"><div class="l">reference</div>'
            f'<p>{e(caption["reference"])}</p><div class="l">generated</div>'
            f'<p class="generated">{generated}</p></div></div>'
        )
    generated_at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = f"Captions of {Path(record['run']).name} at {record['checkpoint']}"
    return "\n".join([
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>",
        '<header><div class="wrap">',
        f"<h1>{e(title)}</h1>",
        f'<p class="sub">{record["samples"]} of {record["held_out"]} held-out images, greedy, '
        f'prompt “{e(record["prompt"])}”</p>',
        '<div class="cards">',
        *(f'<div class="card"><div class="n">{n}</div><div class="l">{e(label)}</div></div>'
          for n, label in cards),
        "</div>",
        f'<p class="note">Loss over {m["loss_examples"]} held-out examples '
        f'({m["loss_tokens"]:,} answer tokens). BLEU 0-100 (sacrebleu), CIDEr-D x100, both '
        "against one reference caption per image.</p>",
        "</div></header>",
        '<main class="wrap"><div class="grid">',
        *pairs,
        "</div>",
        f"<footer>Run <code>{e(record['run'])}</code>, features <code>{e(record['features'])}"
        f"</code>. Made by vlmdata eval on {generated_at} in {elapsed:.1f} s.</footer></main>",
        "</body>\n</html>\n",
    ])  # fmt: skip
