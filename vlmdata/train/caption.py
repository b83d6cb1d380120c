"""`vlmdata caption`: captions for new images from a trained run.

Each image (a file, or an http(s) URL fetched by the download stage's fetcher with its guards:
deadline, byte cap, checked redirects, no private addresses unless allowed, ``noai`` opt-outs)
is made into tokens exactly as the run's features were: the same crop/pad rule and fill, the
same CLIP model, weights, layer and token grid, the same normalisation, rounded to float16 as
the cache stores them. The run's model then answers the prompt (the run's first training prompt
unless ``--prompt``) for each image: greedily, or ``--num`` samples with ``--temperature`` and
``--top-p``.

An image that cannot be read, fetched or decoded is reported on its own line (and in the JSON)
and the others are captioned; the command then exits 1.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlmdata.errors import UserError, one_line, require_at_least, require_finite
from vlmdata.pipeline.runner import path_argument
from vlmdata.train.checkpoints import load_trained
from vlmdata.train.data import collate
from vlmdata.train.sequence import Encoded

MAX_PIXELS = 100_000_000  # as the stages' --max-pixels default: larger images are not decoded
_FETCH_CONCURRENCY = 8
MAX_NUM = 100  # captions per image: more is a mistake, and each costs a generation
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Read = tuple[bytes | None, str | None]  # an image's bytes, or why there are none


class Captioner:
    """A run's model at one checkpoint, captioning cached (or freshly made) patch tokens."""

    def __init__(self, run_dir: Path, checkpoint: int | None, device: str, precision: str) -> None:
        from vlmdata.encode.models import resolve_device, resolve_precision

        self.device = resolve_device(device, precision)
        self.precision = resolve_precision(precision, self.device)
        self.dtype = _DTYPES[self.precision]
        trained = load_trained(run_dir, checkpoint, self.device, self.dtype)
        self.model, self.text, self.config = trained.model, trained.text, trained.config
        self.checkpoint = trained.checkpoint
        self.default_prompt: str = self.config["prompts"][0]

    def autocast(self) -> AbstractContextManager:
        """Mixed precision on a GPU, as the trainer ran (on CPU the weights are the dtype)."""
        if self.device != "cuda" or self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device, dtype=self.dtype)

    def prompt(self, text: str, max_new_tokens: int) -> Encoded:
        """``text`` encoded as generation starts from it, the image in its place; it and
        ``max_new_tokens`` must fit the LLM's positions."""
        encoded = self.text.encode_prompt(text)
        if encoded.truncated:
            raise UserError(
                f"--prompt is longer than the run's --max-length "
                f"{self.config['options']['max_length']} allows; shorten it"
            )
        positions = getattr(self.model.llm.config, "max_position_embeddings", None)
        if positions is not None and len(encoded.ids) + max_new_tokens > positions:
            raise UserError(
                f"--max-new-tokens {max_new_tokens} after the {len(encoded.ids)} positions of the "
                f"image and prompt exceeds the LLM's {positions}; pass at most "
                f"{positions - len(encoded.ids)}"
            )
        return encoded

    def captions(
        self,
        tokens: Sequence[np.ndarray],
        prompt: Encoded,
        batch_size: int,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        num: int = 1,
    ) -> list[list[str]]:
        """``num`` captions for each image's float16 tokens ``[T, C]``; at most ``batch_size``
        sequences are generated at once (images x captions each)."""
        stops = self.text.stop_ids()
        per_call = max(1, batch_size // num)  # images per generate call
        out: list[list[str]] = []
        for start in range(0, len(tokens), per_call):
            chunk = tokens[start : start + per_call]
            examples = [{"tokens": t, "ids": prompt.ids, "labels": prompt.labels,
                         "image_at": prompt.image_at, "key": str(start + i)}
                        for i, t in enumerate(chunk)]  # fmt: skip
            batch = collate(examples, self.text.pad_id, padding_side="left").to(self.device)
            captions: list[list[str]] = [[] for _ in chunk]
            while len(captions[0]) < num:  # more captions than a batch holds: in rounds
                count = min(num - len(captions[0]), batch_size)
                with self.autocast():
                    generated = self.model.generate(batch, stops, max_new_tokens, temperature,
                                                    top_p, count)  # fmt: skip
                texts = [self._decode(row, stops) for row in generated.tolist()]
                for i in range(len(chunk)):
                    captions[i] += texts[i * count : (i + 1) * count]
            out += captions
        return out

    def _decode(self, ids: list[int], stops: list[int]) -> str:
        end = next((i for i, token in enumerate(ids) if token in stops), len(ids))
        return self.text.tokenizer.decode(ids[:end], skip_special_tokens=True).strip()


def check_prompt(prompt: str | None) -> None:
    """Refuse an empty ``--prompt`` (None: the run's own)."""
    if prompt is not None and not prompt.strip():
        raise UserError("--prompt is empty; pass an instruction, or drop it for the run's own")


class ImageEncoder:
    """Image bytes -> patch tokens as the run's features were made (``config["features"]``)."""

    def __init__(self, features: dict, device: str, precision: str, pretrained: str | None) -> None:
        from vlmdata.encode.features import PatchFeatures
        from vlmdata.encode.models import load_clip
        from vlmdata.labels.features import FeatureModel
        from vlmdata.labels.text import resolve_weights
        from vlmdata.pipeline.imageops import SquareOptions

        attrs, square = features["attrs"], features["square"]
        model = FeatureModel(name=attrs["model"], pretrained=attrs["pretrained"],
                             weights_sha256=attrs.get("weights_sha256"),
                             embed_dim=int(attrs["embed_dim"]))  # fmt: skip
        clip = load_clip(model.name, resolve_weights(model, pretrained), device, precision)
        if (clip.image_size, clip.width) != (attrs["image_size"], attrs["width"]):
            raise UserError(
                f"{clip.name} here takes {clip.image_size} px images into {clip.width} channels, "
                f"the run's features {attrs['image_size']} px and {attrs['width']}; caption with "
                "the open_clip version the features were encoded with"
            )
        self.clip = clip
        self.features = PatchFeatures(clip, int(attrs["layer"]), int(attrs["token_grid"]))
        self.options = SquareOptions(size=clip.image_size, pad_threshold=square["pad_threshold"],
                                     fill=tuple(square["fill"]))  # fmt: skip
        self.mean = torch.tensor(attrs["image_mean"], device=device).view(3, 1, 1)
        self.std = torch.tensor(attrs["image_std"], device=device).view(3, 1, 1)

    def square(self, data: bytes) -> tuple[torch.Tensor | None, str | None]:
        """The image's uint8 pixels ``[3, S, S]`` after the crop/pad rule, or why not."""
        from vlmdata.encode.stage import pixels
        from vlmdata.pipeline.imageops import decoder_warnings_ignored, make_square

        with decoder_warnings_ignored():
            result, square = make_square(data, self.options, MAX_PIXELS)
        if square is None:
            return None, f"{result.error_kind}: {result.error}"
        return pixels(square), None

    def tokens(self, images: list[torch.Tensor]) -> list[np.ndarray]:
        """float16 tokens ``[T, C]`` of each image (pixels from :meth:`square`)."""
        from vlmdata.encode.stage import normalize

        batch = torch.stack(images).to(self.clip.device)
        tokens, _ = self.features(normalize(batch, self.mean, self.std).to(self.clip.dtype))
        return list(tokens.to(torch.float16).cpu().numpy())


@dataclass
class CaptionConfig:
    """Everything `vlmdata caption` takes; the CLI flags map one to one."""

    run_dir: str
    images: tuple[str, ...]
    prompt: str | None = None
    num: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int = 64
    batch_size: int = 16
    checkpoint: int | None = None
    device: str = "auto"
    precision: str = "auto"
    pretrained: str | None = None  # where the features' CLIP weights file is now, if moved
    allow_private_network: bool = False
    json_out: str | None = None

    def __post_init__(self) -> None:
        path_argument(self.run_dir, "RUN_DIR")
        if self.json_out is not None:
            path_argument(self.json_out, "--json", written=True)
        if not self.images:
            raise UserError("pass at least one IMAGE (a file or an http(s) URL)")
        require_at_least(1, num=self.num, max_new_tokens=self.max_new_tokens,
                         batch_size=self.batch_size)  # fmt: skip
        require_finite("--top-p", self.top_p, 0, 1)
        check_prompt(self.prompt)
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"--temperature must be 0 (greedy) or more, got {self.temperature}")
        if self.num > MAX_NUM:
            raise UserError(f"--num {self.num}: at most {MAX_NUM} captions per image")
        if self.temperature == 0 and self.num > 1:
            raise UserError(
                f"--num {self.num} with --temperature 0: greedy decoding gives one caption; "
                "pass --temperature (e.g. 0.7) to sample several"
            )
        if self.json_out is not None:  # found now, not after every image is captioned
            target = Path(self.json_out)
            if target.is_dir():
                raise UserError(f"--json {self.json_out} is a directory; pass a file path")
            if not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
                raise UserError(
                    f"--json {self.json_out}: {target.parent} is not a folder you can write; "
                    "pass a path in one"
                )


