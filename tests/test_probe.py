"""The `probe` baseline (closed-form fit on frozen features) and `train.refit` (train+val refit)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmpeft.data.base import collate_examples
from mmpeft.run_config import load_run_config
from mmpeft.train import Trainer
from mmpeft.train.evaluation import evaluate_run
from test_trainer import one_thread  # noqa: F401  (fixture)

pytest.importorskip("sklearn")


def toy(*overrides: str) -> dict:
    return load_run_config(
        "toy", ["train.tensorboard=false", "train.progress=false", "train.cache_dir=''", *overrides]
    )


def pooled_features(trainer, split: str) -> tuple[np.ndarray, list]:
    """Frozen pooled features computed here from raw inputs, independently of the probe's code."""
    model = trainer.model.eval()
    data = trainer.reader.split(split)
    batch = collate_examples([data[i] for i in range(len(data))], model.backbone.encoders)
    with torch.no_grad():
        with model.adapters_disabled():
            states = model.backbone(batch["inputs"])
        x = torch.cat([model.backbone.encoders[m].pool(s) for m, s in states.items()], -1)
    return x.double().numpy(), batch["targets"]


def test_probe_classification_is_sklearn_logistic_regression_with_alpha_chosen_on_val(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    out = str(tmp_path / "probe")
    trainer = Trainer(toy("method=probe", "model.methods.0.alphas=[0.01,1.0,100.0]"), out)
    metrics = trainer.fit()
    history = metrics["history"]
    assert [h["alpha"] for h in history] == [0.01, 1.0, 100.0]
    scores = [h["val"]["accuracy"] for h in history]
    chosen = [h for h in history if h["chosen"]]
    assert len(chosen) == 1 and chosen[0]["val"]["accuracy"] == max(scores)
    assert metrics["val"]["accuracy"] == max(scores) and metrics["steps"] == 0
    # the same fit, written out here: standardise on train, multinomial logistic regression
    x, y = pooled_features(trainer, "train")
    xt, yt = pooled_features(trainer, "test")
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=1.0 / chosen[0]["alpha"], max_iter=2000).fit(scaler.transform(x), y)
    expected = float(np.mean(clf.predict(scaler.transform(xt)) == np.array(yt)))
    assert metrics["test"]["accuracy"] == pytest.approx(expected, abs=1.5 / len(yt))
    assert evaluate_run(out)["accuracy"] == pytest.approx(metrics["test"]["accuracy"])  # saved + reloaded


def test_probe_regression_is_ridge_and_refit_uses_train_and_val():
    from sklearn.linear_model import Ridge

    over = [
        "data.task=regression",
        "task={name: regression}",
        "method=probe",
        "model.methods.0.alphas=[10.0]",
    ]
    trainer = Trainer(toy(*over, "train.refit=true"))
    metrics = trainer.fit()
    x, y = pooled_features(trainer, "train")
    xv, yv = pooled_features(trainer, "val")
    xt, yt = pooled_features(trainer, "test")
    xa, ya = np.concatenate([x, xv]), np.concatenate([np.array(y), np.array(yv)]).reshape(-1)
    mean, std = xa.mean(0), xa.std(0)
    reg = Ridge(alpha=10.0).fit((xa - mean) / std, ya)
    pred = reg.predict((xt - mean) / std)
    assert metrics["test"]["mae"] == pytest.approx(
        float(np.mean(np.abs(pred - np.array(yt).reshape(-1)))), rel=1e-4
    )


def test_probe_retrieval_maps_one_modality_into_the_other():
    over = [
        "task={name: retrieval, modalities: [text, image], embed_dim: 32}",
        "method=probe",
        "model.methods.0.alphas=[1.0, 100.0]",
    ]
    metrics = Trainer(toy(*over)).fit()
    assert 0.0 <= metrics["test"]["mean_recall"] <= 1.0 and len(metrics["history"]) == 2
    with pytest.raises(Exception, match="embed_dim must equal its width 32"):
        Trainer(toy(*over[1:], "task={name: retrieval, modalities: [text, image], embed_dim: 16}")).fit()


def test_retrieval_diagonal_target_projection_holds_the_ridge_map_exactly():
    over = ["method=probe", "model.methods.0.alphas=[10.0]", "train.modality_contribution=false"]
    task = "task={name: retrieval, modalities: [text, image], embed_dim: 32"
    full = Trainer(toy(*over, task + "}"))
    diagonal = Trainer(toy(*over, task + ", diagonal_projection: [image]}"))
    a, b = full.fit(), diagonal.fit()
    assert b["test"] == pytest.approx(a["test"], abs=1e-6)  # the same ranking from 2·32 parameters
    proj = diagonal.model.peft["head"].proj["image"]
    assert sum(p.numel() for p in proj.parameters()) == 64
    x = torch.randn(5, 32)
    torch.testing.assert_close(proj(x), full.model.peft["head"].proj["image"](x), atol=1e-5, rtol=1e-5)
    with pytest.raises(Exception, match="needs a full projection for 'text'"):
        Trainer(toy(*over, task + ", diagonal_projection: [text]}")).fit()
    with pytest.raises(Exception, match="diagonal_projection names \\['audio'\\]"):
        Trainer(toy(*over, task + ", diagonal_projection: [audio]}"))


