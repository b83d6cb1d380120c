"""Model loading and patch features: bad weights files, towers without patch tokens, the hub
reachability probe (only ever against loopback), and the scoped forward hook."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from aiohttp import web

from conftest import LoopbackServer
from vlmdata.encode.features import PatchFeatures
from vlmdata.encode.models import load_clip
from vlmdata.errors import UserError

pytestmark = pytest.mark.filterwarnings(
    "ignore:tiny-random-clip has random weights", "ignore:unrecognised weights file"
)
TINY = "tiny-random-clip"


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """A valid tiny-random-clip checkpoint whose weights differ from the seeded random ones."""
    clip = load_clip(TINY, "none", "cpu", "fp32")
    with torch.no_grad():
        for parameter in clip.model.parameters():
            parameter.add_(0.05)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(clip.model.state_dict(), path)
    return path


def one_line_user_error(name: str, pretrained: str) -> str:
    """The message of the UserError ``load_clip`` raises; it must be a single line."""
    with pytest.raises(UserError) as caught:
        load_clip(name, pretrained, "cpu", "fp32")
    message = str(caught.value)
    assert "\n" not in message, message
    return message


# --- 1. a weights file that is not a checkpoint (of this model) ------------------------------


def _garbage(path: Path, tiny: Path) -> None:
    path.write_bytes(b"this is not a checkpoint at all\x00\x01" * 20)


def _random_bytes(path: Path, tiny: Path) -> None:
    path.write_bytes(os.urandom(4096))


def _empty(path: Path, tiny: Path) -> None:
    path.write_bytes(b"")


def _truncated(path: Path, tiny: Path) -> None:
    data = tiny.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _a_list(path: Path, tiny: Path) -> None:
    torch.save([1, 2, 3], path)


def _unrelated_tensors(path: Path, tiny: Path) -> None:
    torch.save({"weight": torch.zeros(3)}, path)


def _empty_dict(path: Path, tiny: Path) -> None:
    torch.save({}, path)


@pytest.mark.parametrize(
    ("filename", "write", "reason"),
    [
        ("garbage.pt", _garbage, "is not a weights file"),
        ("random.safetensors", _random_bytes, "is not a weights file"),
        ("random.bin", _random_bytes, "is not a weights file"),
        ("empty.pt", _empty, "is not a weights file"),
        ("empty.safetensors", _empty, "is not a weights file"),
        ("truncated.pt", _truncated, "is not a weights file"),
        ("list.pt", _a_list, "is not a weights file"),
        ("empty-dict.pt", _empty_dict, "is not a weights file"),
        ("unrelated.pt", _unrelated_tensors, "does not hold tiny-random-clip weights"),
    ],
)
def test_a_file_that_is_no_checkpoint_is_one_line(tmp_path, tiny_weights, filename, write, reason):
    path = tmp_path / filename
    write(path, tiny_weights)
    message = one_line_user_error(TINY, str(path))
    assert reason in message and str(path) in message, message


def test_weights_of_another_model_are_one_line(tiny_weights):
    message = one_line_user_error("ViT-B-32", str(tiny_weights))
    assert "does not hold ViT-B-32 weights" in message, message
    assert "--model" in message  # the fix: name the architecture the file was saved from


def test_a_valid_weights_file_still_loads(tiny_weights):
    clip = load_clip(TINY, str(tiny_weights), "cpu", "fp32")
    saved = torch.load(tiny_weights, weights_only=True)
    for name, value in clip.model.state_dict().items():
        torch.testing.assert_close(value, saved[name], msg=name)
    assert clip.pretrained == str(tiny_weights) and len(clip.weights_sha256) == 64


def test_a_torchscript_archive_loads(tmp_path, tiny_weights):
    """OpenAI's own files (ViT-L-14-336px.pt) are TorchScript archives, which open_clip's
    weights-only loader refuses."""
    model = load_clip(TINY, str(tiny_weights), "cpu", "fp32").model
    path = tmp_path / "tiny-jit.pt"
    torch.jit.save(torch.jit.script(model), path)
    loaded = load_clip(TINY, str(path), "cpu", "fp32").model
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[name], msg=name)


# --- 2. vision towers without patch tokens -------------------------------------------------


@pytest.mark.parametrize(
    ("name", "pretrained", "kind"),
    [
        ("RN50", "none", "ResNet"),
        ("RN50", "openai", "ResNet"),  # refused before looking for the weights
        ("convnext_base", "none", "timm"),
        ("ViT-B-16-SigLIP", "none", "timm"),
    ],
)
def test_a_tower_without_patch_tokens_is_refused_before_building(
    monkeypatch, name, pretrained, kind
):
    import open_clip

    def must_not_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built before the tower was checked")

    monkeypatch.setattr(open_clip, "create_model", must_not_build)
    message = one_line_user_error(name, pretrained)
    assert name in message and kind in message and "ViT-L-14-336" in message, message


def test_resnet_tower_is_refused_without_the_guard():
    """The same refusal end to end, nothing patched: no AttributeError from a built RN50."""
    message = one_line_user_error("RN50", "none")
    assert "patch tokens only from open_clip's own ViT towers" in message, message


# --- 3. the hub reachability probe ---------------------------------------------------------


PROBE = (
    "import warnings; warnings.simplefilter('ignore');"
    "from vlmdata.encode.models import hub_unreachable_reason as r; print(repr(r()))"
)


def probe(env_changes: dict[str, str | None], timeout: float = 60) -> str:
    """``hub_unreachable_reason()`` in a fresh process, so huggingface_hub reads this env."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1"
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