@dataclass
class ImageCaptions:
    image: str  # as given
    captions: list[str]
    error: str | None = None  # why there are none

    def lines(self) -> list[str]:
        """One line per caption (or for the error), control characters escaped: a generated
        caption is untrusted text and must not drive the terminal or split its line."""
        if self.error is not None:
            return [f"{self.image}: error: {_printable(self.error)}"]
        if len(self.captions) == 1:
            return [f"{self.image}: {_printable(self.captions[0])}"]
        return [f"{self.image} [{i}]: {_printable(c)}" for i, c in enumerate(self.captions, 1)]


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) or "(empty)"


@dataclass
class CaptionSummary:
    results: list[ImageCaptions]
    json_out: Path | None

    @property
    def exit_code(self) -> int:
        """1 when an image could not be captioned (the others were), else 0."""
        return int(any(r.error is not None for r in self.results))

    def format(self) -> str:
        lines = [line for result in self.results for line in result.lines()]
        failed = sum(r.error is not None for r in self.results)
        if failed:
            lines.append(f"{failed} of {len(self.results)} images could not be captioned")
        if self.json_out is not None:
            lines.append(f"wrote {self.json_out}")
        return "\n".join(lines)


def run_caption(config: CaptionConfig) -> CaptionSummary:
    """Caption ``config.images`` with the run ``config.run_dir``."""
    captioner = Captioner(Path(config.run_dir), config.checkpoint, config.device, config.precision)
    prompt_text = captioner.default_prompt if config.prompt is None else config.prompt
    prompt = captioner.prompt(prompt_text, config.max_new_tokens)
    encoder = ImageEncoder(captioner.config["features"], captioner.device, captioner.precision,
                           config.pretrained)  # fmt: skip
    squares, errors = [], {}
    read = _read_images(config.images, config.allow_private_network)
    for index, (data, error) in enumerate(read):
        square, error = encoder.square(data) if data is not None else (None, error)
        if square is None:
            errors[index] = error
        else:
            squares.append(square)
    tokens = [t for start in range(0, len(squares), config.batch_size)
              for t in encoder.tokens(squares[start : start + config.batch_size])]  # fmt: skip
    gpus = [torch.cuda.current_device()] if captioner.device == "cuda" else []
    with torch.random.fork_rng(devices=gpus):  # seeded here, the caller's generators kept
        torch.manual_seed(config.seed)
        captions = iter(captioner.captions(tokens, prompt, config.batch_size,
                                           config.max_new_tokens, config.temperature,
                                           config.top_p, config.num))  # fmt: skip
    results = [
        ImageCaptions(image, [], errors[i]) if i in errors else ImageCaptions(image, next(captions))
        for i, image in enumerate(config.images)
    ]
    out = Path(config.json_out) if config.json_out else None
    if out is not None:
        _write_json(out, config, captioner, prompt_text, results)
    return CaptionSummary(results, out)


