"""``mmpeft pretrain``: encoders trained fully on a source task, saved in their family's format,
loaded back frozen through ``path:`` with exactly the trained weights and outputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from mmpeft.cli.main import main
from mmpeft.config import ConfigError
from mmpeft.data.base import collate_examples
from mmpeft.model import build_model
from mmpeft.pretrain import INFO_NAME, RUN_FOLDER, check_pretrain_config, pretrain, save_encoder
from mmpeft.registry import ENCODERS
from mmpeft.run_config import load_run_config
from mmpeft.train.setup import build_components

FAST = ["data.sizes={train: 64, val: 32, test: 32}", "train.tensorboard=false"]


def toy_config(epochs: int = 2) -> dict:
    return load_run_config("toy", [*FAST, f"train.epochs={epochs}"])


def encoder_state(encoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in encoder.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """One 3-epoch pretraining of the toy config (lora replaced by full), whose best validation
    epoch (1) is not its last; the trainer and each epoch's encoder weights are kept."""
    out = str(tmp_path_factory.mktemp("pretrain") / "enc")
    seen, epochs = {}, {}

    def keep(trainer, event, st):
        seen["t"] = trainer
        if event == "eval":  # st.epoch already counts the finished epoch
            epochs[st.epoch - 1] = {m: encoder_state(e) for m, e in trainer.model.backbone.encoders.items()}

    info = pretrain(toy_config(epochs=3), out, callbacks=[keep])
    return out, info, seen["t"], epochs


def test_pretrain_writes_the_encoders_and_pretrain_json(pretrained):
    out, info, trainer, _ = pretrained
    assert [m["name"] for m in trainer.config["model"]["methods"]] == ["full"]
    assert sorted(os.listdir(out)) == sorted(["text", "image", RUN_FOLDER, INFO_NAME])  # no temp folders left
    with open(os.path.join(out, INFO_NAME)) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(info))
    assert saved["encoders"] == {m: {"type": "toy", "path": os.path.join(out, m)} for m in ("text", "image")}
    metrics = json.load(open(os.path.join(out, RUN_FOLDER, "metrics.json")))
    assert saved["val"] == metrics["val"] and saved["test"] == metrics["test"]
    assert saved["val"]["accuracy"] > 0 and saved["config"]["model"]["methods"][0]["name"] == "full"
    assert saved["mmpeft_version"] and saved["created"][:2] == "20"


def test_saved_encoders_are_the_trained_best_weights(pretrained):
    out, info, trainer, epochs = pretrained
    assert info["best_epoch"] == 1 and info["epochs"] == 3  # so "best" and "last" differ
    initial = build_components(trainer.config).model  # same seed: the weights before training
    for m in ("text", "image"):
        trained = encoder_state(trainer.model.backbone.encoders[m])
        # what the ordinary run config loads with `path:` is exactly the in-memory trained encoder
        loaded = one_encoder(info["encoders"][m])
        assert_same_state(encoder_state(loaded), trained)
        # ... those are the best-on-validation weights, not the last epoch's ...
        assert_same_state(epochs[1][m], trained)
        assert any(not torch.equal(epochs[2][m][k], trained[k]) for k in trained)
        # ... and they did train
        before = encoder_state(initial.backbone.encoders[m])
        assert any(not torch.equal(before[k], trained[k]) for k in trained)


def test_loaded_frozen_encoders_give_the_trained_outputs(pretrained):
    out, info, trainer, _ = pretrained
    config = toy_config()
    config["model"]["encoders"] = info["encoders"]
    config["model"]["methods"] = [{"name": "linear"}]
    comps = build_components(config)
    loaded, trained = comps.model.backbone.encoders, trainer.model.backbone.encoders
    assert not any(p.requires_grad for enc in loaded.values() for p in enc.parameters())
    test = comps.reader.split("test")
    batch = collate_examples([test[i] for i in range(16)], loaded)
    trainer.model.eval()
    comps.model.eval()
    with torch.no_grad():
        for m in ("text", "image"):
            a, b = loaded[m](batch["inputs"][m]), trained[m](batch["inputs"][m])
            assert torch.equal(a.tokens, b.tokens), m
            assert torch.equal(a.pad_mask, b.pad_mask), m


def test_cli_saves_only_the_named_modalities(tmp_path, capsys):
    out = str(tmp_path / "enc")
    args = ["pretrain", "--config", "toy", *FAST, "train.epochs=1", "--output", out, "--save", "text"]
    assert main(args) == 0
    assert sorted(os.listdir(out)) == sorted(["text", RUN_FOLDER, INFO_NAME])
    summary = json.loads(capsys.readouterr().out)
    assert summary["encoders"] == {"text": {"type": "toy", "path": os.path.join(out, "text")}}
    with open(os.path.join(out, RUN_FOLDER, "config.yaml")) as f:
        assert "name: full" in f.read()


def test_unknown_save_modality_is_a_named_error_before_training(tmp_path, capsys):
    out = str(tmp_path / "enc")
    with pytest.raises(ConfigError, match=r"'txt'.*did you mean 'text'"):
        pretrain(toy_config(), out, save="text,txt")
    assert main(["pretrain", "--config", "toy", "--output", out, "--save", "audio"]) == 2
    assert "'audio'" in capsys.readouterr().err
    assert not os.path.exists(out)  # nothing was built or written


