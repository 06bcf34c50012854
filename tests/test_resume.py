"""A killed run resumed from its last checkpoint ends with exactly the uninterrupted run's metrics."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mmpeft.cli.main import main
from mmpeft.run_config import load_run_config
from mmpeft.train import Trainer
from mmpeft.train.checkpointing import STATE_NAME, checkpoint_folders, latest_checkpoint


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# dropout in the method and the head: the resumed run must restore the RNG to draw the same masks
OVERRIDES = [
    "model.methods=[{name: lora, r: 4, dropout: 0.2}]",
    "model.head.dropout=0.1",
    "train.epochs=3",
    "train.checkpoint_every_steps=4",
    "train.tensorboard=false",
    "train.progress=false",
]


class Killed(Exception):
    pass


def kill_at(step: int):
    def callback(trainer, event, state):
        if event == "step" and state.step == step:
            raise Killed

    return callback


def comparable(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("val", "test", "history", "steps", "epochs", "best_epoch")}


def test_resume_mid_epoch_matches_the_uninterrupted_run(tmp_path):
    config = load_run_config("toy", OVERRIDES)
    full = Trainer(config, str(tmp_path / "full")).fit()
    out = str(tmp_path / "killed")
    with pytest.raises(Killed):  # 6 steps per epoch: killed at step 10, the last checkpoint is step 8
        Trainer(config, out, callbacks=[kill_at(10)]).fit()
    assert not os.path.exists(os.path.join(out, "metrics.json"))
    state = torch.load(
        os.path.join(latest_checkpoint(os.path.join(out, "checkpoints")), STATE_NAME), weights_only=True
    )
    assert (state["loop"]["step"], state["loop"]["epoch"], state["loop"]["batch"]) == (8, 1, 2)
    resumed = Trainer(config, out, resume=True).fit()
    assert comparable(resumed) == comparable(full)
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["test"] == full["test"]


def test_resume_after_an_epoch_end_checkpoint_matches(tmp_path):
    config = load_run_config("toy", [*OVERRIDES, "train.checkpoint_every_steps=0"])
    full = Trainer(config, str(tmp_path / "full")).fit()
    out = str(tmp_path / "killed")
    with pytest.raises(Killed):  # the epoch-0 checkpoint holds the evaluated epoch and the best adapter
        Trainer(config, out, callbacks=[kill_at(9)]).fit()
    resumed = Trainer(config, out, resume=True).fit()
    assert comparable(resumed) == comparable(full)


def test_cli_resume_after_stop_after_steps(tmp_path, capsys):
    common = ["train", "--config", "toy", *OVERRIDES]
    assert main([*common, "--output", str(tmp_path / "full")]) == 0
    out = str(tmp_path / "stopped")
    assert main([*common, "train.stop_after_steps=7", "--output", out]) == 3
    assert "stopped after 7 steps" in capsys.readouterr().err
    assert main(["train", "--output", out, "--resume"]) == 0  # the config comes from out/config.yaml
    with open(tmp_path / "full" / "metrics.json") as f, open(os.path.join(out, "metrics.json")) as g:
        assert comparable(json.load(g)) == comparable(json.load(f))


def test_resume_refuses_a_different_config(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--config", "toy", *OVERRIDES, "train.stop_after_steps=2", "--output", out]) == 3
    assert main(["train", "--config", "toy", *OVERRIDES, "train.lr=0.5", "--output", out, "--resume"]) == 2
    assert "config differs" in capsys.readouterr().err


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    config = load_run_config(
        "toy", [*OVERRIDES, "train.checkpoint_every_steps=2", "train.keep_checkpoints=2"]
    )
    out = tmp_path / "run"
    Trainer(config, str(out)).fit()
    root = out / "checkpoints"
    folders = checkpoint_folders(str(root))
    assert len(folders) == 2 and not [p for p in os.listdir(root) if p.startswith(".tmp")]
    # a half-written checkpoint (no trainer state: the rename never happened) is never picked
    (root / "ckpt-999999").mkdir()
    (root / ".tmp-ckpt-x").mkdir()
    assert latest_checkpoint(str(root)) == folders[-1][1]
