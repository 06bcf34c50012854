"""Plumbing shared by the Hugging Face encoder families (``hf_*.py``).

transformers renames module internals between releases; the families name where things live as
tuples of candidate dotted paths (first match wins), so one table covers several releases. Nothing
here rewrites a model: layers are called as they are and canonical linears/norms are the model's
own modules, so hooks on them fire and the state-dict keys stay those of the checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError
from ..optional import require
from ..registry import closest
from .base import Encoder, EncoderState, additive_attention_mask


def transformers_module():
    return require("transformers", "hf")


def find_module(root: nn.Module, paths: tuple[str, ...], what: str) -> nn.Module:
    """The first existing submodule among dotted ``paths``; an error lists what was tried."""
    for path in paths:
        mod = root
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.Module):
            return mod
    raise AttributeError(f"{type(root).__name__} has no {what} (looked for {', '.join(paths)})")


def hf_config(config: dict | None, default_type: str, where: str):
    """A transformers config from a plain dict with ``model_type``; unknown keys name the closest."""
    tf = transformers_module()
    data = dict(config or {})
    model_type = data.pop("model_type", default_type)
    if model_type not in tf.CONFIG_MAPPING:
        raise ConfigError(
            f"{where}.model_type: unknown {model_type!r}; {closest(model_type, tf.CONFIG_MAPPING)}"
        )
    cls = tf.CONFIG_MAPPING[model_type]
    if dataclasses.is_dataclass(cls):  # transformers 5 configs; instantiating one may warn
        known = {f.name for f in dataclasses.fields(cls)} | {"output_attentions"}
    else:
        known = set(cls().to_dict())
    known |= set(getattr(cls, "attribute_map", {}))
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown key {key!r} in {where} ({model_type}); {closest(key, known)}")
    return cls(**data)


def load_pretrained(
    model_cls: Any, path: str, attn_implementation: str | None, what: str, ignore: tuple[str, ...] = ()
) -> nn.Module:
    """``model_cls.from_pretrained(path)``; missing weights are an error, not random init.

    A local directory loads offline; any other string goes to transformers as a hub name.
    Missing keys starting with one of ``ignore`` (parts the encoder never runs) are allowed.
    """
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    tf = transformers_module()
    log = tf.utils.logging
    level, bars = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()  # a joint checkpoint lists the other tower as "unexpected"
    log.disable_progress_bar()
    try:
        model, info = model_cls.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        log.set_verbosity(level)
        if bars:
            log.enable_progress_bar()
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(ignore))
    if missing:
        raise ValueError(f"{what}: checkpoint {path!r} lacks {len(missing)} weights, e.g. {missing[:3]}")
    return model


def call_layer(layer: nn.Module, x: Tensor, bias: Tensor | None, **kwargs: Any) -> Tensor:
    """Run one HF layer module itself (so hooks on its submodules fire): (B, T, D) -> (B, T, D)."""
    out = layer(x, bias, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # older releases return tuples


def attention_bias(
    pad_mask: Tensor | None, T: int, n_query: int, dtype: torch.dtype, device: Any, causal: bool = False
) -> Tensor | None:
    """Additive mask (B|1, 1, n_query|1, T) for the last ``n_query`` query rows of a length-T sequence.

    Float masks work with both the eager and the SDPA attention of transformers.
    """
    if not causal:
        return additive_attention_mask(pad_mask, dtype)
    rows = torch.arange(T - n_query, T, device=device)  # positions of the query rows
    blocked = torch.arange(T, device=device)[None, :] > rows[:, None]  # (n, T)
    blocked = blocked[None, None]  # (1, 1, n, T)
    if pad_mask is not None:
        blocked = blocked | pad_mask[:, None, None, :]  # (B, 1, n, T)
    bias = torch.zeros(blocked.shape, dtype=dtype, device=device)
    return bias.masked_fill(blocked, torch.finfo(dtype).min)


def attend_tail(lin: dict[str, nn.Module], h: Tensor, n: int, heads: int, bias: Tensor | None) -> Tensor:
    """Self-attention output of the last ``n`` rows only, through the layer's own q/k/v/o modules.

    h: (B, T, D) normalised input -> (B, n, D); keys and values come from all T rows.
    """
    B = h.shape[0]
    split = lambda t: t.view(B, t.shape[1], heads, -1).transpose(1, 2)  # (B, H, t, Dh)
    q, k, v = split(lin["q"](h[:, -n:])), split(lin["k"](h)), split(lin["v"](h))
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, n, Dh)
    return lin["o"](ctx.transpose(1, 2).reshape(B, n, -1))


def post_norm_tail(enc: Encoder, i: int, state: EncoderState, n: int, heads: int, act: Callable) -> Tensor:
    """Last n rows of a post-LN block (BERT): LN(a + FFN(a)), a = LN(x + Attn(x)). Dropout is skipped."""
    x, T = state.tokens, state.tokens.shape[1]
    lin, norm = enc.linears(i), enc.norms(i)
    bias = attention_bias(state.pad_mask, T, n, x.dtype, x.device)
    a = norm["ln_attn"](attend_tail(lin, x, n, heads, bias) + x[:, -n:])  # (B, n, D)
    return norm["ln_ffn"](lin["fc2"](act(lin["fc1"](a))) + a)


def pre_norm_tail(
    enc: Encoder,
    i: int,
    state: EncoderState,
    n: int,
    heads: int,
    act: Callable,
    causal: bool = False,
    scales: tuple[Callable, Callable] = (nn.Identity(), nn.Identity()),
) -> Tensor:
    """Last n rows of a pre-LN block (ViT, CLIP): y = x + s1(Attn(LN x)); y + s2(FFN(LN y))."""
    x, T = state.tokens, state.tokens.shape[1]
    lin, norm = enc.linears(i), enc.norms(i)
    bias = attention_bias(state.pad_mask, T, n, x.dtype, x.device, causal)
    y = x[:, -n:] + scales[0](attend_tail(lin, norm["ln_attn"](x), n, heads, bias))  # (B, n, D)
    return y + scales[1](lin["fc2"](act(lin["fc1"](norm["ln_ffn"](y)))))


# --- preprocessing -------------------------------------------------------------------------------
PROCESSOR_FILES = {
    "tokenizer": ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model"),
    "image_processor": ("preprocessor_config.json", "processor_config.json"),
}


def cached_processor(enc: Encoder, kind: str) -> Any | None:
    """AutoTokenizer / AutoImageProcessor loaded once from ``enc.source``; None when there is none.

    A local directory without the processor's files has none (transformers would build an empty one).
    """
    key = f"_hf_{kind}"
    if key not in enc.__dict__:
        proc, src = None, enc.source
        local = src is not None and os.path.isdir(src)
        if src is not None and (
            not local or any(os.path.isfile(os.path.join(src, f)) for f in PROCESSOR_FILES[kind])
        ):
            tf = transformers_module()
            auto = {"tokenizer": tf.AutoTokenizer, "image_processor": tf.AutoImageProcessor}[kind]
            try:
                proc = auto.from_pretrained(src)
            except (OSError, ValueError, KeyError, TypeError):
                proc = None
        enc.__dict__[key] = proc
    return enc.__dict__[key]


def pad_token_ids(items: list[Any], pad_id: int, vocab_size: int, modality: str) -> dict[str, Tensor]:
    """Lists of token ids -> {"input_ids", "attention_mask"} (B, T), right-padded with ``pad_id``."""
    rows = []
    for j, item in enumerate(items):
        ids = torch.as_tensor(item) if not isinstance(item, str) else None
        if ids is None or ids.ndim != 1 or ids.dtype.is_floating_point or ids.numel() == 0:
            raise ValueError(
                f"encoder {modality!r}: item {j} must be a non-empty list of token ids "
                f"(this encoder has no tokenizer), got {type(item).__name__}"
            )
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise ValueError(f"encoder {modality!r}: item {j} has token ids outside [0, {vocab_size})")
        rows.append(ids.long())
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for j, r in enumerate(rows):
        input_ids[j, : len(r)], mask[j, : len(r)] = r, 1
    return {"input_ids": input_ids, "attention_mask": mask}


def collate_text(enc: Encoder, items: list[Any], max_length: int, pad_id: int, vocab: int) -> dict:
    """All strings through the model's tokenizer, or all token-id lists (padded with ``pad_id``)."""
    if not items:
        raise ValueError(f"encoder {enc.modality!r}: empty batch")
    strings = [isinstance(item, str) for item in items]
    if not any(strings):
        return pad_token_ids(items, pad_id, vocab, enc.modality)
    if not all(strings):
        j = strings.index(False)
        raise ValueError(
            f"encoder {enc.modality!r}: item {j} is a {type(items[j]).__name__} among strings; "
            "give a batch of strings or of token-id lists"
        )
    tok = cached_processor(enc, "tokenizer")
    if tok is None:
        raise ValueError(
            f"encoder {enc.modality!r}: item 0 is a string but this encoder has no tokenizer "
            f"(source {enc.source!r}); pass token-id lists"
        )
    out = tok(list(items), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return dict(out)


def collate_images(enc: Encoder, items: list[Any], shape: tuple[int | None, ...]) -> Tensor:
    """PIL images / image files / float arrays (C, H, W) -> pixel_values (B, C, H, W).

    Arrays are taken as already preprocessed; images and files go through the model's processor.
    ``shape`` is the expected (C, H, W); None entries accept any size equal across the batch.
    """
    if not items:
        raise ValueError(f"encoder {enc.modality!r}: empty batch")
    out: list[Tensor | None] = [None] * len(items)
    images, where = [], []
    for j, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)):
            image_mod = require("PIL.Image", "train")
            if not os.path.isfile(item):
                raise FileNotFoundError(f"encoder {enc.modality!r}: item {j}: no image file {str(item)!r}")
            try:
                item = image_mod.open(item).convert("RGB")
            except OSError as e:
                raise ValueError(
                    f"encoder {enc.modality!r}: item {j}: cannot read image {str(item)!r}: {e}"
                ) from e
        if hasattr(item, "convert") and hasattr(item, "size"):  # a PIL image
            images.append(item)
            where.append(j)
            continue
        try:
            out[j] = torch.as_tensor(item, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"encoder {enc.modality!r}: item {j} is not an image or array") from None
    if images:
        proc = cached_processor(enc, "image_processor")
        if proc is None:
            raise ValueError(
                f"encoder {enc.modality!r}: item {where[0]} is an image but this encoder has no image "
                "processor (built from a config); pass float arrays (C, H, W)"
            )
        pixels = proc(images=images, return_tensors="pt")["pixel_values"]  # (n, C, H, W)
        for j, p in zip(where, pixels, strict=True):
            out[j] = p
    want = tuple(s if s is not None else out[0].shape[k] for k, s in enumerate(shape))  # None: any size
    for j, t in enumerate(out):
        if tuple(t.shape) != want:
            raise ValueError(
                f"encoder {enc.modality!r}: item {j} has shape {tuple(t.shape)}, expected {want}"
            )
    return torch.stack(out)


