"""`vlmdata train`: a projector (and optionally the LLM) trained from cached features.

Top to bottom: open the features and the LLM, build the examples and the model, then the loop
(AdamW, cosine schedule with warmup, gradient accumulation, clipping, autocast), validation
every ``--eval-every`` steps, checkpoints every ``--save-every`` and at the end. Ctrl-C (or
SIGTERM) finishes the optimizer step in progress, saves, and stops; ``--resume`` continues
from the latest checkpoint exactly: same weights, optimizer, schedule, RNG and place in the
data. Run under ``torchrun`` it trains data-parallel (DDP); the loss is weighted by answer
tokens across micro-batches and ranks, so N ranks train as one process with N times the batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import signal
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from vlmdata import __version__
from vlmdata.encode.models import PRECISIONS, resolve_device, resolve_precision
from vlmdata.errors import UserError, one_line, require_at_least, require_finite
from vlmdata.pipeline.runner import check_output_location, path_argument
from vlmdata.pipeline.shards import (
    atomic_write_json,
    exclusive_output,
    read_state_json,
    short_text,
)
from vlmdata.pipeline.upstream import marker_of
from vlmdata.train import RUN_CONFIG, RUN_SUMMARY
from vlmdata.train import checkpoints as ckpt
from vlmdata.train.conversations import Conversations
from vlmdata.train.data import (
    Batch,
    EpochBatches,
    FeatureDataset,
    FeatureFiles,
    batches_per_epoch,
    build_examples,
    collate,
    evaluation_batches,
    open_feature_files,
)
from vlmdata.train.distributed import Distributed
from vlmdata.train.metrics_log import MetricsLog
from vlmdata.train.model import VisionLanguageModel
from vlmdata.train.projectors import ProjectorConfig
from vlmdata.train.sequence import ConversationFormat

TRAIN_LLM = ("none", "full", "lora")
# LLaVA's pretraining instructions: one is sampled per example, so the projector learns to
# describe the image rather than to answer one fixed string.
DEFAULT_PROMPTS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)
# Options a resume may change: they do not change what is computed.
_RESUMABLE = {"resume", "eval_every", "save_every", "workers", "quiet", "keep_checkpoints",
              "device", "out"}  # fmt: skip


@dataclass
class TrainConfig:
    """Everything `vlmdata train` takes; the CLI flags map one to one."""

    features: tuple[str, ...]
    llm: str
    out: str
    projector: str = "mlp2x_gelu"
    queries: int = 64
    train_llm: str = "none"
    lora_rank: int = 16
    lr: float = 1e-3
    llm_lr: float | None = None  # default: 2e-5 full, 2e-4 LoRA
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    warmup: float = 0.03  # a fraction of the steps when < 1, else a number of steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 512
    padding_side: str = "right"
    precision: str = "auto"
    device: str = "auto"
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    data: str | None = None
    captions: bool = True
    init: str | None = None
    val_fraction: float = 0.01
    val_samples: int = 1024
    eval_every: int = 200
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 0
    workers: int = 2
    allow_incomplete: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        require_at_least(1, batch_size=self.batch_size, grad_accum=self.grad_accum,
                         epochs=self.epochs, eval_every=self.eval_every,
                         save_every=self.save_every, keep_checkpoints=self.keep_checkpoints,
                         lora_rank=self.lora_rank,
                         max_length=self.max_length)  # fmt: skip
        require_at_least(0, workers=self.workers, val_samples=self.val_samples)
        if self.max_steps is not None:
            require_at_least(1, max_steps=self.max_steps)
        if self.train_llm not in TRAIN_LLM:
            raise UserError(
                f"--train-llm must be one of {', '.join(TRAIN_LLM)}, got {self.train_llm!r}"
            )
        if self.padding_side not in ("left", "right"):
            raise UserError(f"--padding-side must be left or right, got {self.padding_side!r}")
        require_finite("--lr", self.lr, 0, 10)
        require_finite("--val-fraction", self.val_fraction, -1e-12, 0.5)
        require_finite("--warmup", self.warmup, -1e-12, 1e9)
        require_finite("--weight-decay", self.weight_decay, -1e-12, 10)
        require_finite("--max-grad-norm", self.max_grad_norm, 0, 1e9)
        if self.llm_lr is not None:
            require_finite("--llm-lr", self.llm_lr, 0, 10)
        if self.precision not in PRECISIONS:
            choices = ", ".join(PRECISIONS)
            raise UserError(f"--precision must be one of {choices}, got {self.precision!r}")
        if not 0 <= self.seed < 2**63:
            raise UserError(f"--seed must be in [0, 2**63), got {self.seed}")
        for features in self.features:
            path_argument(features, "FEATURES_DIR")
        path_argument(self.out, "--out", written=True)
        for name, path in (("--init", self.init), ("--data", self.data)):
            if path is not None:
                path_argument(path, name)
        if not self.llm.strip():  # Path("") is the current directory
            raise UserError("--llm is empty; pass a model directory or a hub id")
        if Path(self.llm).is_dir():  # recorded absolute: caption and --init run from elsewhere
            self.llm = str(Path(self.llm).resolve())
        if not self.prompts or not all(p.strip() for p in self.prompts):
            raise UserError("--prompt must not be empty")

    @property
    def llm_learning_rate(self) -> float:
        return (
            self.llm_lr if self.llm_lr is not None else (2e-5 if self.train_llm == "full" else 2e-4)
        )


@dataclass
class TrainSummary:
    run_dir: Path
    step: int
    total_steps: int
    train_loss: float | None
    val_loss: float | None
    seconds: float
    examples: int
    val_examples: int
    unmatched: int = 0
    ambiguous: int = 0
    too_long: int = 0
    truncated: int = 0  # training sequences cut at --max-length
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else 0  # as Ctrl-C: the run stopped early (and saved)

    def format(self) -> str:
        loss = f"{self.train_loss:.4f}" if self.train_loss is not None else "n/a"
        val = f"{self.val_loss:.4f}" if self.val_loss is not None else "n/a"
        lines = [
            f"{'stopped' if self.interrupted else 'trained'} {self.step}/{self.total_steps} steps "
            f"in {self.seconds:.1f} s on {self.examples} examples ({self.val_examples} held out)",
            f"train loss {loss}, validation loss {val}",
        ]
        if self.unmatched or self.ambiguous or self.too_long:
            lines.append(f"--data rows not used: {self.unmatched} name no cached image, "
                         f"{self.ambiguous} name several, {self.too_long} put the image past "
                         "--max-length")  # fmt: skip
        if self.truncated:
            lines.append(f"{self.truncated} training sequences were cut at --max-length (their "
                         "answers lost their end): raise it")  # fmt: skip
        checkpoint = ckpt.latest_checkpoint(self.run_dir)
        lines.append(f"checkpoint: {checkpoint}; metrics: {self.run_dir / 'metrics.jsonl'}")
        if self.interrupted:
            lines.append("rerun the same command with --resume to continue")
        return "\n".join(lines)


@dataclass
class _Position:
    """Where the loop is: optimizer steps done, and the next micro-batch's epoch and index."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