def test_probe_refuses_a_hidden_head_and_chosen_modalities():
    with pytest.raises(Exception, match="linear head"):
        Trainer(toy("method=probe", "model.head.hidden=8"))
    with pytest.raises(Exception, match="leave 'modalities' unset"):
        Trainer(toy("model.methods=[{name: probe, modalities: [text]}]"))


def test_refit_trains_on_train_and_val_for_the_chosen_epochs(tmp_path):
    out = str(tmp_path / "refit")
    metrics = Trainer(toy("method=linear", "train.epochs=3", "train.refit=true"), out).fit()
    assert metrics["refit"]["epochs"] == metrics["best_epoch"] + 1
    assert metrics["refit"]["train_examples"] == 192 + 64  # train + val of the toy config
    assert evaluate_run(out)["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    plain = Trainer(toy("method=linear", "train.epochs=3")).fit()
    assert plain["refit"] is None and plain["val"] == metrics["val"]  # selection is the same run


def test_head_init_probe_starts_training_from_the_probe_fit():
    probe = Trainer(
        toy("method=probe", "model.methods.0.alphas=[1.0]", "train.modality_contribution=false")
    ).fit()
    trainer = Trainer(
        toy("method=linear", "train.head_init=probe", "train.head_init_alphas=[1.0]", "train.epochs=1")
    )
    metrics = trainer.fit()
    assert metrics["head_init"]["alpha"] == 1.0
    assert metrics["head_init"]["val"] == probe["val"]  # at step 0 the model is the probe
    refit = Trainer(toy("method=linear", "train.head_init=probe", "train.epochs=2", "train.refit=true")).fit()
    assert refit["refit"]["epochs"] == refit["best_epoch"] + 1 and refit["head_init"]["alpha"] > 0


def test_head_init_probe_fits_pmf_concat_head_on_the_models_own_features():
    with pytest.raises(Exception, match="pmf: head 'concat'"):
        Trainer(toy("method=pmf", "train.head_init=probe", "train.head_init_alphas=[1.0]"))._setup()
    trainer = Trainer(
        toy(
            "method=pmf",
            "model.methods.0.head=concat",
            "train.head_init=probe",
            "train.head_init_alphas=[1.0]",
        )
    )
    trainer._setup()
    val = trainer.caches.get("val", trainer.val_set)
    assert trainer.head_init_info["val"] == trainer._evaluate(val)  # the model as initialised by the probe
    linear = trainer.model.peft["head"].head.net[-1]
    x, y = trainer_features(trainer)
    logits = x @ linear.weight.detach().double().numpy().T + linear.bias.detach().double().numpy()
    # the fit's own training accuracy on the model's features (prompts included) is high on the toy
    assert (logits.argmax(1) == y).mean() > 0.9


def trainer_features(trainer) -> tuple[np.ndarray, np.ndarray]:
    from mmpeft.methods.probe import FEATURES, collect, targets_of

    feats, batches = collect(trainer, trainer.caches.get("train", trainer.train_set))
    return feats[FEATURES], targets_of(trainer.task, batches, trainer.model.head_config.num_outputs)


def test_probe_on_vqa_fits_each_questions_top_answer():
    """With one gold answer per question, the VQA probe is the classification probe."""
    cls = Trainer(toy("method=probe", "model.methods.0.alphas=[1.0]")).fit()
    vqa = Trainer(toy("method=probe", "model.methods.0.alphas=[1.0]", "task={name: vqa}")).fit()
    assert vqa["test"]["vqa_accuracy"] == pytest.approx(cls["test"]["accuracy"])


def test_vqa_probe_logits_are_shifted_to_the_bce_minimum():
    """vqa trains with a per-answer sigmoid: the softmax fit is shifted so that a head started at
    it starts at a small loss, with the same answers as the classification fit."""
    cls = Trainer(toy("method=probe", "model.methods.0.alphas=[0.01]"))
    cls.fit()
    vqa = Trainer(toy("method=probe", "model.methods.0.alphas=[0.01]", "task={name: vqa}"))
    vqa.fit()
    x, y = trainer_features(vqa)

    def logits(trainer):
        linear = trainer.model.peft["head"].net[-1]
        return torch.as_tensor(x) @ linear.weight.detach().double().T + linear.bias.detach().double()

    shifted, plain = logits(vqa), logits(cls)
    assert torch.equal(shifted.argmax(1), plain.argmax(1))
    torch.testing.assert_close(
        (shifted - plain).std(1), torch.zeros(len(x), dtype=torch.float64), atol=1e-5, rtol=0
    )
    assert torch.sigmoid(shifted).sum().item() == pytest.approx(len(x), rel=1e-4)  # d BCE / d shift = 0
    targets = torch.nn.functional.one_hot(torch.as_tensor(y), shifted.shape[1]).double()

    def bce(z):
        return torch.nn.functional.binary_cross_entropy_with_logits(z, targets, reduction="sum").item() / len(
            x
        )

    assert bce(shifted) < bce(plain)
