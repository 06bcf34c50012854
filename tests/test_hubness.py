"""Retrieval's hubness correction (``task.hubness: csls``) against a training-split reference bank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmpeft.run_config import load_run_config
from mmpeft.tasks.base import build_task
from mmpeft.tasks.retrieval import neighbour_similarity, retrieval_metrics
from mmpeft.train import Trainer
from mmpeft.train.evaluation import evaluate_run
from test_trainer import one_thread  # noqa: F401  (fixture)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_neighbour_similarity_is_the_mean_of_the_k_largest_cosines():
    rng = np.random.default_rng(0)
    x, bank = unit(rng.normal(size=(5, 4))), unit(rng.normal(size=(9, 4)))
    for k in (1, 3, 9, 50):  # k beyond the bank uses all of it
        expected = [np.mean(sorted(row, reverse=True)[: min(k, 9)]) for row in x @ bank.T]
        assert neighbour_similarity(x, bank, k) == pytest.approx(expected)


def csls_rank_by_hand(q, g, bank_g, bank_q, k, positive):
    """Rank of the best positive of each query under 2 cos - r(q) - r(g), written out loop by loop."""

    def r(item, bank):
        return np.mean(sorted((item @ bank.T).tolist(), reverse=True)[:k])

    ranks = []
    for i, query in enumerate(q):
        scores = [2 * query @ item - r(query, bank_g) - r(item, bank_q) for item in g]
        best = max(s for j, s in enumerate(scores) if positive(i, j))
        ranks.append(sum(s > best for s in scores))
    return np.array(ranks)


def test_csls_ranking_equals_a_reference_written_out():
    rng = np.random.default_rng(1)
    images, texts = unit(rng.normal(size=(6, 3))), unit(rng.normal(size=(6, 3)))
    ids = ["a", "b", "c", "d", "e", "f"]
    bank = {"image": unit(rng.normal(size=(7, 3))), "text": unit(rng.normal(size=(11, 3)))}
    got = retrieval_metrics({"image": images, "text": texts}, ids, [], [1, 2], bank, hubness_k=3)
    same = lambda i, j: i == j  # noqa: E731
    i2t = csls_rank_by_hand(images, texts, bank["text"], bank["image"], 3, same)
    t2i = csls_rank_by_hand(texts, images, bank["image"], bank["text"], 3, same)
    for name, ranks in (("image_to_text", i2t), ("text_to_image", t2i)):
        for k in (1, 2):
            assert got[f"{name}_r{k}"] == pytest.approx(np.mean(ranks < k))
    plain = retrieval_metrics({"image": images, "text": texts}, ids, [], [1, 2])
    assert plain != got  # the correction changes this ranking


def test_csls_demotes_a_hub_that_takes_every_top_1():
    # caption "hub" sits near every image; each image's own caption is a little closer to it than
    # to the others, but always below the hub. The training bank holds images like the evaluated ones.
    images = unit(np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]))
    hub = unit(np.array([1.0, 1.0, 1.0, 0.0]))  # cosine 0.577 to every image
    own = unit(np.array([[1.0, 0, 0, 1.5], [0, 1.0, 0, 1.5], [0, 0, 1.0, 1.5]]))  # 0.555 to its image
    texts = np.concatenate([own, hub[None]])
    ids = ["x", "y", "z", "hub"]
    image_rows = np.concatenate([images, hub[None]])  # the hub caption's own image: itself
    emb = {"image": image_rows, "text": texts}
    plain = retrieval_metrics(emb, ids, [], [1])
    bank = {"image": images, "text": texts}
    fixed = retrieval_metrics(emb, ids, [], [1], bank, hubness_k=2)
    assert plain["image_to_text_r1"] == pytest.approx(1 / 4)  # only the hub's own image hits
    assert fixed["image_to_text_r1"] == pytest.approx(1.0)  # 2(0.555) - 0.277 beats 2(0.577) - 0.577


def test_hubness_config_errors_and_a_meter_without_its_bank():
    with pytest.raises(ValueError, match="hubness_k"):
        build_task("retrieval", {"hubness": "csls", "hubness_k": 0})
    with pytest.raises(Exception, match="hubness"):
        build_task("retrieval", {"hubness": "tsne"})
    with pytest.raises(ValueError, match="rerank_k"):
        build_task("retrieval", {"hubness": "csls", "rerank_k": 4})
    meter = build_task("retrieval", {"hubness": "csls"}).meter()
    assert meter.wants_reference
    emb = {"image": torch.eye(2), "text": torch.eye(2), "logit_scale": torch.tensor(1.0)}
    meter.update({"logits": emb}, {"ids": ["a", "b"]})
    with pytest.raises(ValueError, match="training split"):
        meter.compute()


def toy_retrieval(*overrides: str) -> dict:
    return load_run_config(
        "toy",
        [
            "train.tensorboard=false",
            "train.progress=false",
            "train.cache_dir=''",
            "task={name: retrieval, modalities: [text, image], embed_dim: 16, hubness: csls, hubness_k: 5}",
            *overrides,
        ],
    )


@pytest.mark.parametrize("refit", [False, True])
def test_a_csls_run_ranks_against_its_training_split_and_eval_reproduces_it(tmp_path, monkeypatch, refit):
    from mmpeft.tasks.retrieval import EmbeddingMeter

    banks = []  # the number of examples in each reference bank handed to a meter
    original = EmbeddingMeter.set_reference

    def spy(self, meter):
        banks.append(len(meter.arrays()["ids"]))
        original(self, meter)

    monkeypatch.setattr(EmbeddingMeter, "set_reference", spy)
    out = str(tmp_path / "run")
    metrics = Trainer(toy_retrieval("method=linear", "train.epochs=2", f"train.refit={refit}"), out).fit()
    fitted_on = 192 + 64 if refit else 192  # the toy config's train (+ val) examples
    assert banks[0] == 192 and banks[-1] == fitted_on  # val scored against train, test against the fit
    assert evaluate_run(out)["rsum"] == pytest.approx(metrics["test"]["rsum"])
    assert banks[-1] == fitted_on


def test_a_run_evaluator_embeds_the_reference_bank_once(tmp_path, monkeypatch):
    from mmpeft.train import evaluation

    out = str(tmp_path / "run")
    Trainer(toy_retrieval("method=linear", "train.epochs=1"), out).fit()
    passes = []  # the labels of the passes over a split
    original = evaluation.run_split
    monkeypatch.setattr(evaluation, "run_split", lambda *a: (passes.append(a[-1]), original(*a))[1])
    scorer = evaluation.RunEvaluator(out)
    clean = scorer.score("test")
    assert scorer.score("test") == clean
    scorer.score("test", missing={"image": 0.5})
    assert passes == ["reference", "evaluating", "evaluating", "evaluating"]
