"""A training run's directory: its config, its checkpoints, and loading a trained model back.

::

    RUN_DIR/config.json                 the LLM, projector, prompts, feature attributes, options
    RUN_DIR/checkpoints/step-00000500/  projector.safetensors (projector + image begin/end),
                                        llm/ (--train-llm full) or lora/ (--train-llm lora),
                                        trainer_state.pt (optimizer, scheduler, step, RNG, data)
    RUN_DIR/checkpoints/latest.json     the newest whole checkpoint (written after it)
    RUN_DIR/metrics.jsonl, loss.png, summary.json

A checkpoint is written under a temporary name and renamed whole; ``latest.json`` then points
at it. A killed save leaves the previous checkpoint the latest.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from vlmdata.errors import UserError, one_line
from vlmdata.pipeline.shards import atomic_write_json, fsync_dir, fsync_file, read_state_json
from vlmdata.train import RUN_CONFIG
from vlmdata.train.llm import LoadedLLM, load_llm, no_progress_bars
from vlmdata.train.lora import merged_lora, save_lora
from vlmdata.train.model import VisionLanguageModel
from vlmdata.train.projectors import ProjectorConfig
from vlmdata.train.sequence import ConversationFormat

ADAPTER = "projector.safetensors"
TRAINER_STATE = "trainer_state.pt"
_LATEST = "latest.json"
T = TypeVar("T")
# What a run config must hold, and of which type, to be loaded again.
_RUN_FIELDS = {"llm": str, "train_llm": str, "prompts": list, "projector": dict, "features": dict,
               "options": dict}  # fmt: skip


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def read_run_config(run_dir: Path) -> dict:
    config = read_state_json(run_dir / RUN_CONFIG, missing_ok=True) if run_dir.is_dir() else None
    if config is None:
        raise UserError(
            f"{run_dir} is not a vlmdata training run (no {RUN_CONFIG}); pass a train --out"
        )
    if "projector" not in config:
        raise UserError(f"{run_dir / RUN_CONFIG} is damaged (no projector); restore it, or "
                        "train again")  # fmt: skip
    wrong = [name for name, kind in _RUN_FIELDS.items() if not isinstance(config.get(name), kind)]
    if wrong or not isinstance(config["features"].get("attrs"), dict):
        raise UserError(
            f"{run_dir / RUN_CONFIG} is damaged ({', '.join(wrong) or 'features'}); restore it, or "
            "train again"
        )
    return config


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest whole checkpoint of ``run_dir``, or None before the first save."""
    latest = read_state_json(checkpoints_dir(run_dir) / _LATEST, missing_ok=True)
    if latest is None:
        return None
    path = checkpoints_dir(run_dir) / str(latest.get("name"))
    if not (path / ADAPTER).is_file():
        raise UserError(f"{path} named by {_LATEST} is missing; restore it or train again")
    return path


def checkpoint_of(run_dir: Path, step: int | None) -> Path:
    """Checkpoint ``step`` of ``run_dir`` (the latest when None), or one line saying why not."""
    if step is None:
        found = latest_checkpoint(run_dir)
        if found is None:
            raise UserError(f"{run_dir} has no checkpoint yet; train (or resume) it first")
        return found
    path = checkpoints_dir(run_dir) / f"step-{step:08d}"
    if not (path / ADAPTER).is_file():
        kept = sorted(p.name for p in checkpoints_dir(run_dir).glob("step-*"))
        raise UserError(f"{run_dir} has no checkpoint at step {step} (kept: {', '.join(kept)})")
    return path


def save_checkpoint(run_dir: Path, step: int, model: VisionLanguageModel, train_llm: str,
                    trainer_state: dict, keep: int) -> Path:  # fmt: skip
    """Write checkpoint ``step`` whole, point ``latest.json`` at it, and keep the ``keep``
    newest."""
    from safetensors.torch import save_file

    folder = checkpoints_dir(run_dir)
    final = folder / f"step-{step:08d}"
    tmp = folder / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.adapter_state().items()},
              tmp / ADAPTER)  # fmt: skip
    with no_progress_bars():  # a bar per save would break the training bar's line
        if train_llm == "full":
            model.llm.save_pretrained(tmp / "llm", safe_serialization=True)
        elif train_llm == "lora":
            save_lora(model.llm, tmp)
    torch.save(trainer_state, tmp / TRAINER_STATE)
    for path in tmp.rglob("*"):
        if path.is_file():
            fsync_file(path)
    if final.exists():  # the same step saved again (a stop right after a save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(folder)
    atomic_write_json(folder / _LATEST, {"name": final.name, "step": step})
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(checkpoint: Path) -> dict:
    """The optimizer, scheduler, RNG and data position saved with ``checkpoint``."""
    path = checkpoint / TRAINER_STATE
    return _read(path, lambda: torch.load(path, map_location="cpu", weights_only=True))


def load_adapter(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The projector and image begin/end embeddings saved with ``checkpoint``."""
    from safetensors.torch import load_file

    path = checkpoint / ADAPTER
    return _read(path, lambda: load_file(path))


def _read(path: Path, load: Callable[[], T]) -> T:
    """``load()`` of a checkpoint file, a damaged or missing one reported in one line."""
    try:
        return load()
    except Exception as e:  # torch, pickle and safetensors each raise their own kinds
        raise UserError(
            f"{path} is damaged or missing ({one_line(e, 100)}); delete its checkpoint and point "
            f"{_LATEST} at an earlier one, or train again"
        ) from None


def base_llm(config: dict, device: str, dtype: torch.dtype) -> LoadedLLM:
    """The LLM a run started from: ``--llm``, or the trained LLM of its ``--init`` run."""
    init = config.get("init")
    if init and init.get("llm"):  # the earlier run trained its LLM: this one starts from it
        run = Path(init["run"])
        if not (run / RUN_CONFIG).exists():
            raise UserError(
                f"{run}, the --init run this one started from (with its trained LLM), is gone; "
                "put it back where it was"
            )
        return trained_llm(run, Path(init["checkpoint"]), device, dtype)
    return load_llm(config["llm"], device, dtype)


def trained_llm(run_dir: Path, checkpoint: Path, device: str, dtype: torch.dtype) -> LoadedLLM:
    """The LLM of ``run_dir`` as checkpoint ``checkpoint`` left it, LoRA merged in."""
    config = read_run_config(run_dir)
    if config["train_llm"] == "full":
        return load_llm(config["llm"], device, dtype, weights_dir=checkpoint / "llm")
    llm = base_llm(config, device, dtype)
    if config["train_llm"] == "lora":
        llm.model = merged_lora(llm.model, checkpoint)
    return llm


@dataclass
class TrainedModel:
    model: VisionLanguageModel
    text: ConversationFormat
    config: dict
    checkpoint: Path


def load_trained(run_dir: Path, step: int | None, device: str, dtype: torch.dtype) -> TrainedModel:
    """A run's model at checkpoint ``step`` (the latest when None), in eval mode, for
    captioning and evaluation."""
    config = read_run_config(run_dir)
    checkpoint = checkpoint_of(run_dir, step)
    llm = trained_llm(run_dir, checkpoint, device, dtype)
    model = VisionLanguageModel(llm.model, ProjectorConfig(**config["projector"]))
    model.load_adapter_state(load_adapter(checkpoint))
    model.to(device).eval()
    text = ConversationFormat(llm.tokenizer, model.image_slots - 2, config["options"]["max_length"])
    return TrainedModel(model=model, text=text, config=config, checkpoint=checkpoint)
