"""Conversations -> token ids and loss labels, with the image's place reserved.

A training example is one image and one or more (user, assistant) turns. Its sequence is the
prompt text with the image spliced in where ``<image>`` stands in the first user turn (put at
its start when absent): ``[image-begin] [Q projected image tokens] [image-end]``. Text goes
through the tokenizer's chat template when it has one; without one a turn is
``user text \\n assistant text EOS``. Labels are the ids on assistant text (and the template's
end of turn, or EOS) and ``-100`` everywhere else: image, prompt, template headers.

The template is rendered incrementally: the text up to each assistant turn (with the
generation prompt) and the text through it; the assistant's span is the difference, so a
multi-turn conversation has a loss on every assistant turn and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmdata.errors import UserError

IMAGE = "<image>"
IGNORE = -100
_MIN_TEXT = 16  # --max-length must leave at least this many positions for text
_PROMPT_CACHE = 4096  # distinct prompt pieces kept tokenized (conversations bring many)


@dataclass
class Encoded:
    ids: list[int]  # the image's slots hold the pad id: the model writes the image there
    labels: list[int]  # IGNORE where there is no loss
    image_at: int  # index of the image-begin slot
    truncated: bool = False


class ConversationFormat:
    """Encodes conversations for one tokenizer and one number of image tokens."""

    def __init__(self, tokenizer: object, image_tokens: int, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.slots = image_tokens + 2  # begin, tokens, end
        if max_length < self.slots + _MIN_TEXT:
            raise UserError(
                f"--max-length {max_length} leaves no room for text after {self.slots} image "
                f"positions; use at least {self.slots + _MIN_TEXT}"
            )
        self.max_length = max_length
        self.template = bool(getattr(tokenizer, "chat_template", None))
        self.pad_id = tokenizer.pad_token_id
        self._stops: list[int] | None = None
        # Prompt pieces (a template's header with one of a few prompts) repeat in every
        # example: tokenized once. Answers vary, and are not kept.
        self._prompt_ids: dict[str, list[int]] = {}

    def encode(self, turns: list[tuple[str, str]]) -> Encoded:
        """A conversation (user, assistant) pairs -> ids and labels, cut to --max-length."""
        segments = self._segments(turns, generation=False)
        return self._tokenize(segments)

    def encode_prompt(self, prompt: str) -> Encoded:
        """What generation starts from: the image and ``prompt``, up to where the answer
        begins (the template's generation prompt)."""
        return self._tokenize(self._segments([(prompt, "")], generation=True))

    def image_fits(self, turns: list[tuple[str, str]]) -> bool:
        """Whether the image of this conversation lies within --max-length (text before it in
        the first turn, or a long template header, can push it out)."""
        prompt = self._tokenize(self._segments(turns[:1], generation=True), check=False)
        return prompt.image_at + self.slots <= self.max_length

    def stop_ids(self) -> list[int]:
        """Ids that end an answer: EOS, and the template's end-of-turn token when it has one."""
        if self._stops is None:
            self._stops = self._find_stop_ids()
        return self._stops

    def _find_stop_ids(self) -> list[int]:
        stops = [self.tokenizer.eos_token_id]
        if self.template:
            ids = self._text_ids(self._segments([("x", "y")], generation=False)[-1][0])
            special = set(self.tokenizer.all_special_ids) | set(
                getattr(self.tokenizer, "added_tokens_decoder", {})
            )
            # The answer "y" then the template's closing tokens: the first special one ends it.
            stops += [i for i in ids if i in special][:1]
        return sorted({s for s in stops if s is not None})

    def _segments(self, turns: list[tuple[str, str]], generation: bool) -> list[tuple[str, bool]]:
        """(text, trained) pieces whose concatenation is the rendered conversation."""
        turns = _with_one_image(turns)
        if not self.template:
            segments: list[tuple[str, bool]] = []
            for user, answer in turns:
                segments.append((user + "\n", False))
                if not generation:
                    segments.append((answer, True))
                    segments.append(("", True))  # EOS, added by _tokenize
            return segments
        messages: list[dict] = []
        segments, rendered = [], ""
        for user, answer in turns:
            messages.append({"role": "user", "content": user})
            prefix = self._render(messages, generation_prompt=True)
            _require_prefix(rendered, prefix, self.tokenizer)
            segments.append((prefix[len(rendered) :], False))
            if generation:
                return segments
            messages.append({"role": "assistant", "content": answer})
            full = self._render(messages, generation_prompt=False)
            _require_prefix(prefix, full, self.tokenizer)
            segments.append((full[len(prefix) :], True))
            rendered = full
        return segments

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _tokenize(self, segments: list[tuple[str, bool]], check: bool = True) -> Encoded:
        ids: list[int] = []
        labels: list[int] = []
        bos = self.tokenizer.bos_token_id
        if not self.template and bos is not None:  # a template writes its own BOS
            ids.append(bos)
            labels.append(IGNORE)
        image_at = -1
        for text, trained in segments:
            if trained and not text and not self.template:
                piece = [self.tokenizer.eos_token_id]
            elif trained:  # an answer is text only (_with_one_image took its <image>s out)
                piece = self._text_ids(text)
            else:
                before, found, after = text.partition(IMAGE)
                piece = self._prompt_text_ids(before)
                if found:
                    image_at = len(ids) + len(piece)
                    piece += [self.pad_id] * self.slots + self._prompt_text_ids(after)
            ids += piece
            labels += self._answer_labels(piece) if trained else [IGNORE] * len(piece)
        if check and image_at + self.slots > self.max_length:
            raise UserError(
                f"--max-length {self.max_length} cuts the image: the prompt puts it at position "
                f"{image_at}; use at least {image_at + self.slots + _MIN_TEXT}"
            )
        truncated = len(ids) > self.max_length
        return Encoded(ids[: self.max_length], labels[: self.max_length], image_at, truncated)

    def _answer_labels(self, piece: list[int]) -> list[int]:
        """An answer's labels: its ids through the first stop id (a template's end of turn);
        what the template writes after it (Qwen's newline) is no part of the answer."""
        stops = set(self.stop_ids())
        end = next((i + 1 for i, token in enumerate(piece) if token in stops), len(piece))
        return piece[:end] + [IGNORE] * (len(piece) - end)

    def _prompt_text_ids(self, text: str) -> list[int]:
        ids = self._prompt_ids.get(text)
        if ids is None:
            ids = self._text_ids(text)
            if len(self._prompt_ids) < _PROMPT_CACHE:
                self._prompt_ids[text] = ids
        return list(ids)

    def _text_ids(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _with_one_image(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The turns with exactly one ``<image>``: where the first user turn has it, else at its
    start; any other, in any turn or answer, is dropped (one image per example)."""
    first, *rest = turns
    user, answer = first
    if IMAGE not in user:
        user = f"{IMAGE}\n{user}"
    head, _, tail = user.partition(IMAGE)
    user = head + IMAGE + tail.replace(IMAGE, "")
    answer = answer.replace(IMAGE, "")
    return [(user, answer)] + [(u.replace(IMAGE, ""), a.replace(IMAGE, "")) for u, a in rest]


def _require_prefix(prefix: str, text: str, tokenizer: object) -> None:
    if not text.startswith(prefix):
        name = getattr(tokenizer, "name_or_path", "the tokenizer")
        raise UserError(
            f"the chat template of {name} renders a conversation differently as it grows, so "
            "the assistant turns cannot be found; use a model whose template appends turns"
        )
