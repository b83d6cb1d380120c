"""`vlmdata caption` and `vlmdata eval` end to end on a small run: images made into tokens as
the features were, files and loopback URLs, bad images among good ones, the sampling rules,
the eval JSON and page, and the caption metrics' behaviour."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import TRAINED_RUN_VAL_FRACTION, LoopbackServer
from vlmdata.cli import app
from vlmdata.train.caption_metrics import METRICS, caption_scores, tokenize
from vlmdata.train.data import split_fraction

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights")
runner = CliRunner(env={"COLUMNS": "200"})


def images_of(features: Path) -> Path:
    return features.parent / "images"  # the folder conftest encoded


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


# --- caption ---------------------------------------------------------------------------------


def test_an_image_is_made_into_the_tokens_its_features_hold(trained_run, shape_features):
    from vlmdata.train.caption import ImageEncoder
    from vlmdata.train.checkpoints import read_run_config

    encoder = ImageEncoder(read_run_config(trained_run)["features"], "cpu", "fp32", None)
    files = sorted(images_of(shape_features).glob("*.jpg"))[:3]
    squares = [encoder.square(path.read_bytes())[0] for path in files]
    tokens = np.stack(encoder.tokens(squares))
    with h5py.File(shape_features / "00000.h5", "r") as f:
        cached = f["tokens"][:3]
    assert tokens.dtype == np.float16 and tokens.shape == cached.shape
    np.testing.assert_allclose(tokens.astype(np.float32), cached.astype(np.float32), atol=2e-3)


def test_caption_files_with_a_bad_image_among_them(trained_run, shape_features, tmp_path):
    good = sorted(images_of(shape_features).glob("*.jpg"))[:2]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    missing = tmp_path / "missing.jpg"
    out = tmp_path / "captions.json"
    result = invoke("caption", trained_run, good[0], broken, missing, good[1], "--json", out,
                    "--max-new-tokens", 8)  # fmt: skip
    assert result.exit_code == 1, result.output  # the bad ones reported, the others captioned
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{good[0]}: ") and lines[3].startswith(f"{good[1]}: ")
    assert lines[1].startswith(f"{broken}: error: ") and lines[2].startswith(f"{missing}: error: ")
    assert "2 of 4 images could not be captioned" in result.stdout
    record = json.loads(out.read_text())
    assert record["checkpoint"] == "step-00000006"
    assert record["prompt"] == "Describe the image concisely."  # the run's first prompt
    rows = record["images"]
    assert [r["image"] for r in rows] == [str(p) for p in (good[0], broken, missing, good[1])]
    assert [len(r["captions"]) for r in rows] == [1, 0, 0, 1]
    assert rows[1]["error"].startswith("not_an_image: ")
    assert rows[2]["error"] == "unreadable: No such file or directory"
    assert rows[0]["error"] is None and rows[3]["error"] is None


def test_caption_of_urls_from_a_loopback_server(trained_run, shape_features, tmp_path):
    image = sorted(images_of(shape_features).glob("*.jpg"))[0]
    with LoopbackServer() as server:
        url = server.add_file("shape.jpg", image.read_bytes())
        gone = server.url("/img/gone.jpg")
        allowed = invoke("caption", trained_run, url, gone, image, "--allow-private-network",
                         "--json", tmp_path / "c.json", "--max-new-tokens", 8)  # fmt: skip
        refused = invoke("caption", trained_run, url, "--max-new-tokens", 8)
    assert allowed.exit_code == 1, allowed.output
    rows = json.loads((tmp_path / "c.json").read_text())["images"]
    assert rows[0]["error"] is None and rows[1]["error"].startswith("http_4xx")
    # The same picture by URL and from its file: the same tokens, the same greedy caption.
    assert rows[0]["captions"] == rows[2]["captions"]
    assert refused.exit_code == 1  # the SSRF guard: loopback is refused without the flag
    assert refused.stdout.startswith(f"{url}: error: private_address")
    assert server.hits["/img/shape.jpg"] == 1


def test_greedy_gives_one_caption_and_sampling_several(trained_run, shape_features, tmp_path):
    image = sorted(images_of(shape_features).glob("*.jpg"))[0]
    greedy_many = invoke("caption", trained_run, image, "--num", 2)
    assert greedy_many.exit_code == 2
    assert "--temperature" in greedy_many.output and len(greedy_many.output.splitlines()) == 1
    for flags in (["--temperature", -1], ["--top-p", 0], ["--top-p", 1.5], ["--num", 0]):
        assert invoke("caption", trained_run, image, *flags).exit_code == 2, flags

    def sample(seed: int) -> list[list[str]]:
        out = tmp_path / f"{seed}.json"
        result = invoke("caption", trained_run, image, image, "--num", 3, "--temperature", 1.5,
                        "--top-p", 0.95, "--seed", seed, "--max-new-tokens", 6,
                        "--json", out)  # fmt: skip
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines()[2].startswith(f"{image} [3]: ")
        return [row["captions"] for row in json.loads(out.read_text())["images"]]

    first = sample(1)
    assert [len(c) for c in first] == [3, 3]
    assert sample(1) == first  # reproducible from the seed


def test_printed_captions_cannot_drive_the_terminal():
    from vlmdata.train.caption import ImageCaptions

    lines = ImageCaptions("a.jpg", ["red\x1b[2J\nblue"]).lines()
    assert lines == ["a.jpg: red\\x1b[2J\\nblue"]


# --- eval ------------------------------------------------------------------------------------


def test_eval_writes_the_metrics_of_held_out_captions(trained_run, shape_features, tmp_path):
    result = invoke("eval", trained_run, shape_features, "--samples", 5, "--max-new-tokens", 8,
                    "--out", tmp_path / "eval", "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "eval" / "eval.json").read_text())
    metrics = record["metrics"]
    assert {"val_loss", "perplexity", *METRICS} <= set(metrics)
    assert all(np.isfinite(metrics[name]) for name in ("val_loss", "perplexity", *METRICS))
    # The held-out examples and prompts the trainer validated on: the loss it logged.
    logged = json.loads((trained_run / "summary.json").read_text())["val_loss"]
    assert metrics["val_loss"] == pytest.approx(logged, rel=1e-4)
    assert metrics["perplexity"] == pytest.approx(np.exp(metrics["val_loss"]))
    captions = record["captions"]
    assert record["samples"] == len(captions) == 5 and record["held_out"] > 5
    keys = np.array([c["key"] for c in captions], dtype="S")
    assert (split_fraction(keys) < TRAINED_RUN_VAL_FRACTION).all()  # held-out keys only
    assert all(c["reference"].startswith("a ") for c in captions)
    assert "CIDEr-D" in result.stdout and "validation loss" in result.stdout
    assert not (tmp_path / "eval" / "index.html").exists()


def eval_page(trained_run: Path, features: Path, images: Path, out: Path) -> tuple[str, list]:
    result = invoke("eval", trained_run, features, "--samples", 4, "--max-new-tokens", 4,
                    "--images", images, "--quiet", *(["--out", out] if out else []))  # fmt: skip
    assert result.exit_code == 0, result.output
    out = out or trained_run / "eval" / "step-00000006"  # the default: by checkpoint, in the run
    captions = json.loads((out / "eval.json").read_text())["captions"]
    assert len(list((out / "thumbs").glob("*.jpg"))) == 4
    return (out / "index.html").read_text(), captions


def test_eval_with_images_writes_a_page_beside_the_json(trained_run, shape_features, tmp_path):
    from vlmdata.pipeline.imageops import SquareOptions
    from vlmdata.pipeline.preprocess import PreprocessConfig, run_preprocess

    folder = images_of(shape_features)  # the image folder the features were encoded from
    page, captions = eval_page(trained_run, shape_features, folder, None)
    assert page.count("<img ") == 4 and 'class="missing"' not in page
    for caption in captions:
        assert f"<p>{caption['reference']}</p>" in page

    shards = tmp_path / "shards"  # the same images as preprocess shards: keys and shard names
    run_preprocess(PreprocessConfig(str(folder), str(shards), SquareOptions(size=64),
                                    shard_size=100, processes=1, quiet=True))  # fmt: skip
    page, _ = eval_page(trained_run, shape_features, shards, tmp_path / "from-shards")
    assert page.count("<img ") == 4 and 'class="missing"' not in page

    other = tmp_path / "other"
    other.mkdir()
    for path in sorted(folder.glob("*.jpg"))[:3]:
        (other / path.name).write_bytes(path.read_bytes())
    wrong = invoke("eval", trained_run, shape_features, "--images", other, "--samples", 1)
    assert wrong.exit_code == 2 and "pass the folder the features were made from" in wrong.output


def test_eval_refuses_a_run_without_held_out_examples(shape_features, tmp_path):
    from vlmdata.train.trainer import TrainConfig, run_train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_train(TrainConfig(features=(str(shape_features),), llm="tiny-random-llama",
                              out=str(tmp_path / "run"), max_steps=1, batch_size=4, workers=0,
                              val_fraction=0.0, quiet=True))  # fmt: skip
    result = invoke("eval", tmp_path / "run", shape_features)
    assert result.exit_code == 2 and "--val-fraction" in result.output


# --- caption metrics -------------------------------------------------------------------------

REFERENCES = [
    "a red circle on a white background",
    "two dogs playing with a ball in the park",
    "a blue square next to a green triangle",
    "an old man reading a newspaper on a bench",
]


def test_references_against_themselves_score_perfectly():
    scores = caption_scores(REFERENCES, REFERENCES)
    assert all(scores[f"bleu_{n}"] == pytest.approx(100) for n in (1, 2, 3, 4))
    assert scores["cider_d"] == pytest.approx(1000)  # 10 per image, x100
    # Case and punctuation are not what captions are scored on.
    shouted = [r.upper() + "!" for r in REFERENCES]
    assert caption_scores(REFERENCES, shouted) == scores


def test_worse_captions_score_lower():
    perfect = caption_scores(REFERENCES, REFERENCES)
    one_word_off = caption_scores(REFERENCES, [r.replace("a ", "the ", 1) for r in REFERENCES])
    shuffled = caption_scores(REFERENCES, REFERENCES[1:] + REFERENCES[:1])
    for name in METRICS:
        assert perfect[name] > one_word_off[name] > shuffled[name], name


def test_tokens_are_ptb_like():
    assert tokenize("A dog's ball, don't you think?") == "a dog 's ball do n't you think"
    assert tokenize("Black-and-white photo of 2 cats...") == "black-and-white photo of 2 cats"