def run_train(config: TrainConfig) -> TrainSummary:
    """Train a projector (and the LLM when asked) on the features of ``config.features``."""
    out = Path(config.out)
    check_output_location(out, [Path(f) for f in config.features], name="--out")
    device = resolve_device(config.device, "fp32")
    precision = resolve_precision(config.precision, device)
    distributed = Distributed.from_environment(device)
    with distributed:
        rng_devices = [torch.cuda.current_device()] if device == "cuda" else []
        lock = exclusive_output(out) if distributed.rank == 0 else nullcontext()
        with lock, torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(config.seed)  # scoped: the caller's RNG is restored afterwards
            return Trainer(config, out, device, precision, distributed).run()


class Trainer:
    def __init__(self, config: TrainConfig, out: Path, device: str, precision: str,
                 distributed: Distributed) -> None:  # fmt: skip
        self.config, self.out, self.device, self.dist = config, out, device, distributed
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.precision = precision
        resume_from = self._resume_point()
        files = open_feature_files(config.features, config.allow_incomplete)
        if resume_from is not None:
            self._check_same_features(files)
        conversations = Conversations(Path(config.data)) if config.data else None
        init = self._init_run(files.attrs)
        # Frozen LLM weights on a GPU in bf16 when it autocasts to bf16: no optimizer ever
        # touches them. Not in fp16: Llama-3's activations overflow it; they stay fp32.
        bf16 = device == "cuda" and self.autocast == torch.bfloat16
        frozen_dtype = torch.bfloat16 if bf16 else torch.float32
        llm_dtype = torch.float32 if config.train_llm == "full" else frozen_dtype
        run_config = self._run_config(files, init)
        if resume_from is not None and config.train_llm == "full":  # the trained LLM, once
            llm = ckpt.load_llm(config.llm, device, llm_dtype, weights_dir=resume_from / "llm")
        else:
            llm = ckpt.base_llm(run_config, device, llm_dtype)
        projector = ProjectorConfig(kind=config.projector, in_dim=files.width,
                                    out_dim=llm.hidden_size, tokens=files.tokens,
                                    queries=config.queries)  # fmt: skip
        run_config["projector"] = dataclasses.asdict(projector)
        self.text = ConversationFormat(llm.tokenizer, projector.output_tokens, config.max_length)
        for prompt in config.prompts:  # refused now, not at the step that samples it
            self.text.encode_prompt(prompt)
        self.examples = build_examples(files, config.val_fraction, conversations,
                                       config.captions, self.text)  # fmt: skip
        if len(self.examples.train) < config.batch_size * distributed.world:
            raise UserError(
                f"{len(self.examples.train)} training examples cannot fill one batch of "
                f"{config.batch_size * distributed.world}; lower --batch-size or add features"
            )
        self.model = VisionLanguageModel(llm.model, projector).to(device)
        if init is not None:
            self.model.load_adapter_state(ckpt.load_adapter(Path(init["checkpoint"])))
        self._set_trainable(resume_from)
        self.files, self.conversations, self.run_config = files, conversations, run_config
        self.optimizer = torch.optim.AdamW(self._parameter_groups(), betas=(0.9, 0.95))
        self.micro_per_epoch = batches_per_epoch(len(self.examples.train), config.batch_size,
                                                 distributed.world)  # fmt: skip
        if self.micro_per_epoch < config.grad_accum:
            raise UserError(
                f"--grad-accum {config.grad_accum} is more than the {self.micro_per_epoch} "
                "micro-batches of an epoch; lower it or --batch-size"
            )
        self.total_steps = config.max_steps or max(
            1, config.epochs * self.micro_per_epoch // config.grad_accum
        )
        warmup = config.warmup if config.warmup >= 1 else config.warmup * self.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, partial(_cosine_with_warmup, warmup=warmup, total=self.total_steps)
        )
        self.scaler = torch.amp.GradScaler(device, enabled=self.autocast == torch.float16)
        self.position = _Position()
        if resume_from is not None:
            self._restore(resume_from)
        elif distributed.rank == 0:
            atomic_write_json(out / RUN_CONFIG, run_config)
        self._saved_step = self.position.step if resume_from is not None else -1
        self._truncated = 0  # in this run's steps
        self.wrapped = distributed.wrap(self.model)
        self.metrics = MetricsLog(out, self.position.step, enabled=distributed.rank == 0)

    # ---- setup ---------------------------------------------------------------------------
    def _resume_point(self) -> Path | None:
        """The checkpoint to continue from, or None for a new run; a run directory already
        holding a run is only continued with --resume, and with the options it was made with."""
        existing = self._existing_run()
        latest = ckpt.latest_checkpoint(self.out) if existing is not None else None
        if latest is None and any(ckpt.checkpoints_dir(self.out).glob("step-*")):
            raise UserError(
                f"{self.out} holds checkpoints but no {RUN_CONFIG} or checkpoints/latest.json; "
                "restore them, or use another --out"
            )
        if latest is None:
            if self.config.resume and self.dist.rank == 0:
                print(f"nothing to resume in {self.out}: starting a new run", flush=True)
            return None
        if not self.config.resume:
            raise UserError(
                f"{self.out} holds a training run (at {latest.name}); pass --resume to continue "
                "it, or another --out"
            )
        if existing.get("world_size", 1) != self.dist.world:
            raise UserError(
                f"{self.out} was trained on {existing.get('world_size', 1)} processes, this is "
                f"{self.dist.world}: the data position is per process; resume with "
                f"--nproc_per_node {existing.get('world_size', 1)}, or use another --out"
            )
        before = existing["options"]
        now = _options(self.config)
        for name, value in now.items():
            if name not in _RESUMABLE and before.get(name) != value:
                flag, earlier = name.replace("_", "-"), short_text(before.get(name))
                raise UserError(
                    f"--resume with --{flag} {short_text(value)} but {self.out} was trained with "
                    f"{earlier}; resume with the same options, or use another --out"
                )
        return latest

    def _existing_run(self) -> dict | None:
        """The run config in --out; None for a new or empty directory (one holding anything
        else is refused: a run would overwrite its config.json)."""
        if not self.out.is_dir() or not [p for p in self.out.iterdir() if p.name != ".lock"]:
            return None
        if not (self.out / RUN_CONFIG).exists():
            if ckpt.checkpoints_dir(self.out).is_dir():
                return None  # checkpoints without their config: refused by the caller
            raise UserError(
                f"--out {self.out} is not empty and holds no training run; pass a new or empty "
                "directory"
            )
        return ckpt.read_run_config(self.out)

    def _check_same_features(self, files: FeatureFiles) -> None:
        """A resume reads the features the run started on: the data position indexes them."""
        existing = read_state_json(self.out / RUN_CONFIG)
        before = existing["features"].get("shards_sha256")
        if before is not None and before != _shards_digest(files):
            raise UserError(
                f"the features changed since {self.out} started (shards added, removed or "
                "encoded again): resume with the features it was trained on, or use another --out"
            )

    def _init_run(self, attrs: dict) -> dict | None:
        """The --init run and checkpoint, checked to fit these features and this LLM."""
        if not self.config.init:
            return None
        run = Path(self.config.init).resolve()
        earlier = ckpt.read_run_config(run)
        checkpoint = ckpt.checkpoint_of(run, None)
        if earlier["llm"] != self.config.llm:
            raise UserError(f"--init {run} trained --llm {earlier['llm']}, not {self.config.llm}; "
                            "pass the same --llm")  # fmt: skip
        for name in ("model", "layer", "token_grid", "width"):
            if earlier["features"]["attrs"].get(name) != attrs.get(name):
                raise UserError(
                    f"--init {run} was trained on features with {name}="
                    f"{earlier['features']['attrs'].get(name)!r}, these have {attrs.get(name)!r}"
                )
        kind, queries = earlier["projector"]["kind"], earlier["projector"].get("queries")
        if kind != self.config.projector:
            raise UserError(f"--init {run} has a {kind} projector; pass --projector {kind}")
        if kind == "resampler" and queries != self.config.queries:
            raise UserError(f"--init {run} has a resampler of {queries} queries; pass --queries "
                            f"{queries}")  # fmt: skip
        # Only a trained LLM ties this run to the earlier one's files; its adapter is copied.
        trained = earlier["train_llm"] != "none" or bool((earlier.get("init") or {}).get("llm"))
        return {"run": str(run), "checkpoint": str(checkpoint), "llm": trained}

    def _run_config(self, files: object, init: dict | None) -> dict:
        encode_plan = read_state_json(files.shard_dirs[0][0] / "plan.json") or {}
        return {
            "vlmdata_version": __version__,
            "llm": self.config.llm,
            "train_llm": self.config.train_llm,
            "prompts": list(self.config.prompts),
            "features": {
                "dirs": [str(Path(d).resolve()) for d in self.config.features],
                "attrs": files.attrs,
                "shards": len(files.paths),
                "shards_sha256": _shards_digest(files),
                # How images were squared before the encode resized them (for `caption`).
                "square": {
                    "pad_threshold": encode_plan.get("pad_threshold", 0.6),
                    "fill": encode_plan.get("fill", [0, 0, 0]),
                },
            },
            "init": init,
            "world_size": self.dist.world,
            "precision": self.precision,
            "options": _options(self.config),
        }

    def _set_trainable(self, resume_from: Path | None) -> None:
        mode = self.config.train_llm
        self.model.llm.requires_grad_(mode == "full")
        if mode == "lora":
            from vlmdata.train.lora import add_lora

            self.model.llm = add_lora(self.model.llm, self.config.lora_rank, resume_from)

    def _parameter_groups(self) -> list[dict]:
        """AdamW groups: decay on matrices only (not norms, biases, image begin/end), the LLM at
        its own learning rate. Frozen parameters get no group: no gradient, no state."""
        groups = {("adapter", True): [], ("adapter", False): [], ("llm", True): [],
                  ("llm", False): []}  # fmt: skip
        for name, parameter in self.model.named_parameters():
            if not parameter.requires_grad:
                continue
            part = "llm" if name.startswith("llm.") else "adapter"
            decay = parameter.ndim >= 2  # matrices (and the resampler's queries)
            groups[(part, decay)].append(parameter)
        rates = {"adapter": self.config.lr, "llm": self.config.llm_learning_rate}
        return [
            {"params": params, "lr": rates[part],
             "weight_decay": self.config.weight_decay if decay else 0.0}
            for (part, decay), params in groups.items() if params
        ]  # fmt: skip

    def _restore(self, checkpoint: Path) -> None:
        self.model.load_adapter_state(ckpt.load_adapter(checkpoint))
        state = ckpt.load_trainer_state(checkpoint)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.position = _Position(**state["position"])
        torch.set_rng_state(state["rng"][self.dist.rank % len(state["rng"])])
        if self.device == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"][self.dist.rank % len(state["cuda_rng"])])

    # ---- the loop ------------------------------------------------------------------------
    def run(self) -> TrainSummary:
        config, started = self.config, time.perf_counter()
        stop = _StopRequest()
        train_loss = val_loss = None
        bar = tqdm(total=self.total_steps, initial=self.position.step, unit="step",
                   disable=config.quiet or self.dist.rank != 0, dynamic_ncols=True)  # fmt: skip
        if self.position.step >= self.total_steps:  # a finished run resumed: nothing to do
            bar.close()
            return self._finished()
        micro_batches = self.micro_batches()
        with stop, bar:
            while self.position.step < self.total_steps and not self._stopping(stop):
                tick = time.perf_counter()
                step_batches = [next(micro_batches) for _ in range(config.grad_accum)]
                self._truncated += sum(b.truncated for b in step_batches)
                waited = time.perf_counter() - tick
                train_loss, grad_norm = self.optimizer_step(step_batches)
                self.position.step += 1
                seconds = time.perf_counter() - tick
                record = self._record(step_batches, train_loss, grad_norm, seconds, waited)
                if (
                    self.position.step % config.eval_every == 0
                    or self.position.step == self.total_steps
                ):
                    val_loss = record["val_loss"] = self.validation_loss()
                self.metrics.write(record)
                bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)  # fmt: skip
                bar.update()
                if (
                    self.position.step % config.save_every == 0
                    and self.position.step < self.total_steps
                ):
                    self._save()
            if self._saved_step != self.position.step:
                self._save()
        if self.dist.rank == 0:
            self.metrics.plot()
        self.metrics.close()
        summary = TrainSummary(
            run_dir=self.out, step=self.position.step, total_steps=self.total_steps,
            train_loss=train_loss, val_loss=val_loss, seconds=time.perf_counter() - started,
            examples=len(self.examples.train), val_examples=len(self.examples.val),
            unmatched=self.examples.unmatched, ambiguous=self.examples.ambiguous,
            too_long=self.examples.too_long,
            truncated=self.dist.sum(self._truncated),
            interrupted=self.position.step < self.total_steps,
        )  # fmt: skip
        if self.dist.rank == 0:
            fields = dataclasses.asdict(summary)
            del fields["run_dir"]
            atomic_write_json(self.out / RUN_SUMMARY, fields)
        return summary

    def _finished(self) -> TrainSummary:
        """The summary of a run already trained to its last step, as it recorded it."""
        recorded = read_state_json(self.out / RUN_SUMMARY, missing_ok=True) or {}
        return TrainSummary(
            run_dir=self.out, step=self.position.step, total_steps=self.total_steps,
            train_loss=recorded.get("train_loss"), val_loss=recorded.get("val_loss"), seconds=0.0,
            examples=len(self.examples.train), val_examples=len(self.examples.val),
            unmatched=self.examples.unmatched, ambiguous=self.examples.ambiguous,
            too_long=self.examples.too_long,
        )  # fmt: skip

    def _stopping(self, stop: _StopRequest) -> bool:
        """Whether any rank was asked to stop: all ranks stop after the same step (one rank
        saving while another trains on would deadlock their collectives)."""
        return self.dist.sum(int(stop.requested)) > 0

    def micro_batches(self) -> Iterator[Batch]:
        """This rank's micro-batches from the current position on, epoch after epoch."""
        while True:
            epoch, start = self.position.epoch, self.position.batch
            loader = self._loader(self.examples.train, EpochBatches(
                len(self.examples.train), self.config.batch_size, self.config.seed, epoch,
                start, self.dist.rank, self.dist.world), epoch)  # fmt: skip
            for batch in loader:
                self.position.batch += 1
                yield batch
            self.position.epoch, self.position.batch = epoch + 1, 0

    def _loader(self, table: object, batches: object, epoch: int) -> torch.utils.data.DataLoader:
        dataset = FeatureDataset(self.files, table, self.text, list(self.config.prompts),
                                 self.conversations, self.config.seed)  # fmt: skip
        dataset.epoch = epoch
        workers = self.config.workers
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=workers,
            collate_fn=partial(
                collate, pad_id=self.text.pad_id, padding_side=self.config.padding_side
            ),
            worker_init_fn=_ignore_interrupts if workers else None,
            pin_memory=self.device == "cuda",
            prefetch_factor=4 if workers else None,
            # Its own generator: a loader drawing its worker seed from the global RNG would
            # shift dropout's random numbers after a resume, which starts one more loader.
            generator=torch.Generator().manual_seed(self.config.seed + epoch),
        )

    def optimizer_step(self, batches: list[Batch]) -> tuple[float, float]:
        """One optimizer step over ``batches`` (this rank's micro-batches); every answer token
        of the step, on every rank, weighs the same. Returns (mean loss, gradient norm)."""
        tokens = self.dist.sum(sum(b.target_tokens for b in batches))
        if tokens == 0:
            raise UserError(
                f"step {self.position.step + 1} has no answer token: every sequence was cut at "
                f"--max-length {self.config.max_length}; raise it"
            )
        self.model.train()
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1
            with self.dist.no_sync(self.wrapped, sync), self._autocast():
                loss, _ = self.wrapped(batch.to(self.device))
            # DDP averages gradients over ranks: times world, the step's gradient is of the sum
            # over all its tokens, divided by their count.
            self.scaler.scale(loss * self.dist.world / tokens).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        parameters = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(parameters, self.config.max_grad_norm)
        loss = self.dist.sum(total.item()) / tokens
        if not self.scaler.is_enabled() and not (math.isfinite(loss) and torch.isfinite(norm)):
            # Before the weights take the step: a checkpoint never holds NaN.
            raise UserError(
                f"the loss or its gradient is not finite at step {self.position.step + 1} "
                f"(examples {', '.join(k for b in batches for k in b.keys[:2])}, ...): the "
                "features hold NaN or inf, or --lr is too high; check them, or lower it and "
                "--resume"
            )
        self.step_lr = self.scheduler.get_last_lr()[0]  # what this step trains at
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.get_scale() >= scale:  # fp16: an overflowing step is skipped, and so
            self.scheduler.step()  # is its learning-rate step
        self.optimizer.zero_grad(set_to_none=True)
        return loss, float(norm)

    def _autocast(self) -> object:
        return torch.autocast(self.device, dtype=self.autocast, enabled=self.autocast is not None)

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        """Mean loss per answer token over the first ``--val-samples`` held-out examples."""
        table = self.examples.val[: self.config.val_samples]
        if len(table) == 0:
            return None
        self.model.eval()
        batches = evaluation_batches(len(table), self.config.batch_size, self.dist.rank,
                                     self.dist.world)  # fmt: skip
        total, tokens = 0.0, 0
        for batch in self._loader(table, batches, epoch=0):
            with self._autocast():
                loss, count = self.model(batch.to(self.device))
            total, tokens = total + loss.item(), tokens + count
        total, tokens = self.dist.sum(total), self.dist.sum(tokens)
        return total / max(tokens, 1)

    def _record(self, batches: list[Batch], loss: float, grad_norm: float, seconds: float,
                waited: float) -> dict:  # fmt: skip
        samples = self.dist.sum(sum(len(b.keys) for b in batches))
        tokens = self.dist.sum(sum(int(b.attention_mask.sum()) for b in batches))
        return {
            "step": self.position.step, "epoch": self.position.epoch, "loss": loss,
            "lr": self.step_lr, "grad_norm": grad_norm,
            "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds,
            "data_wait_s": waited, "step_s": seconds,
        }  # fmt: skip

    def _save(self) -> None:
        self._saved_step = self.position.step
        if self.dist.rank == 0:
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "position": dataclasses.asdict(self.position),
                "rng": self.dist.gather_rng(torch.get_rng_state()),
            }
            if self.device == "cuda":
                state["cuda_rng"] = self.dist.gather_rng(torch.cuda.get_rng_state())
            ckpt.save_checkpoint(self.out, self.position.step, self.model, self.config.train_llm,
                                 state, self.config.keep_checkpoints)  # fmt: skip
        else:
            self.dist.gather_rng(torch.get_rng_state())
            if self.device == "cuda":
                self.dist.gather_rng(torch.cuda.get_rng_state())
        self.dist.barrier()