def _read_images(images: Sequence[str], allow_private_network: bool) -> list[Read]:
    """(bytes, None) or (None, why) for each image: URLs fetched together, files read."""
    urls = {i: image for i, image in enumerate(images) if "://" in image}
    fetched = asyncio.run(_fetch_all(list(urls.values()), allow_private_network)) if urls else []
    by_index = dict(zip(urls, fetched, strict=True))
    out: list[Read] = []
    for i, image in enumerate(images):
        if (result := by_index.get(i)) is not None:
            out.append((result.body, None if result.ok else f"{result.error_kind}: {result.error}"))
            continue
        try:
            out.append((Path(image).read_bytes(), None))
        except OSError as e:
            out.append((None, f"unreadable: {e.strerror or one_line(e)}"))
    return out


async def _fetch_all(urls: list[str], allow_private_network: bool) -> list:
    from vlmdata.pipeline import fetch

    policy = fetch.FetchPolicy(allow_private_network=allow_private_network)
    limiter = fetch.RequestLimiter(_FETCH_CONCURRENCY, _FETCH_CONCURRENCY)
    async with fetch.open_session(policy, _FETCH_CONCURRENCY) as session:
        return await asyncio.gather(
            *(fetch.fetch_with_deadline(session, url, policy, limiter) for url in urls)
        )


def _write_json(out: Path, config: CaptionConfig, captioner: Captioner, prompt: str,
                results: list[ImageCaptions]) -> None:  # fmt: skip
    from vlmdata.pipeline.shards import write_named_file

    record = {
        "run": str(Path(config.run_dir).resolve()),
        "checkpoint": captioner.checkpoint.name,
        "prompt": prompt,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "seed": config.seed,
        "num": config.num,
        "images": [{"image": r.image, "captions": r.captions, "error": r.error} for r in results],
    }
    try:
        write_named_file(out, (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode())
    except OSError as e:
        raise UserError(f"cannot write --json {out} ({e.strerror or e}); pass a path you can "
                        "write")  from None  # fmt: skip
