"""DDP: `vlmdata train` in two gloo CPU processes trains exactly as one process with twice the
batch (same weights, losses and validation loss), and the run directory is written once.

The two ranks are launched as torchrun launches them (its environment, the agent's store), but
by the test: torchrun's rendezvous store listens on every interface, and this one is a
``TCPStore`` on a socket bound to 127.0.0.1; gloo's own sockets stay on loopback through
``GLOO_SOCKET_IFNAME``. A rank that fails ends the other, as torchrun's agent would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vlmdata.cli import app

runner = CliRunner(env={"COLUMNS": "200"})
_TIMEOUT_S = 180  # both ranks, start to exit; a hung collective fails the test instead


def _train_args(features: Path, out: Path, batch_size: int) -> list[str]:
    # Two optimizer steps of two micro-batches each (no_sync, then the all-reduce), a
    # checkpoint after the first (the barrier and rank 0's save mid-run) and validation twice.
    return ["train", str(features), "--llm", "tiny-random-llama", "--out", str(out),
            "--batch-size", str(batch_size), "--grad-accum", "2", "--max-steps", "4",
            "--val-fraction", "0.1", "--eval-every", "2", "--save-every", "2", "--lr", "1e-2",
            "--warmup", "1", "--workers", "0", "--device", "cpu", "--seed", "3",
            "--quiet"]  # fmt: skip


@contextmanager
def torchrun(args: list[str], world: int, cwd: Path) -> Iterator[list[subprocess.Popen]]:
    """``python -m vlmdata ARGS`` in ``world`` processes with torchrun's environment and its
    rendezvous store, on 127.0.0.1 only; rank R's output goes to ``cwd/rankR.log``. Ranks still
    running at the end are killed."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    store = torch.distributed.TCPStore("127.0.0.1", port, None, True, timedelta(seconds=60),
                                       wait_for_workers=False,
                                       master_listen_fd=listener.detach())  # fmt: skip
    env = {**os.environ, "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
           "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "TORCHELASTIC_USE_AGENT_STORE": "True", "GLOO_SOCKET_IFNAME": "lo",
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    ranks = []
    try:
        for rank in range(world):
            with open(cwd / f"rank{rank}.log", "w") as log:
                ranks.append(subprocess.Popen(
                    [sys.executable, "-m", "vlmdata", *args], cwd=cwd, stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                ))  # fmt: skip
        yield ranks
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
            p.wait()
        del store  # closes the listening socket


def wait_all(ranks: list[subprocess.Popen], timeout_s: float = _TIMEOUT_S) -> list[int | None]:
    """The ranks' exit codes once all have exited, or as soon as one fails (None: running)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(p.poll() is None for p in ranks):
        if any(p.returncode not in (None, 0) for p in ranks):
            time.sleep(5)  # the others' own exit, if they make one
            break
        time.sleep(0.1)
    return [p.poll() for p in ranks]


def _logs(folder: Path, world: int) -> str:
    return "\n".join(f"rank {r}:\n{(folder / f'rank{r}.log').read_text()[-3000:]}"
                     for r in range(world))  # fmt: skip


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in _lines(run / "metrics.jsonl")]


def _checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


@pytest.mark.filterwarnings("ignore:tiny-random")
def test_two_gloo_processes_train_as_one_with_twice_the_batch(
    shape_features: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    one = runner.invoke(app, _train_args(shape_features, tmp_path / "one", batch_size=4))
    assert one.exit_code == 0, one.output
    two = _train_args(shape_features, tmp_path / "two", batch_size=2)
    with torchrun(two, 2, tmp_path) as ranks:
        assert wait_all(ranks) == [0, 0], _logs(tmp_path, 2)
    assert "trained 4/4 steps" in (tmp_path / "rank0.log").read_text()

    single, ddp = tmp_path / "one", tmp_path / "two"
    for step in (2, 4):  # the mid-run checkpoint and the last one
        a = load_file(_checkpoint(single, step) / "projector.safetensors")
        b = load_file(_checkpoint(ddp, step) / "projector.safetensors")
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    # lr 1e-2: the weights moved well beyond the tolerance, so the match is not trivial.
    first = load_file(_checkpoint(single, 2) / "projector.safetensors")
    last = load_file(_checkpoint(single, 4) / "projector.safetensors")
    assert max((last[k] - first[k]).abs().max().item() for k in last) > 1e-3

    a, b = _metrics(single), _metrics(ddp)
    assert [r["step"] for r in b] == [1, 2, 3, 4]  # rank 0 alone writes the metrics
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
        assert y["lr"] == pytest.approx(x["lr"])
        assert ("val_loss" in y) == ("val_loss" in x)
        if "val_loss" in x:  # the held-out examples dealt to two ranks, summed back
            assert y["val_loss"] == pytest.approx(x["val_loss"], rel=1e-5)

    state = torch.load(_checkpoint(ddp, 4) / "trainer_state.pt", weights_only=True)
    assert len(state["rng"]) == 2  # each rank's RNG, gathered by rank 0
    assert (
        state["position"]
        == torch.load(_checkpoint(single, 4) / "trainer_state.pt", weights_only=True)["position"]
    )
    assert json.loads((ddp / "config.json").read_text())["world_size"] == 2
    assert not list((ddp / "checkpoints").glob(".*tmp"))  # no save left half-written
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["val_loss"] == pytest.approx(
        json.loads((single / "summary.json").read_text())["val_loss"], rel=1e-5
    )


@pytest.mark.filterwarnings("ignore:tiny-random")
def test_ctrl_c_on_one_rank_stops_every_rank_at_the_same_step(
    shape_features: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    args = _train_args(shape_features, run, batch_size=2)
    args[args.index("--max-steps") + 1] = "1000000"  # stopped long before
    with torchrun(args, 2, tmp_path) as ranks:
        deadline = time.monotonic() + _TIMEOUT_S
        while len(_lines(run / "metrics.jsonl")) < 2 and time.monotonic() < deadline:
            assert all(p.poll() is None for p in ranks), _logs(tmp_path, 2)
            time.sleep(0.1)
        ranks[0].send_signal(signal.SIGINT)  # rank 1 never sees it: the ranks must agree
        # 130: stopped by Ctrl-C after saving; None: a rank waits on the other for ever.
        assert wait_all(ranks, timeout_s=60) == [130, 130], _logs(tmp_path, 2)
    steps = len(_lines(run / "metrics.jsonl"))
    assert "rerun the same command with --resume" in (tmp_path / "rank0.log").read_text()
    state = torch.load(_checkpoint(run, steps) / "trainer_state.pt", weights_only=True)
    assert state["position"]["step"] == steps
    assert len(state["rng"]) == 2
    assert json.loads((run / "summary.json").read_text())["interrupted"] is True


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []
