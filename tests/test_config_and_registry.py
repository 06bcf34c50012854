"""Config validation before anything is built, registries, reports and adapter files."""

from __future__ import annotations

import json

import pytest
import torch

from cases import BACKBONES, model_config, toy_batch
from mmpeft import ENCODERS, METHODS, ConfigError, build_model, load_adapter, parameter_counts, save_adapter
from mmpeft.model import validate_model_spec
from mmpeft.registry import Registry


def test_unknown_method_suggests_closest():
    with pytest.raises(ConfigError, match="unknown method 'lorra'.*'lora'"):
        validate_model_spec(model_config("pair", [{"name": "lorra"}]))


def test_unknown_method_option_suggests_closest():
    with pytest.raises(ConfigError, match="unknown key 'rank' in model.methods\\[0\\] \\(lora\\).*'r'"):
        validate_model_spec(model_config("pair", [{"name": "lora", "rank": 4}]))


def test_unknown_top_level_and_encoder_keys():
    cfg = model_config("pair", [])
    cfg["heads"] = {}
    with pytest.raises(ConfigError, match="unknown key 'heads' in model; did you mean 'head'"):
        validate_model_spec(cfg)
    cfg = model_config("pair", [])
    cfg["encoders"]["text"] = {"type": "toi"}
    with pytest.raises(ConfigError, match="unknown encoder 'toi'.*'toy'"):
        validate_model_spec(cfg)


def test_bad_option_type_is_named():
    with pytest.raises(ConfigError, match="model.methods\\[0\\] \\(lora\\).r: expected int"):
        validate_model_spec(model_config("pair", [{"name": "lora", "r": "eight"}]))


def test_method_on_unknown_modality():
    with pytest.raises(ConfigError, match="unknown modality 'audio'"):
        validate_model_spec(model_config("pair", [{"name": "lora", "modalities": ["audio"]}]))


def test_same_method_twice_needs_keys():
    methods = [{"name": "lora", "modalities": ["text"]}, {"name": "lora", "modalities": ["image"]}]
    with pytest.raises(ConfigError, match="attached twice"):
        validate_model_spec(model_config("pair", methods))
    methods[1]["key"] = "lora_image"
    model = build_model(model_config("pair", methods))
    assert set(model.peft) == {"lora", "lora_image", "head"}


def test_registry_errors_and_double_registration():
    reg = Registry("widget")
    reg.register("alpha")(object())
    with pytest.raises(KeyError, match="did you mean 'alpha'"):
        reg.get("alpah")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("alpha")(object())
    assert "toy" in ENCODERS.names() and "lora" in METHODS.names()


def test_parameter_report_splits_by_modality():
    cfg = model_config("pair", [{"name": "lora", "r": 2, "targets": ["q"], "modalities": ["text"]}])
    model = build_model(cfg)
    counts = parameter_counts(model)
    # text: 2 blocks x (A: 2x32 + B: 32x2); head: (32 + 48) x 3 + 3
    assert counts["lora"] == {"text": 2 * (2 * 32 + 32 * 2)}
    assert counts["head"] == {"shared": 80 * 3 + 3}


def test_adapter_files_hold_only_trainable_tensors(tmp_path):
    model = build_model(model_config("pair", [{"name": "lora", "r": 2}]))
    save_adapter(model, str(tmp_path))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(saved) == trainable
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["model"]["methods"] == [{"name": "lora", "r": 2}]


def test_load_adapter_rejects_mismatch(tmp_path):
    save_adapter(build_model(model_config("pair", [{"name": "lora", "r": 2}])), str(tmp_path))
    other = build_model(model_config("pair", [{"name": "lora", "r": 4}]))
    with pytest.raises(ValueError, match="has shape"):
        load_adapter(other, str(tmp_path))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        load_adapter(other, str(tmp_path))


def test_features_encoder_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = build_model(model_config("pair", []))
    enc = model.backbone.encoders["text"]
    enc.model.save_pretrained(str(tmp_path / "enc"))
    cfg = model_config("pair", [])
    cfg["encoders"]["text"] = {"type": "features", "path": str(tmp_path / "enc")}
    loaded = build_model(cfg).backbone.encoders["text"]
    batch = toy_batch(BACKBONES["pair"])["text"]
    assert torch.equal(enc.reference_forward(batch), loaded.reference_forward(batch))


def test_features_collate_pads_and_names_bad_item():
    enc = build_model(model_config("pair", [])).backbone.encoders["text"]
    out = enc.collate([torch.randn(3, 8).numpy(), torch.randn(5, 8).numpy()])
    assert out["values"].shape == (2, 5, 8) and out["attention_mask"].sum().item() == 8
    with pytest.raises(ValueError, match="item 1 has shape \\(4, 7\\)"):
        enc.collate([torch.randn(3, 8), torch.randn(4, 7)])


def test_unknown_encoder_option_is_named():
    cfg = model_config("pair", [])
    cfg["encoders"]["text"]["options"] = {"poolin": "mean"}
    with pytest.raises(ConfigError, match="unknown option 'poolin' in model.encoders.text.options for 'toy'"):
        build_model(cfg)


def test_paths_may_be_pathlib_objects(tmp_path):
    torch.manual_seed(0)
    build_model(model_config("pair", [])).backbone.encoders["text"].model.save_pretrained(str(tmp_path))
    cfg = model_config("pair", [])
    cfg["encoders"]["text"] = {"type": "features", "path": tmp_path}  # a Path, not a str
    model = build_model(cfg)
    assert model.backbone.encoders["text"].source == str(tmp_path)
    save_adapter(model, str(tmp_path / "adapter"))  # the saved config is plain JSON
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["model"]["encoders"][
        "text"
    ]["path"] == str(tmp_path)
