"""The training section: the run's configuration, its loss, validation loss and learning rate
over steps (``metrics.jsonl``), and the scores of `vlmdata eval` (``eval/*/eval.json``)."""

from __future__ import annotations

import html
import json
from pathlib import Path

from matplotlib.ticker import MaxNLocator

from vlmdata.errors import UserError
from vlmdata.pipeline.shards import read_state_json
from vlmdata.report import charts
from vlmdata.report.page import Section, chart, link, note, numbers_table, tiles, warn
from vlmdata.report.thumbnails import Picture, file_pictures
from vlmdata.train import RUN_SUMMARY
from vlmdata.train.caption_metrics import METRIC_NAMES, METRICS
from vlmdata.train.checkpoints import read_run_config
from vlmdata.train.evaluate import PAGE, RESULTS
from vlmdata.train.metrics_log import METRICS as METRICS_LOG
from vlmdata.train.metrics_log import draw_loss, finite_number, read_metrics

EXAMPLE_CAPTIONS = 4  # of the latest eval
# `vlmdata caption RUN ... --json RUN/captions.json`: its captions are shown on the run's page.
NEW_CAPTIONS = "captions.json"
MAX_NEW_IMAGES = 24


def section(path: Path, page_dir: Path) -> Section:
    config = read_run_config(path)
    summary = read_state_json(path / RUN_SUMMARY, missing_ok=True) or {}
    records = read_metrics(path / METRICS_LOG)
    steps_done = max((r.get("step", 0) for r in records), default=0)
    total = summary.get("total_steps") or config["options"].get("max_steps")
    steps = f"step {steps_done:,}" + (f" of {total:,}" if isinstance(total, int) else "")
    finished = bool(summary) and not summary.get("interrupted")
    evals, eval_html = _evals(path, page_dir)
    parts = [] if finished else [warn(
        f"This run is unfinished ({steps}): it is reported as far as it goes; rerun the same "
        "<code>vlmdata train</code> command with --resume to go on."
    )]  # fmt: skip
    parts += [_facts(config, steps), "<h3>Loss</h3>", _curves(records)]
    parts += ["<h3>Evaluation</h3>", eval_html, _new_images(path, page_dir)]
    last = next((r for r in reversed(records) if finite_number(r.get("loss"))), None)
    val = next((r for r in reversed(records) if finite_number(r.get("val_loss"))), None)
    more = [steps]
    if val is not None:
        more.append(f"validation loss {val['val_loss']:.3f}")
    if evals:
        more.append(f"BLEU-4 {evals[-1]['metrics']['bleu_4']:.1f} · CIDEr-D "
                    f"{evals[-1]['metrics']['cider_d']:.1f}")  # fmt: skip
    headline = (f"{last['loss']:.3f}", "train loss, last step") if last else ("–", "no step yet")
    return Section(
        kind="train", path=path, headline=headline, more=tuple(more), body="".join(parts),
        line=f"{config['llm']} + {config['projector'].get('kind')}: {more[0]}"
             + (f", {more[1]}" if len(more) > 1 else ""),
        partial=not finished,
    )  # fmt: skip


def _facts(config: dict, steps: str) -> str:
    e = html.escape
    options, projector = config["options"], config["projector"]
    attrs = config["features"].get("attrs", {})
    trained = {"none": "frozen", "full": "fully trained", "lora": "LoRA"}.get(
        config["train_llm"], config["train_llm"])  # fmt: skip
    facts = [
        ("LLM", f"{config['llm']} ({trained})"),
        ("projector", f"{projector.get('kind')}: {projector.get('in_dim')} → "
                      f"{projector.get('out_dim')}, {projector.get('tokens')} image tokens"),
        ("features", f"{attrs.get('model')}, {attrs.get('tokens')} tokens per image, from "
                     + ", ".join(map(str, config["features"].get("dirs", [])))),
        ("steps", f"{steps.removeprefix('step ')}, batch {options.get('batch_size')} × "
                  f"{options.get('grad_accum')} accumulated, lr {options.get('lr')}"),
        ("held out", f"{options.get('val_fraction')} of the keys"),
        ("precision", config.get("precision")),
    ]  # fmt: skip
    rows = "".join(f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in facts)
    return f'<table class="facts">{rows}</table>'


