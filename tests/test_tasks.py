"""Tasks: losses on tiny inputs and metrics against values worked out by hand."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from cases import BACKBONES
from mmpeft.config import ConfigError
from mmpeft.data.base import DataError
from mmpeft.model import build_model
from mmpeft.registry import TASKS
from mmpeft.tasks.base import build_task


def out(logits) -> dict:
    return {"logits": torch.as_tensor(logits, dtype=torch.float32)}


def batch(targets, ids=None) -> dict:
    return {
        "targets": list(targets),
        "ids": ids if ids is not None else [f"ex{j}" for j in range(len(targets))],
    }


def run_meter(task, parts) -> dict:
    meter = task.meter()
    for outputs, b in parts:
        meter.update(outputs, b)
    return meter.compute()


def test_registry_has_the_tasks():
    assert set(TASKS.names()) >= {"classification", "multilabel", "regression", "retrieval", "vqa"}
    for _, cls in TASKS.items():
        assert cls.primary, f"task {cls.name} names no primary metric"


def test_unknown_task_option_is_a_config_error():
    with pytest.raises(ConfigError, match="label_smoothing"):
        build_task("classification", {"label_smothing": 0.1})


# --- classification ---------------------------------------------------------------------------
def test_classification_metrics_by_hand():
    task = build_task("classification")
    assert task.num_outputs({"num_classes": 3}) == 3
    # predictions [0, 1, 2, 1] against targets [0, 1, 1, 1], in two batches
    logits = np.eye(3)[[0, 1, 2, 1]] * 5.0
    m = run_meter(task, [(out(logits[:2]), batch([0, 1])), (out(logits[2:]), batch([1, 1]))])
    assert m["accuracy"] == pytest.approx(0.75)
    # per-class F1: class 0 -> 1, class 1 -> P 1, R 2/3 -> 0.8, class 2 -> 0
    assert m["macro_f1"] == pytest.approx((1 + 0.8 + 0) / 3)
    assert m["weighted_f1"] == pytest.approx((1 * 1 + 3 * 0.8) / 4)  # supports 1, 3, 0


def test_classification_loss_with_label_smoothing():
    plain = build_task("classification").loss(out([[0.0, 0, 0, 0]]), batch([2]))
    assert plain.item() == pytest.approx(math.log(4))
    smooth = build_task("classification", {"label_smoothing": 0.2}).loss(out([[2.0, 0.0]]), batch([0]))
    # target (0.9, 0.1): -(0.9 (2 - log(1+e^2)) + 0.1 (-log(1+e^2)))
    assert smooth.item() == pytest.approx(math.log(1 + math.e**2) - 1.8, rel=1e-6)


@pytest.mark.parametrize("bad", [None, 3, -1, 1.0, "cat"])
def test_classification_bad_target_names_the_example(bad):
    task = build_task("classification")
    with pytest.raises(DataError, match="'ex1'"):
        task.loss(out([[0.0, 1, 2], [1.0, 0, 0]]), batch([0, bad]))


# --- multilabel -------------------------------------------------------------------------------
def test_multilabel_metrics_by_hand():
    task = build_task("multilabel")
    assert task.num_outputs({"label_names": ["a", "b", "c"]}) == 3
    logits = [[2, -2, 0], [-1, 3, -3], [-1, -1, -1]]  # sigmoid(0) = 0.5 counts as predicted
    targets = [[1, 0, 0], [0, 1, 1], [1, 0, 0]]
    m = run_meter(task, [(out(logits), batch(targets))])
    # micro: tp 2, fp 1, fn 2 -> P 2/3, R 1/2; macro: label F1s 2/3, 1, 0
    assert m["micro_f1"] == pytest.approx(4 / 7)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_multilabel_loss_and_bad_target():
    task = build_task("multilabel")
    assert task.loss(out(np.zeros((2, 3))), batch([[1, 0, 1], [0, 0, 0]])).item() == pytest.approx(
        math.log(2)
    )
    with pytest.raises(DataError, match="multi-hot"):
        task.loss(out(np.zeros((1, 3))), batch([[1, 0]]))


# --- regression -------------------------------------------------------------------------------
PRED = [2.6, -0.4, 0.0, 1.5, -3.4, 0.2]
TRUE = [2.4, 0.0, -0.6, 0.5, -2.6, 0.0]


def test_regression_losses():
    pred, target = out([[1.0], [3.0]]), batch([2.0, 1.0])
    assert build_task("regression").loss(pred, target).item() == pytest.approx(1.5)
    assert build_task("regression", {"loss": "mse"}).loss(pred, target).item() == pytest.approx(2.5)


def test_regression_mae_and_pearson_by_hand():
    x, y = np.array(PRED), np.array(TRUE)
    m = run_meter(
        build_task("regression"), [(out(x[:4, None]), batch(y[:4])), (out(x[4:, None]), batch(y[4:]))]
    )
    assert m["mae"] == pytest.approx(3.2 / 6)
    dx, dy = x - x.mean(), y - y.mean()
    assert m["pearson"] == pytest.approx((dx * dy).sum() / math.sqrt((dx**2).sum() * (dy**2).sum()))
    assert "acc7" not in m


def test_sentiment_metrics_follow_mmsa():
    m = run_meter(
        build_task("regression", {"sentiment": True}), [(out(np.array(PRED)[:, None]), batch(TRUE))]
    )
    # has0: (>= 0) agrees on 4 of 6; a prediction of exactly 0 counts as non-negative
    assert m["acc2_has0"] == pytest.approx(4 / 6)
    # weighted F1: class True (support 4) P 3/4 R 3/4; class False (support 2) P 1/2 R 1/2
    assert m["f1_has0"] == pytest.approx((4 * 0.75 + 2 * 0.5) / 6)
    # non0: rows with target 0 dropped (1 and 5); the prediction 0.0 (row 2) is negative (> 0 is False)
    assert m["acc2_non0"] == pytest.approx(1.0)
    assert m["f1_non0"] == pytest.approx(1.0)
    # acc7: round(clip(., -3, 3)), halves to even: pred [3, 0, 0, 2, -3, 0] vs true [2, 0, -1, 0, -3, 0]
    assert m["acc7"] == pytest.approx(3 / 6)
    # acc5: round(clip(., -2, 2)): pred [2, 0, 0, 2, -2, 0] vs true [2, 0, -1, 0, -2, 0]
    assert m["acc5"] == pytest.approx(4 / 6)


def test_regression_rejects_missing_and_nonfinite_targets():
    task = build_task("regression")
    with pytest.raises(DataError, match="'ex0'"):
        task.loss(out([[1.0]]), batch([float("nan")]))
    with pytest.raises(DataError, match="no target"):
        task.loss(out([[1.0]]), batch([None]))
    with pytest.raises(ValueError, match="one target"):
        build_task("regression", {"sentiment": True}).num_outputs({"num_targets": 3})


# --- retrieval --------------------------------------------------------------------------------
A, B, C = [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]
IMAGES = [A, A, B, B, C]  # image A has two captions, B two, C one
TEXTS = [[1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [-1.0, 0.2], [1.0, -0.5]]
IDS = ["a", "a", "b", "b", "c"]


def retrieval_outputs(rows):
    return {
        "logits": {
            "image": torch.tensor([IMAGES[i] for i in rows]),
            "text": torch.tensor([TEXTS[i] for i in rows]),
            "logit_scale": torch.tensor(1.0),
        }
    }


def test_recall_at_k_with_duplicate_ids():
    task = build_task("retrieval", {"ks": [1, 2]})
    parts = [(retrieval_outputs([0, 1, 2]), {"ids": IDS[:3]}), (retrieval_outputs([3, 4]), {"ids": IDS[3:]})]
    m = run_meter(task, parts)
    # text -> image over the 3 distinct images: ranks of the positive 0, 1, 0, 1, 2
    assert m["text_to_image_r1"] == pytest.approx(2 / 5)
    assert m["text_to_image_r2"] == pytest.approx(4 / 5)
    # image -> text: A and B find a caption first (ties count as hits), C's caption ranks 4th
    assert m["image_to_text_r1"] == pytest.approx(2 / 3)
    assert m["image_to_text_r2"] == pytest.approx(2 / 3)
    recalls = [2 / 5, 4 / 5, 2 / 3, 2 / 3]
    assert m["mean_recall"] == pytest.approx(np.mean(recalls))
    assert m["rsum"] == pytest.approx(100 * sum(recalls))


def test_recall_without_gallery_dedupe_differs():
    task = build_task("retrieval", {"ks": [1, 2], "gallery_by_id": []})
    m = run_meter(task, [(retrieval_outputs(range(5)), {"ids": IDS})])
    # each image appears once per caption: text -> image ranks 0, 2, 0, 1, 4
    assert m["text_to_image_r2"] == pytest.approx(3 / 5)
    assert m["image_to_text_r1"] == pytest.approx(4 / 5)


def test_contrastive_loss_by_hand():
    task = build_task("retrieval")
    outputs = {"logits": {"image": torch.eye(2), "text": torch.eye(2), "logit_scale": torch.tensor(2.0)}}
    distinct = task.loss(outputs, {"ids": ["x", "y"]})
    assert distinct.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    # one item: both columns are positives, target (1/2, 1/2)
    same = task.loss(outputs, {"ids": ["x", "x"]})
    assert same.item() == pytest.approx(math.log(1 + math.e**2) - 1, rel=1e-6)


def test_retrieval_head_from_prepare_trains():
    model = build_model({"encoders": BACKBONES["pair"], "head": {"num_outputs": 0}})
    task = build_task("retrieval", {"embed_dim": 8})
    assert task.num_outputs({}) == 0
    task.prepare(model, {})
    g = torch.Generator().manual_seed(0)
    inputs = {"text": torch.randn(4, 5, 8, generator=g), "image": torch.randn(4, 7, 6, generator=g)}
    outputs = model(inputs)
    emb = outputs["logits"]
    for m in ("image", "text"):
        assert emb[m].shape == (4, 8)
        assert torch.allclose(emb[m].norm(dim=-1), torch.ones(4), atol=1e-5)
    assert emb["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    task.loss(outputs, {"ids": ["a", "b", "a", "c"]}).backward()
    head = model.peft["head"]
    assert head.logit_scale.grad is not None and head.proj["image"].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["late_fusion", "lmf", "tfn", "wander"])
def test_a_fusion_method_on_retrieval_is_refused_by_name(method):
    """Retrieval embeds each modality on its own: a fusion's parameters would never get a gradient."""
    model = build_model(
        {"encoders": BACKBONES["pair_equal"], "methods": [{"name": method}], "head": {"num_outputs": 0}}
    )
    with pytest.raises(
        ValueError, match=f"retrieval: method '{method}' fuses all modalities into one feature"
    ):
        build_task("retrieval", {"embed_dim": 8}).prepare(model, {})
    from mmpeft.methods.applicability import applicable_methods, check_applicable

    config = {"encoders": BACKBONES["pair_equal"], "methods": [{"name": method}], "head": {"num_outputs": 0}}
    reason = (
        "fuses all modalities into one feature, but retrieval embeds each modality on its own (two towers)"
    )
    assert applicable_methods(config, task="retrieval")[method] == reason  # what inspect says
    assert check_applicable(config, "retrieval") == [f"{method}: not applicable: {reason}"]
    assert applicable_methods(config, task="classification")[method] is None


