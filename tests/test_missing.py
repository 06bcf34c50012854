"""Missing modalities (mmpeft.missing): per-example handling, strategies, errors, contracts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cases import BACKBONES, METHOD_CASES, VIDEO_METHODS, method_entry, model_config, toy_batch
from mmpeft import METHODS, build_model


def backbones_for(case: str) -> list[str]:
    if case.split(":")[0] in VIDEO_METHODS:
        return ["video_pair"]
    return ["pair_equal"] if METHODS.get(case.split(":")[0]).needs_equal_width else ["pair", "triple"]


MULTI = [
    (c, b)
    for c in METHOD_CASES
    for b in backbones_for(c)
    if not (METHOD_CASES[c].get("modalities") and len(METHOD_CASES[c]["modalities"]) < 2 and b == "triple")
]


def build(case: str, backbone: str, missing: str, seed: int = 0, jitter: bool = False):
    """A toy model; ``jitter`` moves every trainable parameter off its (often zero) initial value."""
    torch.manual_seed(seed)
    config = model_config(backbone, [method_entry(case)])
    config["missing"] = missing
    model = build_model(config)
    if jitter:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
    return model


def batch_size(batch: dict) -> int:
    return next(x for x in batch.values() if isinstance(x, dict))["values"].shape[0]


def rows(batch: dict, keep: list[int]) -> dict:
    """The examples ``keep`` of a toy batch (a video input keeps those clips' frames)."""
    B, out = batch_size(batch), {}
    for m, x in batch.items():
        if isinstance(x, torch.Tensor):  # (B·N, C, H, W) frames
            n = x.shape[0] // B
            out[m] = x[[j * n + f for j in keep for f in range(n)]]
        else:
            out[m] = {k: v[keep] for k, v in x.items()}
    return out


def absent_marks(batch: dict, lacking: str, which: list[int]) -> dict:
    B = batch_size(batch)
    mark = torch.zeros(B, dtype=torch.bool)
    mark[which] = True
    return {lacking: mark}


@pytest.mark.parametrize("strategy", ["zeros", "placeholder"])
@pytest.mark.parametrize("case,backbone", MULTI)
def test_complete_examples_keep_their_outputs(case, backbone, strategy):
    model = build(case, backbone, strategy, jitter=True).eval()
    batch = toy_batch(BACKBONES[backbone], batch_size=4)
    lacking = list(BACKBONES[backbone])[1]
    with torch.no_grad():
        mixed = model(batch, absent=absent_marks(batch, lacking, [1, 3]))
        alone = model(rows(batch, [0, 2]))
        changed = model(batch)
    for key in ("logits", "features"):
        torch.testing.assert_close(mixed[key][[0, 2]], alone[key], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(mixed["logits"]).all()
    # the incomplete examples' outputs are not their complete outputs (the absence is seen)
    assert not torch.allclose(mixed["logits"][[1, 3]], changed["logits"][[1, 3]])


@pytest.mark.parametrize("case,backbone", [(c, b) for c, b in MULTI if b != "triple"])
def test_gradients_reach_the_placeholder(case, backbone):
    model = build(case, backbone, "placeholder").train()
    batch = toy_batch(BACKBONES[backbone], batch_size=4)
    lacking = list(BACKBONES[backbone])[1]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    placeholder = model.peft["missing"].placeholder[lacking]
    got = False
    for _ in range(3):  # zero-initialised parts (LoRA B, gates) pass no gradient on the first step
        opt.zero_grad()
        logits = model(batch, absent=absent_marks(batch, lacking, [1, 3]))["logits"]
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
        got |= placeholder.grad is not None and bool(placeholder.grad.abs().sum() > 0)
        opt.step()
    assert got, "no gradient reached the placeholder"


# --- data: stand-ins, marks and errors ----------------------------------------------------------
def toy_encoders():
    return build_model(model_config("pair", [method_entry("linear")])).backbone.encoders


def toy_item(T: int, F: int, value: float):
    return {"values": torch.full((T, F), value), "attention_mask": torch.ones(T, dtype=torch.long)}


def test_collate_marks_absent_examples_and_fills_their_slot():
    from mmpeft.data.base import DataError, collate_examples

    class Toy:  # the toy encoder's collate stacks dicts of (T, F) tensors
        def collate(self, items):
            return {"values": torch.stack([x["values"] for x in items])}

    encoders = {"text": Toy(), "image": Toy()}
    examples = [
        {"inputs": {"text": toy_item(2, 3, 1.0), "image": None}, "id": "a"},
        {"inputs": {"text": toy_item(2, 3, 2.0), "image": toy_item(2, 3, 5.0)}, "id": "b"},
        {
            "inputs": {"text": toy_item(2, 3, 3.0), "image": toy_item(2, 3, 6.0)},
            "id": "c",
            "absent": ["image"],
        },
    ]
    batch = collate_examples(examples, encoders)
    assert batch["absent"]["image"].tolist() == [True, False, True] and "text" not in batch["absent"]
    assert batch["inputs"]["image"]["values"][0, 0, 0] == 5.0  # another example's input stands in
    alone = [{"inputs": {"text": toy_item(2, 3, 1.0), "image": None}, "id": "a"}]
    assert collate_examples(alone, encoders, stand_in=lambda m: toy_item(2, 3, 9.0))["absent"]["image"].all()
    with pytest.raises(DataError, match="no example of the batch has a 'image' input"):
        collate_examples(alone, encoders)
    with pytest.raises(DataError, match="example 'z' has none of the model's modalities"):
        collate_examples([{"inputs": {"text": None, "image": None}, "id": "z"}], encoders)


def test_model_missing_error_and_all_absent_are_named():
    from mmpeft.data.base import DataError

    model = build("linear", "pair", "error").eval()
    batch = toy_batch(BACKBONES["pair"], batch_size=3)
    with pytest.raises(
        DataError, match=r"lacks 'image' for 1 example\(s\) \(e.g. \['b'\]\) and model.missing is 'error'"
    ):
        model(batch, absent={"image": torch.tensor([False, True, False])}, ids=["a", "b", "c"])
    model = build("linear", "pair", "zeros")
    every = {"image": torch.tensor([True, False, False]), "text": torch.tensor([True, False, False])}
    with pytest.raises(DataError, match="example 'a' lacks every modality"):
        model(batch, absent=every, ids=["a", "b", "c"])
    with pytest.raises(DataError, match=r"absent modalities \['audio'\] are not the model's"):
        model(batch, absent={"audio": torch.tensor([True, False, False])})


def test_zeros_make_the_absent_pooled_feature_zero_and_placeholders_are_adapter_state():
    model = build("linear", "pair", "zeros").eval()
    batch = toy_batch(BACKBONES["pair"], batch_size=3)
    out = model(batch, absent={"image": torch.tensor([True, False, False])})
    image = model.backbone.encoders["image"].pool(out["states"]["image"])
    assert image[0].abs().sum() == 0 and image[1].abs().sum() > 0
    assert "missing" not in model.peft  # no parameters
    learned = build("linear", "pair", "placeholder")
    names = [n for n, p in learned.named_parameters() if p.requires_grad]
    assert "peft.missing.placeholder.image" in names and "peft.missing.placeholder.text" in names
    with pytest.raises(Exception, match="model.missing"):
        build_model({**model_config("pair", []), "missing": "guess"})


# --- modality dropout ---------------------------------------------------------------------------
def test_modality_dropout_is_seeded_keeps_one_modality_and_validates():
    from mmpeft.config import ConfigError
    from mmpeft.missing import dropout_rates
    from mmpeft.train.modality_dropout import drop_modalities

    mods = ["text", "image", "audio"]
    batch = {"targets": list(range(400))}
    rates = dropout_rates(0.6, mods)
    a = drop_modalities(batch, rates, mods, [0, 1, 2, 0])
    b = drop_modalities(batch, rates, mods, [0, 1, 2, 0])
    c = drop_modalities(batch, rates, mods, [0, 1, 3, 0])
    assert all(torch.equal(a["absent"][m], b["absent"][m]) for m in mods)
    assert any(not torch.equal(a["absent"][m], c["absent"][m]) for m in mods)
    marks = torch.stack([a["absent"][m] for m in mods])
    assert not marks.all(0).any(), "an example lost every modality"
    assert 0.45 < marks.float().mean() < 0.6  # 0.6 per modality, less the saved last ones
    only = drop_modalities(batch, dropout_rates({"audio": 0.5}, mods), mods, [1])
    assert set(only["absent"]) == {"audio"}
    earlier = {"targets": [0, 1], "absent": {"text": torch.tensor([True, False])}}
    kept = drop_modalities(earlier, dropout_rates({"image": 0.99}, ["text", "image"]), ["text", "image"], [5])
    assert not kept["absent"]["image"][0]  # its only modality left stays
    assert dropout_rates(None, mods) == {} and dropout_rates({"text": 0.0}, mods) == {}
    with pytest.raises(ConfigError, match=r"names \['video'\]"):
        dropout_rates({"video": 0.3}, mods)
    with pytest.raises(ConfigError, match=r"modality_dropout.text must be a rate in \[0, 1\)"):
        dropout_rates({"text": 1.0}, mods)


def test_missing_rates_draw_supersets_and_never_take_the_last_modality():
    from mmpeft.data.perturb import MissingDataset

    data = [{"inputs": {"text": 1, "image": 2}, "id": i} for i in range(300)]
    low, high = MissingDataset(data, {"image": 0.3}), MissingDataset(data, {"image": 0.7})
    lost_low = {i for i in range(300) if low[i]["absent"]}
    lost_high = {i for i in range(300) if high[i]["absent"]}
    assert lost_low < lost_high and 60 < len(lost_low) < 120 and 180 < len(lost_high) < 240
    both = MissingDataset(data, {"image": 1.0, "text": 1.0})
    assert all(len(both[i]["absent"]) == 1 for i in range(300))


# --- through the CLI: train with dropout, eval --missing, robustness ---------------------------
FAST = ["data.sizes={train: 64, val: 32, test: 64}", "train.epochs=2", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory):
    from mmpeft.cli.main import main

    out = tmp_path_factory.mktemp("run") / "late_fusion"
    args = [
        "method=late_fusion",
        "train.modality_dropout={image: 0.5}",
        "train.prefix_cache=true",
        "train.cache_dir=",
    ]
    assert main(["-q", "train", "--config", "toy", *args, *FAST, "train.epochs=6", "--output", str(out)]) == 0
    return out


def test_dropout_run_learns_a_placeholder_and_evaluates_with_absent_inputs(dropout_run, capsys):
    import json

    from mmpeft.cli.main import main
    from mmpeft.run_config import read_yaml

    assert read_yaml(dropout_run / "config.yaml")["model"]["missing"] == "placeholder"
    capsys.readouterr()
    assert main(["eval", "--run", str(dropout_run)]) == 0
    clean = json.loads(capsys.readouterr().out)["test"]
    assert main(["eval", "--run", str(dropout_run), "--missing", "image=1.0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["missing"] == {"rates": {"image": 1.0}, "seed": 0}
    assert out["test"] != clean and all(np.isfinite(v) for v in out["test"].values())
    assert main(["eval", "--run", str(dropout_run), "--missing", "audio=0.5"]) == 2
    assert "--missing names ['audio'], which the model" in capsys.readouterr().err


def test_robustness_writes_a_table_per_modality(dropout_run, tmp_path, capsys):
    import json

    from mmpeft.cli.main import main

    assert main(["robustness", "--run", str(dropout_run), "--rates", "0,1", "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "robustness.json").read_text())
    assert set(result["scores"]) == {"text", "image"} and result["rates"] == [0.0, 1.0]
    assert result["scores"]["text"][0] == result["scores"]["image"][0]  # rate 0: the clean score
    assert "| image |" in (tmp_path / "robustness.md").read_text()
    assert main(["robustness", "--run", str(dropout_run), "--rates", "0,2"]) == 2


@pytest.mark.parametrize("case", sorted({c.split(":")[0] for c, b in MULTI if b == "pair"} - {"probe"}))
def test_every_method_evaluates_with_a_modality_missing(case, tmp_path):
    from mmpeft.run_config import load_run_config
    from mmpeft.train import Trainer, evaluate_run

    config = load_run_config(
        "toy", [f"method={case}", *FAST[:1], "train.max_steps=20", "train.lr=0.01", "train.tensorboard=false"]
    )
    Trainer(config, str(tmp_path)).fit()
    clean = evaluate_run(str(tmp_path))
    absent = evaluate_run(str(tmp_path), missing={"image": 1.0})
    assert absent != clean and all(np.isfinite(v) for v in absent.values())


def test_manifest_empty_cells_train_the_same_with_and_without_the_prefix_cache(tmp_path):
    import json

    from mmpeft.data.base import DataError, build_reader
    from mmpeft.train import Trainer

    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        y = i % 2
        row = {
            "a": (rng.normal(size=(3, 4)) + y).round(3).tolist(),
            "b": (rng.normal(size=(2, 5)) - y).round(3).tolist(),
        }
        if i % 5 == 1:
            row["a"] = None
        if i % 7 == 2 and row["a"] is not None:
            row["b"] = ""
        rows.append({**row, "label": y, "split": ["train", "val", "test"][i % 3]})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"root": str(tmp_path / "m.jsonl"), "columns": {"a": "a", "b": "b"}}
    train = build_reader("manifest", data).split("train")
    assert train[2]["inputs"]["a"] is None and train[2]["inputs"]["b"] is not None  # row i = 6

    def config(cache: bool) -> dict:
        encoders = {
            "a": {"type": "features", "config": {"input_dim": 4, "dim": 16, "depth": 2, "heads": 2}},
            "b": {"type": "features", "config": {"input_dim": 5, "dim": 16, "depth": 2, "heads": 2}},
        }
        methods = [{"name": "lora", "r": 2, "layers": [-1]}]
        train = {"epochs": 2, "batch_size": 8, "tensorboard": False, "prefix_cache": cache, "cache_dir": ""}
        return {"model": {"encoders": encoders, "methods": methods}, "task": {"name": "classification"},
                "data": {"name": "manifest", **data}, "train": train}  # fmt: skip

    plain = Trainer(config(False), str(tmp_path / "plain")).fit()
    cached = Trainer(config(True), str(tmp_path / "cached")).fit()
    assert cached["test"] == pytest.approx(plain["test"], abs=1e-6)
    rows[0]["a"] = rows[0]["b"] = None
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"line 1: every input column \['a', 'b'\] is empty"):
        build_reader("manifest", data).split("train")
    rows[0]["a"] = [[0.0, 0.0, 0.0, 0.0]]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data["columns"]["b"] = "bb"
    with pytest.raises(DataError, match=r"'b' \(column 'bb'\) is empty in every row"):
        build_reader("manifest", data).split("train")


def test_cached_and_raw_scoring_agree_with_modalities_missing(dropout_run):
    from mmpeft.train.evaluation import RunEvaluator

    cached, raw = RunEvaluator(str(dropout_run)), RunEvaluator(str(dropout_run))
    raw.train_cfg.prefix_cache = False
    for missing in (None, {"image": 0.5}, {"text": 0.7, "image": 0.7}):
        assert cached.score(missing=missing) == pytest.approx(raw.score(missing=missing), abs=1e-9)
    assert cached.caches and not raw.caches