def _shards_digest(files: FeatureFiles) -> str:
    """What identifies the training data: every shard's path and state (its stats marker)."""
    shards = zip(files.shard_dirs, files.rows, strict=True)
    listing = [[str(folder.resolve()), name, rows] for (folder, name), rows in shards]
    markers = [marker_of(folder / f"{name}.stats.json") for folder, name in files.shard_dirs]
    return hashlib.sha256(json.dumps([listing, markers]).encode()).hexdigest()


def read_prompts(prompts: list[str] | None, prompts_file: str | None) -> tuple[str, ...]:
    """``--prompt`` values and the lines of ``--prompts FILE`` (blank lines skipped)."""
    if any(not p.strip() for p in prompts or []):
        raise UserError("--prompt is empty; pass an instruction, or drop it for the defaults")
    found = list(prompts or [])
    if prompts_file:
        try:
            text = Path(prompts_file).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --prompts {prompts_file}: {one_line(e, 120)}") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise UserError(f"--prompts {prompts_file} holds no prompt; one per line")
        found += lines
    return tuple(found)


def _cosine_with_warmup(step: int, warmup: float, total: int) -> float:
    """Learning-rate factor: linear from 0 over ``warmup`` steps, then cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1.0, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _options(config: TrainConfig) -> dict:
    options = dataclasses.asdict(config)
    options["features"] = [str(Path(f).resolve()) for f in config.features]
    options["prompts"] = list(config.prompts)
    for name in ("out", "data", "init"):
        if options[name]:
            options[name] = str(Path(options[name]).resolve())
    return json.loads(json.dumps(options))


def _ignore_interrupts(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C and SIGTERM to the main process, which finishes its
    step, saves and then ends them (a SIGTERM to the whole process group, as a scheduler or a
    container stop sends, killed them mid-step: the run ended unsaved)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _StopRequest:
    """Ctrl-C / SIGTERM inside the block set ``requested``: the loop stops at the end of the
    optimizer step and saves. A second Ctrl-C stops at once (the last checkpoint stays)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