def split_text_input(inputs: Any, modality: str) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """{"input_ids", "attention_mask"?, "token_type_ids"?} -> the three tensors (absent ones None)."""
    if not isinstance(inputs, dict) or "input_ids" not in inputs:
        got = sorted(inputs) if isinstance(inputs, dict) else type(inputs).__name__
        raise ValueError(f"encoder {modality!r}: expected a dict with 'input_ids', got {got}")
    return inputs["input_ids"], inputs.get("attention_mask"), inputs.get("token_type_ids")


def pad_mask_of(attention_mask: Tensor | None) -> Tensor | None:
    """HF attention mask (1 = real) -> pad mask (True = pad); None when nothing is padded."""
    if attention_mask is None or bool(attention_mask.bool().all()):
        return None
    return ~attention_mask.bool()


def pixel_input(inputs: Any, modality: str) -> Tensor:
    """A pixel_values tensor (B, C, H, W) or a dict holding one."""
    if isinstance(inputs, dict):
        if "pixel_values" not in inputs:
            raise ValueError(f"encoder {modality!r}: input needs key 'pixel_values', got {sorted(inputs)}")
        inputs = inputs["pixel_values"]
    if not isinstance(inputs, Tensor) or inputs.ndim != 4:
        got = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ValueError(f"encoder {modality!r}: expected pixel_values of shape (B, C, H, W), got {got}")
    return inputs


