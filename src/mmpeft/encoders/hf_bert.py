"""`hf_bert`: Hugging Face BERT-family text encoders (post-LN), one adapter for several models.

- BERT: Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for Language
  Understanding", NAACL 2019, arXiv 1810.04805.
- RoBERTa (and XLM-R, CamemBERT): Liu et al., arXiv 1907.11692.
- MiniLM (a ``BertModel``, e.g. all-MiniLM-L6-v2): Wang et al., NeurIPS 2020, arXiv 2002.10957.
- DistilBERT: Sanh et al., arXiv 1910.01108.

The HF class is chosen by the config's ``model_type`` (``AutoModel``). Input: a dict with
``input_ids`` (B, T), optional ``attention_mask`` (1 = real token) and ``token_type_ids``.
Blocks are post-LN: ``ln_attn`` / ``ln_ffn`` are the LayerNorms after each residual add.
Options: ``pooling`` ("cls" or "mean"), ``max_length`` (tokenizer truncation) and
``attn_implementation`` ("eager" / "sdpa", passed to transformers).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..registry import register_encoder
from ._hf_common import (
    HFEncoder,
    attention_bias,
    call_layer,
    collate_text,
    find_module,
    hf_config,
    load_pretrained,
    pad_mask_of,
    post_norm_tail,
    split_text_input,
    transformers_module,
)
from .base import EncoderState

TEXT_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert")
ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert")  # positions start after the padding index
POOLINGS = ("cls", "mean")


@register_encoder("hf_bert")
class HFBertEncoder(HFEncoder):
    """A BERT-family ``transformers`` model behind the encoder interface."""

    pre_norm = False
    LAYERS = ("encoder.layer", "encoder.layers", "transformer.layer", "layers")
    LINEARS = {
        "q": ("attention.self.query", "attention.q_lin", "attention.q_proj"),
        "k": ("attention.self.key", "attention.k_lin", "attention.k_proj"),
        "v": ("attention.self.value", "attention.v_lin", "attention.v_proj"),
        "o": ("attention.output.dense", "attention.out_lin", "attention.o_proj"),
        "fc1": ("intermediate.dense", "ffn.lin1"),
        "fc2": ("output.dense", "ffn.lin2"),
    }
    NORMS = {
        "ln_attn": ("attention.output.LayerNorm", "sa_layer_norm"),
        "ln_ffn": ("output.LayerNorm", "output_layer_norm"),
    }
    ACTIVATION = ("intermediate.intermediate_act_fn", "ffn.activation")

    def __init__(self, model: nn.Module, modality: str, pooling: str = "cls", max_length: int | None = None):
        super().__init__(model, modality)
        cfg = model.config
        if cfg.model_type not in TEXT_TYPES:
            raise ValueError(
                f"encoder {modality!r} (hf_bert): model_type {cfg.model_type!r} is not a BERT-family "
                f"model; supported: {', '.join(TEXT_TYPES)}"
            )
        if pooling not in POOLINGS:
            raise ValueError(f"encoder {modality!r} (hf_bert): pooling {pooling!r} is not one of {POOLINGS}")
        self.dim, self.num_layers, self.pooling = cfg.hidden_size, cfg.num_hidden_layers, pooling
        offset = cfg.pad_token_id + 1 if cfg.model_type in ROBERTA_LIKE else 0
        self.max_positions = cfg.max_position_embeddings - offset  # longest sequence the model embeds
        self.max_length = min(max_length or self.max_positions, self.max_positions)

    @property
    def max_tokens(self) -> int:
        return self.max_positions

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        modality: str,
        pooling: str = "cls",
        max_length: int | None = None,
        attn_implementation: str | None = None,
    ) -> HFBertEncoder:
        """A local directory (offline) or a hub name; the HF class follows the saved model_type."""
        tf = transformers_module()
        what = f"encoder {modality!r} (hf_bert)"
        model = load_pretrained(tf.AutoModel, path, attn_implementation, what, ignore=("pooler.",))
        encoder = cls(model.eval(), modality, pooling, max_length)
        encoder.source = path
        return encoder

    @classmethod
    def from_config(
        cls,
        config: dict,
        modality: str,
        pooling: str = "cls",
        max_length: int | None = None,
        attn_implementation: str | None = None,
    ) -> HFBertEncoder:
        """Random weights from a HF config dict (``model_type`` defaults to "bert")."""
        tf = transformers_module()
        cfg = hf_config(config, "bert", f"encoders.{modality}.config")
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = tf.AutoModel.from_config(cfg, **kwargs)
        return cls(model.eval(), modality, pooling, max_length)

    @property
    def is_distilbert(self) -> bool:
        return self.model.config.model_type == "distilbert"

    # --- the encoder interface ----------------------------------------------------------------
    def embed(self, inputs: Any) -> EncoderState:
        self.check_input(inputs)
        ids, mask, token_types = split_text_input(inputs, self.modality)
        if ids.ndim != 2:
            raise ValueError(f"encoder {self.modality!r}: input_ids must be (B, T), got {tuple(ids.shape)}")
        if ids.shape[1] > self.max_positions:
            raise ValueError(
                f"encoder {self.modality!r}: {ids.shape[1]} tokens exceed the model's {self.max_positions} positions"
            )
        if self.is_distilbert:
            x = self.model.embeddings(ids)  # (B, T, D)
        else:
            x = self.model.embeddings(input_ids=ids, token_type_ids=token_types)  # (B, T, D)
        return EncoderState(x, pad_mask_of(mask), n_prefix=1)  # [CLS] / <s>

    def run_block(self, i: int, state: EncoderState) -> EncoderState:
        x = state.tokens  # (B, T, D); T may exceed the embedded length when methods add tokens
        bias = attention_bias(state.pad_mask, x.shape[1], x.shape[1], x.dtype, x.device)
        return state.replace(tokens=call_layer(self.block(i), x, bias))

    def run_block_tail(self, i: int, state: EncoderState, n: int) -> Tensor:
        """Queries and FFN of the last n rows only (eval mode; training mode runs the whole block)."""
        try:
            act = find_module(self.block(i), self.ACTIVATION, "activation")
        except AttributeError:
            act = None  # a plain-function activation: no module to call
        if self.training or act is None:
            return super().run_block_tail(i, state, n)
        return post_norm_tail(self, i, state, n, self.model.config.num_attention_heads, act)

    def reference_forward(self, inputs: Any) -> Tensor:
        ids, mask, token_types = split_text_input(inputs, self.modality)
        kwargs = {"input_ids": ids, "attention_mask": mask}
        if token_types is not None and not self.is_distilbert:
            kwargs["token_type_ids"] = token_types
        return self.model(**kwargs).last_hidden_state

    def collate(self, items: list[Any]) -> dict[str, Tensor]:
        """Strings via the checkpoint's tokenizer, or token-id lists for a model built from a config."""
        cfg = self.model.config
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        return collate_text(self, items, self.max_length, pad, cfg.vocab_size)
