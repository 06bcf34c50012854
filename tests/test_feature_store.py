"""The on-disk prefix cache: shared by runs, computed once per distinct input, never stale."""

from __future__ import annotations

import glob
import os
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from mmpeft.data.base import collate_examples
from mmpeft.model import build_model
from mmpeft.run_config import load_run_config
from mmpeft.train import Trainer
from mmpeft.train.cache import PrefixCache, open_stores
from mmpeft.train.feature_store import content_hash, weights_hash
from test_trainer import one_thread  # noqa: F401  (fixture)


def toy(cache_dir, *overrides: str) -> dict:
    return load_run_config(
        "toy",
        [
            "train.tensorboard=false",
            "train.progress=false",
            "train.prefix_cache=true",
            f"train.cache_dir={cache_dir}",
            "train.epochs=2",
            *overrides,
        ],
    )


def test_a_second_run_computes_nothing_and_scores_the_same(tmp_path):
    store = str(tmp_path / "store")
    first = Trainer(toy(store, "method=wander")).fit()
    n = 192 + 64 + 64  # train + val + test examples of the toy config
    assert first["prefix_cache"]["computed_items"] == 2 * n  # two modalities, all inputs distinct
    again = Trainer(toy(store, "method=late_fusion")).fit()  # another method, same frozen prefix
    assert again["prefix_cache"]["computed_items"] == 0
    repeat = Trainer(toy(store, "method=wander")).fit()
    assert repeat["test"] == first["test"] and repeat["val"] == first["val"]
    memory = Trainer(toy("''", "method=wander")).fit()  # in-memory cache gives the same numbers
    assert memory["test"] == first["test"] and memory["prefix_cache"]["store"] == "memory"


def test_other_weights_or_another_cut_are_computed_afresh(tmp_path):
    store = str(tmp_path / "store")
    Trainer(toy(store, "method=wander")).fit()
    other_seed = Trainer(toy(store, "method=wander", "train.seed=1")).fit()  # toy encoders re-drawn
    assert other_seed["prefix_cache"]["computed_items"] > 0
    last_block = Trainer(toy(store, "model.methods=[{name: lora, r: 2, layers: [-1]}]")).fit()
    assert last_block["prefix_cache"]["computed_items"] > 0  # the cut is one block earlier
    assert len(os.listdir(store)) == 3 * 2  # (seed 0, seed 1, earlier cut) x two encoders


def test_a_deeper_cut_continues_from_states_stored_after_fewer_blocks(tmp_path):
    store = str(tmp_path / "store")
    Trainer(toy(store, "model.methods=[{name: lora, r: 2, layers: [-1]}]")).fit()  # one block earlier
    deeper = Trainer(toy(store, "method=wander")).fit()
    n = 192 + 64 + 64
    assert deeper["prefix_cache"]["computed_items"] == deeper["prefix_cache"]["continued_items"] == 2 * n
    fresh = Trainer(toy(str(tmp_path / "fresh"), "method=wander")).fit()
    assert fresh["prefix_cache"]["continued_items"] == 0
    assert deeper["test"] == pytest.approx(fresh["test"]) and deeper["val"] == pytest.approx(fresh["val"])


class Items(torch.utils.data.Dataset):
    """Four examples; the 'image' input repeats (two captions per image), the 'text' one does not."""

    def __init__(self):
        g = np.random.default_rng(0)
        images = [g.normal(size=(5, 6)).astype(np.float32) for _ in range(2)]
        self.examples = [
            {"inputs": {"image": images[i // 2], "text": g.normal(size=(4, 8)).astype(np.float32)},
             "target": i % 3, "id": f"item{i // 2}"}
            for i in range(4)
        ]  # fmt: skip

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def test_a_repeated_input_is_computed_once_and_rows_equal_an_uncached_run(tmp_path):
    config = load_run_config("toy", ["method=wander"])["model"]
    config["head"] = {"num_outputs": 3}
    model = build_model(config)
    step = model.backbone.first_trainable_step()
    stores = open_stores(model, step, str(tmp_path), "no")
    cache = PrefixCache.build(model, Items(), step, 3, torch.device("cpu"), nullcontext, stores)
    assert cache.computed == 2 + 4  # two distinct images, four distinct texts
    assert cache.rows["image"][0][0] is cache.rows["image"][1][0]  # one tensor shared by both captions
    batch = cache.collate([0, 1, 2, 3])
    model.eval()
    with torch.no_grad():
        raw = collate_examples(list(Items()), model.backbone.encoders)
        direct = model(raw["inputs"])["logits"]
        cached = model(states=batch["inputs"], start_step=step)["logits"]
    torch.testing.assert_close(cached, direct)
    stores = open_stores(model, step, str(tmp_path), "no")
    again = PrefixCache.build(model, Items(), step, 3, torch.device("cpu"), nullcontext, stores)
    assert again.computed == 0


def test_a_damaged_shard_is_ignored_and_its_items_recomputed(tmp_path):
    store = str(tmp_path / "store")
    Trainer(toy(store, "method=wander")).fit()
    shards = glob.glob(os.path.join(store, "*", "shard-*.safetensors"))
    with open(shards[0], "wb") as f:
        f.write(b"not a safetensors file")
    again = Trainer(toy(store, "method=wander")).fit()
    assert 0 < again["prefix_cache"]["computed_items"] < 2 * 320


@pytest.mark.parametrize(
    "a, b",
    [
        ("a dog", "a cat"),
        (np.zeros(3, np.float32), np.zeros(3, np.float64)),
        (np.zeros((2, 3)), np.zeros((3, 2))),
        ({"values": np.ones(2)}, {"values": np.zeros(2)}),
    ],
)
def test_content_hash_tells_different_inputs_apart(a, b):
    assert content_hash(a) != content_hash(b)
    assert content_hash(a) == content_hash(a)


def test_content_hash_of_a_path_follows_the_file(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"one")
    before = content_hash(str(path))
    path.write_bytes(b"two")
    assert content_hash(str(path)) != before


def test_weights_hash_covers_scalar_buffers():
    bn = torch.nn.BatchNorm1d(3)
    before = weights_hash(bn)
    bn.num_batches_tracked += 1  # a 0-d int64 buffer
    assert weights_hash(bn) != before