class HFEncoder(Encoder):
    """Base of the HF families: tables of candidate paths say where layers, linears and norms live."""

    LAYERS: tuple[str, ...] = ()
    """Dotted paths (from ``self.model``) to the ModuleList of transformer layers."""
    LINEARS: dict[str, tuple[str, ...]] = {}
    """Canonical linear name -> dotted paths inside one layer."""
    NORMS: dict[str, tuple[str, ...]] = {}
    """Canonical norm name (ln_attn, ln_ffn) -> dotted paths inside one layer."""

    def layer_list(self) -> nn.ModuleList:
        return find_module(self.model, self.LAYERS, "list of transformer layers")

    def block(self, i: int) -> nn.Module:
        return self.layer_list()[i]

    def _named(self, i: int, table: dict[str, tuple[str, ...]]) -> dict[str, nn.Module]:
        layer, out = self.block(i), {}
        for name, paths in table.items():
            try:
                out[name] = find_module(layer, paths, name)
            except AttributeError:
                continue  # e.g. a SwiGLU FFN has no fc1/fc2
        return out

    def linears(self, i: int) -> dict[str, nn.Linear]:
        return self._named(i, self.LINEARS)

    def norms(self, i: int) -> dict[str, nn.Module]:
        return self._named(i, self.NORMS)