async def _mirror_root(request: web.Request) -> web.Response:
    return web.Response(text="a hub mirror")


async def _unavailable(request: web.Request) -> web.Response:
    return web.Response(status=503)


@pytest.fixture
def hub() -> LoopbackServer:
    """A loopback stand-in for a hub mirror: ``/`` answers, ``/down`` answers 503."""
    server = LoopbackServer()
    server.route("/", _mirror_root)
    server.route("/down", _unavailable)
    with server:
        yield server


def test_probe_goes_to_hf_endpoint(hub):
    assert probe({"HF_ENDPOINT": hub.url(""), "HF_HUB_OFFLINE": None}) == "None"
    assert hub.hits["/"] == 1  # the mirror was asked, not huggingface.co


def test_probe_respects_offline_mode(hub):
    reason = probe({"HF_ENDPOINT": hub.url(""), "HF_HUB_OFFLINE": "1"})
    assert "HF_HUB_OFFLINE" in reason
    assert hub.total_hits() == 0


def test_probe_of_a_closed_port_fails_fast():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    reason = probe({"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_OFFLINE": None})
    assert f"127.0.0.1:{port}" in reason


def test_a_hub_that_answers_5xx_is_unreachable(hub):
    reason = probe({"HF_ENDPOINT": hub.url("/down"), "HF_HUB_OFFLINE": None})
    assert "503" in reason and hub.hits["/down"] == 1


def test_uncached_tag_offline_is_one_line(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = one_line_user_error("ViT-B-32", "openai")
    assert "not in the local cache" in message and "HF_HUB_OFFLINE" in message, message


# --- 5. the forward hook is scoped to the call ---------------------------------------------


def test_patch_features_leave_no_hook_and_match_open_clip():
    clip = load_clip(TINY, "none", "cpu", "fp32")
    blocks = clip.model.visual.transformer.resblocks
    features = PatchFeatures(clip, layer=-2, side=4)
    assert all(not block._forward_hooks for block in blocks)  # building it hooks nothing
    size = clip.image_size
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens, embeds = features(images)
    assert all(not block._forward_hooks for block in blocks)
    with torch.no_grad():  # open_clip's own intermediate API, no hook involved
        result = clip.model.visual.forward_intermediates(images, indices=[clip.layers - 2])
        grid = result["image_intermediates"][0]
        expected_tokens = F.adaptive_avg_pool2d(grid, 4).flatten(2).transpose(1, 2)
        expected_embeds = F.normalize(clip.model.encode_image(images), dim=-1)
    torch.testing.assert_close(tokens, expected_tokens, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(embeds, expected_embeds, rtol=1e-4, atol=1e-5)


def test_patch_features_remove_the_hook_when_the_forward_fails():
    clip = load_clip(TINY, "none", "cpu", "fp32")
    features = PatchFeatures(clip, layer=0, side=4)
    with pytest.raises(RuntimeError):
        features(torch.zeros(1, 5, clip.image_size, clip.image_size))  # 5 channels: fails
    assert not clip.model.visual.transformer.resblocks[0]._forward_hooks


# --- 6. random weights without touching the caller's random state ---------------------------


def test_random_weights_are_seeded_without_touching_the_global_rng():
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = load_clip(TINY, "none", "cpu", "fp32")
    assert torch.equal(torch.get_rng_state(), state)  # the caller's draws go on as before
    torch.rand(1000)  # another state before the second load: its weights are the same
    second = load_clip(TINY, "none", "cpu", "fp32")
    weights, again = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(weights[name], again[name]) for name in weights)