def test_retrieval_config_errors():
    with pytest.raises(ValueError, match="two different"):
        build_task("retrieval", {"modalities": ["image"]})
    with pytest.raises(ValueError, match="gallery_by_id"):
        build_task("retrieval", {"gallery_by_id": ["audio"]})
    with pytest.raises(ValueError, match="prepare"):
        build_task("retrieval").loss(out(np.zeros((2, 2))), {"ids": ["a", "b"]})


# --- vqa --------------------------------------------------------------------------------------
def test_vqa_accuracy_by_hand():
    task = build_task("vqa")
    assert task.num_outputs({"answers": ["yes", "no", "2"]}) == 3
    targets = [
        [0, 0, 0, 1, 1, 2, 0, 0, 0, 0],  # answer 1 given by 2 annotators -> 2/3
        {"yes": 1, "no": 5},  # predicts "yes" -> 1/3
        2,  # a single gold answer -> 1
        ["maybe"] * 10,  # out of the vocabulary -> 0
    ]
    logits = np.eye(3)[[1, 0, 2, 0]]
    m = run_meter(task, [(out(logits[:2]), batch(targets[:2])), (out(logits[2:]), batch(targets[2:]))])
    assert m["vqa_accuracy"] == pytest.approx((2 / 3 + 1 / 3 + 1 + 0) / 4)