def _curves(records: list[dict]) -> str:
    if not records:
        return note("No step is logged yet (metrics.jsonl is empty).")
    made = charts.figure(10, 4.4)
    loss_axes, lr_axes = draw_loss(made, records)
    lr_axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
    for axes in (loss_axes, lr_axes):
        charts.style(axes, "y")
        axes.yaxis.label.set_color(charts.MUTED)
        axes.xaxis.label.set_color(charts.MUTED)
    charts.title(made, "Loss over training (from metrics.jsonl), learning rate beneath")
    return chart(made, "loss curves") + note(
        "Training loss per step and smoothed, validation loss at each evaluation, both per "
        "answer token."
    )


def _evals(run: Path, page_dir: Path) -> tuple[list[dict], str]:
    """The eval records of the run, by step, and their table (linked to eval's own pages)."""
    records, problems, rows = [], [], []
    for path in sorted((run / "eval").glob(f"*/{RESULTS}")):
        try:
            record = read_state_json(path)
            metrics = record["metrics"]
            scores = [float(metrics[name]) for name in ("val_loss", "perplexity", *METRICS)]
        except (UserError, KeyError, TypeError, ValueError) as e:
            problems.append(str(e) if isinstance(e, UserError) else f"{path} is not as eval "
                            "writes it")  # fmt: skip
            continue
        page = path.with_name(PAGE)
        name = html.escape(str(record.get("checkpoint", path.parent.name)))
        shown = link(page, page_dir, "captions") if page.is_file() else "–"
        rows.append([name, *scores, record.get("samples"), shown])
        records.append(record)
    parts = [warn(html.escape(p)) for p in problems]
    if not rows:
        parts.append(note("Not evaluated yet: <code>vlmdata eval RUN_DIR FEATURES_DIR "
                          "--images IMAGES_DIR</code> scores a checkpoint on the held-out "
                          "images."))  # fmt: skip
        return records, "".join(parts)
    headers = ["checkpoint", "#validation loss", "#perplexity",
               *(f"#{METRIC_NAMES[m]}" for m in METRICS), "#captioned", "page"]  # fmt: skip
    parts.append(numbers_table(headers, rows))
    parts.append(note("BLEU 0-100, CIDEr-D ×100, against one reference caption per image; "
                      "greedy captions of held-out images."))  # fmt: skip
    parts.append(_examples(records[-1]))
    return records, "".join(parts)


def _new_images(run: Path, page_dir: Path) -> str:
    """The captions ``vlmdata caption RUN ... --json RUN/captions.json`` wrote, with
    thumbnails of the images that are local files."""
    path = run / NEW_CAPTIONS
    if not path.is_file():
        return ""
    try:
        images = json.loads(path.read_text(encoding="utf-8"))["images"]
        shown = [i for i in images if isinstance(i, dict)][:MAX_NEW_IMAGES]
    except (OSError, ValueError, KeyError, TypeError):
        return note(f"{html.escape(str(path))} is damaged: its captions are not shown.")
    sources = [str(i.get("image", "")) for i in shown]
    # Keys as an image folder's (the file's position, 9 digits): what file_pictures reads by.
    files = {("new", f"{n:09d}"): str(Path(source).resolve()) for n, source in enumerate(sources)
             if not source.startswith(("http://", "https://"))}  # fmt: skip
    pictures = file_pictures(files, quiet=True) if files else {}
    items = []
    for n, (image, source) in enumerate(zip(shown, sources, strict=True)):
        picture = pictures.get(("new", f"{n:09d}"), Picture(None, "a URL: not kept"))
        captions = image.get("captions") or [""]
        said = f"error: {image['error']}" if image.get("error") else str(captions[0])
        items.append((picture.uri, picture.problem or source, said, source))
    return ("<h3>Captions of new images</h3>" + tiles(items)
            + note(f"Written by <code>vlmdata caption --json</code> to "
                   f"{link(path, page_dir, NEW_CAPTIONS)}."))  # fmt: skip


def _examples(record: dict) -> str:
    captions = record.get("captions")
    if not isinstance(captions, list) or not captions:
        return ""
    e = html.escape
    shown = [c for c in captions[:EXAMPLE_CAPTIONS] if isinstance(c, dict)]
    rows = [[f"<code>{e(str(c.get('key')))}</code>", e(str(c.get("reference"))),
             e(str(c.get("generated")))] for c in shown]  # fmt: skip
    table = numbers_table(["key", "reference", "generated"], rows)
    return (f"<details><summary>A few captions of {e(str(record.get('checkpoint')))}</summary>"
            f"{table}</details>")  # fmt: skip