def test_family_without_save_pretrained_is_named_before_training(tmp_path):
    unsavable = [n for n, cls in ENCODERS.items() if not callable(getattr(cls, "save_pretrained", None))]
    if not unsavable:
        pytest.skip("every registered encoder family can save")
    config = toy_config()
    config["model"]["encoders"]["text"] = {"type": unsavable[0]}  # never built: the check comes first
    named = rf"family '{unsavable[0]}' \(modality 'text'\) has no save_pretrained"
    with pytest.raises(ConfigError, match=named):
        pretrain(config, str(tmp_path / "enc"))
    assert not os.path.exists(tmp_path / "enc")
    check_pretrain_config(config, save=["image"])  # an encoder that is not saved may be of any family


def test_methods_become_full_and_untrained_encoders_cannot_be_saved():
    config, names = check_pretrain_config(toy_config())
    assert config["model"]["methods"] == [{"name": "full"}] and names == ["text", "image"]
    config["model"]["methods"] = [{"name": "full", "modalities": ["text"]}]
    kept, names = check_pretrain_config(config, save="text")
    assert kept["model"]["methods"] == config["model"]["methods"] and names == ["text"]
    with pytest.raises(ConfigError, match=r"encoder 'image' is not trained"):
        check_pretrain_config(config)


class FailingSave:
    def save_pretrained(self, path):
        with open(os.path.join(path, "partial.bin"), "wb") as f:
            f.write(b"half")
        raise OSError("disk full")


def test_save_encoder_replaces_a_folder_atomically(tmp_path):
    encoder = one_encoder({"type": "toy"})
    save_encoder(encoder, str(tmp_path), "a")
    first = encoder_state(one_encoder({"type": "features", "path": str(tmp_path / "a")}))
    assert_same_state(first, encoder_state(encoder))
    with pytest.raises(OSError, match="disk full"):
        save_encoder(FailingSave(), str(tmp_path), "a")  # the old folder survives, no temp folder is left
    assert sorted(os.listdir(tmp_path)) == ["a"] and sorted(os.listdir(tmp_path / "a")) == [
        "config.json",
        "model.safetensors",
    ]
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(1.0)
    save_encoder(encoder, str(tmp_path), "a")  # replaces the older folder
    assert sorted(os.listdir(tmp_path)) == ["a"]
    again = encoder_state(one_encoder({"type": "features", "path": str(tmp_path / "a")}))
    assert_same_state(again, encoder_state(encoder))


def one_encoder(spec: dict):
    """The encoder a run config's ``model.encoders`` entry ``spec`` builds."""
    return build_model({"encoders": {"a": spec}, "head": {"num_outputs": 0}}).backbone.encoders["a"]


MNIST_VIT = dict(
    model_name="vit_tiny_patch16_224",
    img_size=28,
    patch_size=4,
    in_chans=3,
    embed_dim=24,
    depth=2,
    num_heads=2,
    num_classes=0,
    pretrained_cfg_overlay=dict(crop_pct=1.0, mean=[0.1307] * 3, std=[0.3081] * 3),
)


def test_timm_vit_small_config_round_trip(tmp_path):
    pytest.importorskip("timm")
    encoder = one_encoder({"type": "timm_vit", "config": MNIST_VIT})
    save_encoder(encoder, str(tmp_path), "a")
    loaded = one_encoder({"type": "timm_vit", "path": str(tmp_path / "a")})
    assert_same_state(encoder_state(loaded), encoder_state(encoder))
    assert (loaded.num_layers, loaded.dim, loaded.max_tokens) == (2, 24, 7 * 7 + 1)
    # preprocessing travels with the folder: 28x28 stays 28x28 (no resize, no crop), MNIST mean/std
    digit = (np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)
    x = loaded.collate([digit])
    expected = (torch.as_tensor(digit).float() / 255.0 - 0.1307) / 0.3081
    assert x.shape == (1, 3, 28, 28)
    torch.testing.assert_close(x[0], expected.expand(3, -1, -1))
    assert torch.equal(x, encoder.collate([digit]))
    with torch.no_grad():
        assert torch.equal(loaded(x).tokens, encoder(x).tokens)
        assert torch.equal(loaded.reference_forward(x), encoder.reference_forward(x))


def test_timm_vit_small_input_is_not_upsampled():
    pytest.importorskip("timm")
    config = {k: v for k, v in MNIST_VIT.items() if k != "pretrained_cfg_overlay"}
    x = one_encoder({"type": "timm_vit", "config": config}).collate([np.zeros((28, 28), np.uint8)])
    assert x.shape == (1, 3, 28, 28)  # the model's img_size, not the architecture's 224


def test_an_encoder_path_with_pretrain_is_made_on_first_use(tmp_path):
    import yaml

    recipe = tmp_path / "pre.yaml"
    recipe.write_text(yaml.safe_dump(toy_config(epochs=1)))
    path = str(tmp_path / "made" / "text")
    spec = {"type": "toy", "path": path, "pretrain": str(recipe)}
    config = {"encoders": {"text": spec}, "head": {"num_outputs": 2}}
    model = build_model(config)  # pretrains into tmp/made, then loads made/text
    assert sorted(os.listdir(tmp_path / "made")) == sorted(["text", "image", RUN_FOLDER, INFO_NAME])
    saved = os.path.getmtime(os.path.join(path, "config.json"))
    assert_same_state(
        encoder_state(build_model(config).backbone.encoders["text"]),
        encoder_state(model.backbone.encoders["text"]),
    )
    assert os.path.getmtime(os.path.join(path, "config.json")) == saved  # made once
    spec["path"] = str(tmp_path / "other" / "txt")
    with pytest.raises(
        ConfigError, match=r"saves encoders \[.*\] into a folder each, so model.encoders.text.path must"
    ):
        build_model(config)