def test_vqa_loss_on_soft_scores():
    task = build_task("vqa", {"num_answers": 3})
    # soft target (1, 2/3, 0); BCE with logits = softplus(x) - x * y, summed over answers
    loss = task.loss(out([[2.0, 0.0, -1.0]]), batch([[0, 0, 0, 1, 1]]))
    expected = math.log(1 + math.e**2) - 2 + math.log(2) + math.log(1 + math.exp(-1))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(DataError, match="answer index 7"):
        task.loss(out([[0.0, 0, 0]]), batch([[7]]))


# --- retrieval under torch.distributed (slow: spawns two processes) ---------------------------
def _gather_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
        rows = [0, 1, 2] if rank == 0 else [3, 4]  # unequal local batches
        a_local = a[rows].clone().requires_grad_(True)
        outputs = {"logits": {"image": a_local, "text": b[rows], "logit_scale": torch.tensor(2.0)}}
        loss = build_task("retrieval").loss(outputs, {"ids": [["a", "b", "a", "c", "d"][i] for i in rows]})
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": a_local.grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_retrieval_loss_gathers_across_processes(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    a.requires_grad_(True)
    outputs = {"logits": {"image": a, "text": b, "logit_scale": torch.tensor(2.0)}}
    full = build_task("retrieval").loss(outputs, {"ids": ["a", "b", "a", "c", "d"]})
    full.backward()
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["loss"].item() == pytest.approx(full.item(), rel=1e-6) == r1["loss"].item()
    # every process computes the global loss; all_gather's backward sums the copies' gradients
    # (DDP's gradient averaging then divides by the world size)
    torch.testing.assert_close(torch.cat([r0["grad"], r1["grad"]]), 2 * a.grad)
