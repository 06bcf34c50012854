"""Adapter-only checkpoints in the layout users know from PEFT.

``adapter_config.json`` holds the model config (encoders, methods, head) and the library
version; ``adapter_model.safetensors`` holds only the trainable tensors (and the buffers of the
methods' modules). Loading them onto a freshly built base model reproduces its outputs exactly.
"""

from __future__ import annotations

import json
import os

from torch import Tensor

from .checkpoint import atomic_write_bytes, load_safetensors, save_safetensors
from .model import MultimodalModel, build_model

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_state_dict(model: MultimodalModel) -> dict[str, Tensor]:
    """Trainable tensors by their names in the model, plus the buffers under ``model.peft``."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    state.update({f"peft.{n}": b.detach() for n, b in model.peft.named_buffers()})
    return state


def save_adapter(model: MultimodalModel, directory: str) -> None:
    if model.config is None:
        raise ValueError("save_adapter needs a model built by build_model (its config is saved with it)")
    from . import __version__

    payload = {"mmpeft_version": __version__, "model": model.config}
    atomic_write_bytes(os.path.join(directory, CONFIG_NAME), json.dumps(payload, indent=2).encode())
    save_safetensors(adapter_state_dict(model), os.path.join(directory, WEIGHTS_NAME))


class AdapterError(ValueError):
    """A saved adapter cannot be read or does not fit the model; the message names the file."""


def load_adapter(model: MultimodalModel, directory: str) -> MultimodalModel:
    """Load saved trainable tensors into ``model``; every expected tensor must be present."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise AdapterError(f"no adapter weights {path!r}")
    try:
        saved = load_safetensors(path)
    except Exception as e:
        raise AdapterError(f"cannot read adapter weights {path!r} ({type(e).__name__}): damaged") from None
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise AdapterError(
            f"{path}: adapter does not match the model (another method or size?); "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in saved.items():
        if tensor.shape != expected[name].shape:
            raise AdapterError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, model expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(saved, strict=False)
    return model


def read_adapter_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}")
    try:
        with open(path) as f:
            return json.load(f)["model"]
    except (json.JSONDecodeError, KeyError) as e:
        raise AdapterError(f"{path} is not an mmpeft adapter config: {e}") from e


def load_model_with_adapter(directory: str) -> MultimodalModel:
    """Rebuild the base model from the saved config and load the adapter onto it."""
    return load_adapter(build_model(read_adapter_config(directory)), directory)
