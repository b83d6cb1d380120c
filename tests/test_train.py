"""`vlmdata train`: the spliced sequence and its loss, learning, exact resume, every projector
and LLM mode, conversation data, and the user mistakes it refuses."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import encode_folder, write_shape_images
from vlmdata.cli import app
from vlmdata.train import trainer as trainer_module
from vlmdata.train.checkpoints import latest_checkpoint, load_trained
from vlmdata.train.conversations import Conversations
from vlmdata.train.data import (
    FeatureDataset,
    build_examples,
    collate,
    open_feature_files,
    split_fraction,
)
from vlmdata.train.llm import load_llm
from vlmdata.train.model import VisionLanguageModel
from vlmdata.train.projectors import ProjectorConfig
from vlmdata.train.sequence import IGNORE, ConversationFormat
from vlmdata.train.trainer import TrainConfig, run_train

runner = CliRunner(env={"COLUMNS": "200"})
FAST = dict(llm="tiny-random-llama", batch_size=8, workers=0, quiet=True, val_fraction=0.1)


pytestmark = pytest.mark.usefixtures("quiet_random_weights")


def _train(features: Path, out: Path, **options) -> trainer_module.TrainSummary:
    return run_train(TrainConfig(features=(str(features),), out=str(out), **{**FAST, **options}))


def _cli(*args: object) -> object:
    return runner.invoke(app, ["train", *map(str, args)])


def _tiny(features: Path):
    files = open_feature_files([features])
    llm = load_llm("tiny-random-llama", "cpu", torch.float32)
    return files, llm


# --- the sequence and its loss ------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_loss_at_init_is_the_llms_loss_on_the_spliced_sequence(shape_features, padding_side):
    files, llm = _tiny(shape_features)
    torch.manual_seed(0)
    projector = ProjectorConfig("mlp2x_gelu", files.width, llm.hidden_size, files.tokens)
    model = VisionLanguageModel(llm.model, projector).eval()
    text = ConversationFormat(llm.tokenizer, projector.output_tokens, 512)
    examples = build_examples(files, 0.0, None, captions=True)
    prompts = ["Describe.", "What does this picture show, in a few words?"]
    dataset = FeatureDataset(files, examples.train, text, prompts, None, seed=3)
    items = dataset.__getitems__([0, 7, 150, 31])
    assert len({len(e["ids"]) for e in items}) > 1  # padding happens
    batch = collate(items, text.pad_id, padding_side)
    with torch.no_grad():
        loss, count = model(batch)
        expected, tokens = torch.zeros(()), 0
        for e in items:  # one unpadded sequence at a time, spliced by hand, HF's own loss
            embeds = llm.model.get_input_embeddings()(torch.tensor(e["ids"]))
            image = model.projector(torch.from_numpy(e["tokens"]).float())
            at, slots = e["image_at"], model.image_slots
            embeds = torch.cat([embeds[:at], model.image_begin[None], image,
                                model.image_end[None], embeds[at + slots :]])  # fmt: skip
            labels = torch.tensor(e["labels"])
            n = int((labels[1:] != IGNORE).sum())
            expected += llm.model(inputs_embeds=embeds[None], labels=labels[None]).loss * n
            tokens += n
    assert count == tokens
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)


def test_labels_cover_the_answer_and_eos_only(shape_features):
    files, llm = _tiny(shape_features)
    text = ConversationFormat(llm.tokenizer, files.tokens, 512)
    examples = build_examples(files, 0.0, None, captions=True)
    dataset = FeatureDataset(files, examples.train, text, ["Describe."], None, seed=0)
    for e in dataset.__getitems__([0, 1, 2]):
        trained = [t for t in e["labels"] if t != IGNORE]
        assert llm.tokenizer.decode(trained) == e["caption"] + "</s>"
        slots = e["labels"][e["image_at"] : e["image_at"] + files.tokens + 2]
        assert set(slots) == {IGNORE}
    batch = collate(dataset.__getitems__([0, 1]), text.pad_id, "left")
    assert (batch.labels[batch.attention_mask == 0] == IGNORE).all()
    first_real = batch.attention_mask.argmax(1)
    assert (batch.position_ids[torch.arange(2), first_real] == 0).all()


_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# Qwen's shape: a special end-of-turn token, then a newline that belongs to no answer.
_SPECIAL_END_TEMPLATE = _TEMPLATE.replace("<|end|>", "<|end|>\n")


@pytest.mark.parametrize("template", [None, _TEMPLATE, _SPECIAL_END_TEMPLATE])
def test_multi_turn_masks_cover_exactly_the_assistant_turns(template):
    llm = load_llm("tiny-random-llama", "cpu", torch.float32)
    llm.tokenizer.chat_template = template
    if template == _SPECIAL_END_TEMPLATE:
        llm.tokenizer.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    text = ConversationFormat(llm.tokenizer, 4, 512)
    turns = [("<image>\nWhat colour?", "Red."), ("And the shape?", "A circle, <image>small.")]
    encoded = text.encode(turns)
    spans, current = [], []
    for token, label in zip(encoded.ids, encoded.labels, strict=True):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    spans += [current] if current else []

    def ids(text: str) -> list[int]:  # compared as ids: decoders space special tokens apart
        return llm.tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = [llm.tokenizer.eos_token_id]
    expected = [
        ids(a + "<|end|>") if template else ids(a) + eos for a in ("Red.", "A circle, small.")
    ]
    assert spans == expected
    decoded = llm.tokenizer.decode([i for i in encoded.ids if i != text.pad_id])
    assert decoded.count("What colour?") == 1 and "<image>" not in decoded
    assert encoded.ids[encoded.image_at : encoded.image_at + 6] == [text.pad_id] * 6


def test_split_is_a_function_of_the_key():
    keys = np.array([f"{i:09d}".encode() for i in range(20000)], dtype=object)
    fractions = split_fraction(keys)
    assert 0.08 < (fractions < 0.1).mean() < 0.12
    again = split_fraction(np.array(keys[::-1], dtype="S12"))[::-1]  # other order, other width
    np.testing.assert_array_equal(fractions, again)


# --- learning -----------------------------------------------------------------------------


def _shuffled_copy(features: Path, out: Path) -> Path:
    """The same features with the token rows permuted across examples."""
    shutil.copytree(features, out)
    files = sorted(out.glob("*.h5"))
    tokens = [h5py.File(f, "r")["tokens"][:] for f in files]
    everything = np.concatenate(tokens)[np.random.default_rng(0).permutation(240)]
    start = 0
    for path, part in zip(files, tokens, strict=True):
        with h5py.File(path, "r+") as f:
            f["tokens"][:] = everything[start : start + len(part)]
        start += len(part)
    return out


def test_true_features_beat_shuffled_features(shape_features, tmp_path):
    options = dict(train_llm="full", lr=3e-3, llm_lr=3e-3, max_steps=150, batch_size=16,
                   val_fraction=0.2, eval_every=150, prompts=("Describe.",))  # fmt: skip
    true = _train(shape_features, tmp_path / "true", **options)
    shuffled = _train(_shuffled_copy(shape_features, tmp_path / "s"), tmp_path / "shuf", **options)
    assert true.val_loss is not None and shuffled.val_loss is not None
    # Without the image, colour and shape are a guess: at least one in 4 and one in 3.
    assert true.val_loss < 0.5 * shuffled.val_loss, (true.val_loss, shuffled.val_loss)


# --- checkpoints and resume ---------------------------------------------------------------


def _interrupt_at(monkeypatch, step: int, how: str) -> None:
    """Ctrl-C (a real SIGINT) or a crash after optimizer step ``step``."""
    original = trainer_module.Trainer.optimizer_step

    def step_then_stop(self, batches):
        result = original(self, batches)
        if self.position.step == step - 1:  # the step about to be counted
            if how == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise RuntimeError("simulated crash")
        return result

    monkeypatch.setattr(trainer_module.Trainer, "optimizer_step", step_then_stop)


@pytest.mark.parametrize(("train_llm", "how"), [("none", "sigint"), ("lora", "crash"),
                                                ("full", "sigint")])  # fmt: skip
def test_resume_continues_exactly(shape_features, tmp_path, monkeypatch, train_llm, how):
    options = dict(max_steps=8, save_every=4, train_llm=train_llm, eval_every=4, lr=5e-3)
    straight = _train(shape_features, tmp_path / "straight", **options)
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 6, how)
        if how == "crash":
            with pytest.raises(RuntimeError):
                _train(shape_features, tmp_path / "cut", **options)
        else:
            stopped = _train(shape_features, tmp_path / "cut", **options)
            assert stopped.interrupted and stopped.step == 6
    assert latest_checkpoint(tmp_path / "cut").name == ("step-00000006" if how == "sigint"
                                                        else "step-00000004")  # fmt: skip
    resumed = _train(shape_features, tmp_path / "cut", resume=True, **options)
    assert resumed.step == 8 and not resumed.interrupted
    a = load_file(tmp_path / "straight/checkpoints/step-00000008/projector.safetensors")
    b = load_file(tmp_path / "cut/checkpoints/step-00000008/projector.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert resumed.train_loss == pytest.approx(straight.train_loss, rel=1e-5)
    assert resumed.val_loss == pytest.approx(straight.val_loss, rel=1e-5)
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut/metrics.jsonl").open()]
    assert steps == list(range(1, 9))  # each step logged once


@pytest.mark.parametrize(
    ("projector", "train_llm"),
    [("linear", "none"), ("mlp2x_gelu", "none"), ("swiglu", "none"), ("resampler", "none"),
     ("mlp2x_gelu", "lora"), ("mlp2x_gelu", "full")],
)  # fmt: skip
def test_every_projector_and_llm_mode_trains_saves_and_loads(
    shape_features, tmp_path, projector, train_llm
):
    run = tmp_path / "run"
    summary = _train(shape_features, run, projector=projector, queries=16,
                     train_llm=train_llm, max_steps=3, eval_every=3)  # fmt: skip
    assert summary.step == 3 and summary.val_loss is not None
    loaded = load_trained(run, None, "cpu", torch.float32)
    files = open_feature_files([shape_features])
    examples = build_examples(files, 0.1, None, captions=True)
    dataset = FeatureDataset(files, examples.val[:8], loaded.text, ["Describe."], None, seed=0)
    batch = collate(dataset.__getitems__(list(range(8))), loaded.text.pad_id)
    with torch.no_grad():
        loss, count = loaded.model(batch)
    assert torch.isfinite(loss) and count > 0
    expected = 16 if projector == "resampler" else files.tokens
    assert loaded.model.image_slots == expected + 2
    config = json.loads((run / "config.json").read_text())
    assert config["features"]["attrs"]["model"] == "tiny-random-clip"
    assert config["projector"]["kind"] == projector and config["train_llm"] == train_llm
    assert (run / "loss.png").stat().st_size > 1000


def test_frozen_llm_gets_no_gradient_and_no_optimizer_state(shape_features, tmp_path):
    run = tmp_path / "run"
    _train(shape_features, run, max_steps=2)
    state = torch.load(latest_checkpoint(run) / "trainer_state.pt", weights_only=True)
    parameters = sum(len(group["params"]) for group in state["optimizer"]["param_groups"])
    assert parameters == 4 + 2  # two linear layers (weight, bias) + image begin/end
    assert not (latest_checkpoint(run) / "llm").exists()


def test_init_starts_from_an_earlier_run(shape_features, tmp_path):
    first = tmp_path / "first"
    _train(shape_features, first, max_steps=4, train_llm="lora")
    second = tmp_path / "second"
    _train(shape_features, second, max_steps=1, init=str(first), lr=1e-12, llm_lr=1e-12,
           train_llm="lora", warmup=0)  # fmt: skip
    a = load_file(latest_checkpoint(first) / "projector.safetensors")
    b = load_file(latest_checkpoint(second) / "projector.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name])
    # The second run's LLM is the first one's (LoRA merged) plus a fresh LoRA: same outputs.
    one = load_trained(first, None, "cpu", torch.float32)
    two = load_trained(second, None, "cpu", torch.float32)
    files = open_feature_files([shape_features])
    examples = build_examples(files, 0.0, None, captions=True)
    dataset = FeatureDataset(files, examples.train[:4], one.text, ["Describe."], None, seed=0)
    batch = collate(dataset.__getitems__([0, 1, 2, 3]), one.text.pad_id)
    with torch.no_grad():
        torch.testing.assert_close(one.model(batch)[0], two.model(batch)[0], rtol=1e-4, atol=1e-3)


# --- conversation data --------------------------------------------------------------------


def test_conversations_join_by_key_and_file_name_and_count_the_rest(shape_features, tmp_path):
    rows = [
        {"image": "000000005", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"},
            {"from": "gpt", "value": "It is a colour."}]},
        {"image": "images/0007.jpg", "conversations": [
            {"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A shape."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"image": "nowhere.jpg", "conversations": [
            {"from": "human", "value": "Hm?"}, {"from": "gpt", "value": "No."}]},
    ]  # fmt: skip
    data = tmp_path / "llava.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = open_feature_files([shape_features])
    joined = Conversations(data).join(files)
    assert (joined.matched, joined.unmatched, joined.ambiguous) == (2, 1, 0)
    places = {int(c): (f, int(r)) for f, rc in joined.by_file.items() for r, c in rc}
    assert places == {0: (0, 5), 1: (0, 7)}
    summary = _train(shape_features, tmp_path / "run", data=str(data), captions=False,
                     val_fraction=0.0, batch_size=2, max_steps=2)  # fmt: skip
    assert (summary.examples, summary.unmatched) == (2, 1)
    assert "1 name no cached image" in summary.format()


# --- what the user sees and the mistakes refused --------------------------------------------


def test_cli_trains_and_reports(shape_features, tmp_path):
    run = tmp_path / "run"
    result = _cli(shape_features, "--llm", "tiny-random-llama", "--out", run, "--max-steps", 3,
                  "--batch-size", 8, "--workers", 1, "--eval-every", 2, "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "trained 3/3 steps" in result.output and "validation loss" in result.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s"} <= set(records[0])
    assert "val_loss" in records[1] and "val_loss" in records[2]
    again = _cli(shape_features, "--llm", "tiny-random-llama", "--out", run, "--max-steps", 3)
    assert again.exit_code == 2 and "pass --resume" in again.output
    changed = _cli(shape_features, "--llm", "tiny-random-llama", "--out", run, "--max-steps", 3,
                   "--batch-size", 4, "--resume")  # fmt: skip
    assert changed.exit_code == 2 and "--batch-size 4" in changed.output


def test_sequences_cut_at_max_length_are_counted(shape_features, tmp_path):
    summary = _train(shape_features, tmp_path / "run", max_length=110, max_steps=2)
    assert summary.truncated > 0
    assert "cut at --max-length" in summary.format()
    recorded = json.loads((tmp_path / "run/summary.json").read_text())
    assert recorded["truncated"] == summary.truncated


def _refused(result: object, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[0], lines[0]


def test_mistakes_are_one_line(shape_features, tmp_path):
    base = [shape_features, "--out", tmp_path / "r", "--max-steps", 1]
    _refused(_cli(*base, "--llm", "./no/such/dir"), "not a directory")
    _refused(_cli(*base, "--llm", "someone/not-cached-model"), "not in the local cache")
    tiny = [*base, "--llm", "tiny-random-llama"]
    _refused(_cli(*tiny, "--projector", "resampler", "--queries", "10"), "--queries 10")
    _refused(_cli(*tiny, "--projector", "conv"), "unknown --projector")
    _refused(_cli(*tiny, "--train-llm", "half"), "--train-llm")
    _refused(_cli(*tiny, "--batch-size", 1000), "cannot fill one batch")
    _refused(_cli(*tiny, "--max-length", 20), "--max-length 20")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"image": "x"}]')
    _refused(_cli(*tiny, "--data", bad), "row 1", "conversations")
    _refused(_cli(*tiny, "--prompts", tmp_path / "none.txt"), "--prompts")
    (tmp_path / "pictures").mkdir()
    _refused(_cli(tmp_path / "pictures", "--llm", "tiny-random-llama", "--out", tmp_path / "r2"),
             "not a vlmdata encode output")  # fmt: skip


def test_features_of_another_layer_are_refused(shape_features, tmp_path):
    write_shape_images(tmp_path / "images", 8, seed=1)
    encode_folder(tmp_path / "images", tmp_path / "f", layer=0)
    result = _cli(shape_features, tmp_path / "f", "--llm", "tiny-random-llama", "--out",
                  tmp_path / "r", "--max-steps", 1)  # fmt: skip
    _refused(result, "layer=", "one model, layer and grid")


def _saved_llm(folder: Path, **config: object) -> Path:
    """tiny-random-llama saved as a local model directory, its config changed by ``config``."""
    llm = load_llm("tiny-random-llama", "cpu", torch.float32)
    for name, value in config.items():
        setattr(llm.model.config, name, value)
    llm.model.save_pretrained(folder)
    llm.tokenizer.save_pretrained(folder)
    return folder


def test_a_local_model_directory_trains(shape_features, tmp_path):
    llm = _saved_llm(tmp_path / "llm")
    summary = run_train(TrainConfig(features=(str(shape_features),), out=str(tmp_path / "run"),
                                    **{**FAST, "llm": str(llm)}, max_steps=1))  # fmt: skip
    assert summary.step == 1
    assert json.loads((tmp_path / "run/config.json").read_text())["llm"] == str(llm)


def test_models_that_cap_their_logits_are_refused(shape_features, tmp_path):
    llm = _saved_llm(tmp_path / "gemma-like", final_logit_softcapping=30.0)
    result = _cli(shape_features, "--llm", llm, "--out", tmp_path / "r", "--max-steps", 1)
    _refused(result, "caps its logits")


def test_sigterm_to_the_whole_process_group_saves_with_dataloader_workers(
    shape_features, tmp_path, monkeypatch
):
    """`kill -TERM -PGID` (a scheduler, a container stop) reaches the DataLoader workers too:
    they died of it, and the run ended as an internal error without saving."""
    import multiprocessing

    original = trainer_module.Trainer.optimizer_step

    def step_then_terminate(self, batches):
        result = original(self, batches)
        if self.position.step == 2:  # the third step: as a process group, workers first
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(trainer_module.Trainer, "optimizer_step", step_then_terminate)
    stopped = _train(shape_features, tmp_path / "run", max_steps=8, save_every=100, workers=1)
    assert stopped.interrupted and stopped.step == 3
    assert latest_checkpoint(tmp_path / "run").name == "step-00000003"
