"""The lockstep backbone: N frozen encoders run block by block on one schedule (DESIGN §1).

Encoders of different depth are aligned from the END: with S = max depth, block i of an
encoder with L blocks runs at schedule step ``i + S - L``. Methods attach at three kinds of
points, and the backbone records the step at which each acts:

- block modules  ``fn(state) -> state`` before/after block i of one encoder, and hooks on the
  block's canonical linears (inside the block; adapters, LoRA, BitFit);
- layer modules  ``fn(step, states) -> states`` that see every modality at a step, after its
  blocks ran, or *instead of* them (PMF runs the frozen blocks itself);
- post modules live in the model (fusion), they see the final sequences.

Everything before the earliest step at which a trainable module acts runs under
``torch.no_grad()``: the frozen prefix costs no activation memory for the backward pass.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .encoders.base import Encoder, EncoderState

States = dict[str, EncoderState]
BlockFn = Callable[[EncoderState], EncoderState]
LayerFn = Callable[[int, States], States]

EMBED_STEP = -1  # the embedding counts as the step before the first block


class LockstepBackbone(nn.Module):
    def __init__(self, encoders: dict[str, Encoder]):
        super().__init__()
        if not encoders:
            raise ValueError("a backbone needs at least one encoder")
        self.encoders = nn.ModuleDict(encoders)
        self.num_steps = max(e.num_layers for e in encoders.values())
        self.enabled = True  # False runs the plain frozen encoders (methods' modules are skipped)
        # recompute each trainable step in backward instead of keeping its activations
        self.gradient_checkpointing = False
        self._before: dict[tuple[str, int], list[BlockFn]] = defaultdict(list)
        self._after: dict[tuple[str, int], list[BlockFn]] = defaultdict(list)
        self._layer: dict[int, list[LayerFn]] = defaultdict(list)
        self._replacing: dict[int, LayerFn] = {}
        self._declared_steps: set[int] = set()
        self._hooks: list[Any] = []

    # --- geometry -----------------------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    def offset(self, modality: str) -> int:
        return self.num_steps - self.encoders[modality].num_layers

    def step_of(self, modality: str, layer: int) -> int:
        return layer + self.offset(modality)

    def layer_at(self, modality: str, step: int) -> int | None:
        """The block of ``modality`` that runs at ``step``, or None if it has not started yet."""
        i = step - self.offset(modality)
        return i if 0 <= i < self.encoders[modality].num_layers else None

    def resolve_layers(self, modality: str, layers: list[int] | None) -> list[int]:
        """Layer indices of one encoder; negative counts from the end; None means all."""
        n = self.encoders[modality].num_layers
        if layers is None:
            return list(range(n))
        out = []
        for i in layers:
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise ValueError(f"layer {i} is out of range for encoder {modality!r} with {n} blocks")
            out.append(j)
        return sorted(set(out))

    # --- attachment points --------------------------------------------------------------------
    def _check_modality(self, modality: str) -> None:
        if modality not in self.encoders:
            raise KeyError(f"no encoder for modality {modality!r}; have {self.modalities}")

    def add_block_module(self, modality: str, layer: int, fn: BlockFn, where: str = "before") -> None:
        self._check_modality(modality)
        table = {"before": self._before, "after": self._after}[where]
        table[(modality, layer)].append(fn)
        self._declared_steps.add(self.step_of(modality, layer))

    def hook(self, modality: str, layer: int, name: str, fn: Callable, on: str = "output") -> None:
        """Hook the canonical linear or norm ``name`` of block ``layer`` (see ``Encoder.linears/norms``).

        on="output": ``fn(x, y) -> y'`` replaces the module's output y (x is its input).
        on="input":  ``fn(x) -> x'`` replaces its input (return x unchanged to only observe it).
        """
        self._check_modality(modality)
        enc = self.encoders[modality]
        modules = {**enc.linears(layer), **enc.norms(layer)}
        if name not in modules:
            raise KeyError(
                f"encoder {modality!r} block {layer} has no module {name!r}; has {sorted(modules)}"
            )
        target = modules[name]
        if on == "output":

            def hook(mod, args, out):
                return fn(args[0], out) if self.enabled else None

            handle = target.register_forward_hook(hook)
        else:

            def pre_hook(mod, args):
                return (fn(args[0]), *args[1:]) if self.enabled else None

            handle = target.register_forward_pre_hook(pre_hook)
        self._hooks.append(handle)
        self._declared_steps.add(self.step_of(modality, layer))

    def add_parallel_to_ffn(self, modality: str, layer: int, fn: Callable[[Tensor], Tensor]) -> None:
        """Run ``fn`` parallel to block ``layer``'s FFN: its output on x' is added to the FFN branch.

        x' is the FFN sub-layer's input, read as the input of ``ln_ffn`` on pre-LN blocks (the
        residual stream before the FFN's LayerNorm) and as the input of ``fc1`` on post-LN blocks
        (the attention sub-layer's normalised output); ``fn(x')`` is added to ``fc2``'s output,
        before the residual add (AdaptFormer, MultiWay-Adapter, UniAdapter's visual branch).
        """
        enc = self.encoders[modality]
        site = "ln_ffn" if enc.pre_norm else "fc1"
        found = {**enc.linears(layer), **enc.norms(layer)}
        missing = [n for n in (site, "fc2") if n not in found]
        if missing:
            kind = "pre-LN" if enc.pre_norm else "post-LN"
            raise ValueError(
                f"encoder {modality!r} ({kind}) block {layer} exposes no {missing}; a module parallel to "
                f"the FFN needs {site!r} and 'fc2' (has {sorted(found)})"
            )
        stash: dict[str, Tensor] = {}

        def capture(x: Tensor) -> Tensor:
            stash["x"] = x  # (B, T, D)
            return x

        def add(_: Tensor, y: Tensor) -> Tensor:
            if "x" not in stash:
                raise RuntimeError(f"encoder {modality!r} block {layer}: fc2 ran before {site!r}")
            return y + fn(stash.pop("x"))

        self.hook(modality, layer, site, capture, on="input")
        self.hook(modality, layer, "fc2", add)

    def add_layer_module(self, step: int, fn: LayerFn, replaces_blocks: bool = False) -> None:
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step {step} is outside the schedule of {self.num_steps} steps")
        if replaces_blocks:
            if step in self._replacing:
                raise ValueError(f"two methods both replace the blocks of step {step}")
            self._replacing[step] = fn
        else:
            self._layer[step].append(fn)
        self._declared_steps.add(step)

    def declare_step(self, step: int) -> None:
        """Declare that something trainable acts at ``step`` (EMBED_STEP for the embeddings)."""
        self._declared_steps.add(step)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # --- where gradients start ----------------------------------------------------------------
    def first_trainable_step(self) -> int:
        """The earliest step that needs autograd; ``num_steps`` if only heads/fusion train."""
        steps = set(self._declared_steps) if self.enabled else set()
        for m, enc in self.encoders.items():
            in_blocks = set()
            for i in range(enc.num_layers):
                params = list(enc.block(i).parameters())
                in_blocks.update(id(p) for p in params)
                if any(p.requires_grad for p in params):
                    steps.add(self.step_of(m, i))
            if any(p.requires_grad for p in enc.parameters() if id(p) not in in_blocks):
                steps.add(EMBED_STEP)
        return min(steps, default=self.num_steps)

    # --- running ------------------------------------------------------------------------------
    def embed(self, inputs: dict[str, Any]) -> States:
        missing = [m for m in self.encoders if m not in inputs or inputs[m] is None]
        if missing:
            raise ValueError(f"batch is missing modality {missing}; the model has {self.modalities}")
        return {m: enc.embed(inputs[m]) for m, enc in self.encoders.items()}

    def run_block(self, modality: str, layer: int, state: EncoderState) -> EncoderState:
        """Block ``layer`` of one encoder with the block modules around it."""
        key = (modality, layer)
        if self.enabled:
            for fn in self._before.get(key, ()):
                state = fn(state)
        state = self.encoders[modality].run_block(layer, state)
        if self.enabled:
            for fn in self._after.get(key, ()):
                state = fn(state)
        return state

    def run_step(self, step: int, states: States) -> States:
        if self.enabled and step in self._replacing:
            states = self._replacing[step](step, states)
        else:
            states = dict(states)
            for m in self.encoders:
                i = self.layer_at(m, step)
                if i is not None:
                    states[m] = self.run_block(m, i, states[m])
        if self.enabled:
            for fn in self._layer.get(step, ()):
                states = fn(step, states)
        return states

    def run_steps(self, states: States, start: int, stop: int, first_trainable: int | None = None) -> States:
        """Steps ``start..stop-1``; those before the first trainable step run without autograd."""
        first = self.first_trainable_step() if first_trainable is None else first_trainable
        grad = torch.is_grad_enabled()
        for step in range(start, stop):
            with torch.set_grad_enabled(grad and step >= first):
                if self.gradient_checkpointing and grad and step >= first and self.training:
                    # non-reentrant: any nesting of states, the RNG replayed for dropout
                    states = checkpoint(self.run_step, step, states, use_reentrant=False)
                else:
                    states = self.run_step(step, states)
        return states

    def finalize(self, states: States) -> States:
        return {m: self.encoders[m].finalize(s) for m, s in states.items()}

    def forward(
        self,
        inputs: dict[str, Any] | None = None,
        states: States | None = None,
        start: int = 0,
        at_first_trainable: Callable[[States], States] | None = None,
    ) -> States:
        """Raw inputs per modality (or the states entering step ``start``) -> final states per
        modality (after each final norm). ``at_first_trainable(states)`` rewrites the states where
        the first trainable module acts, or where the given states start if later (the model
        overwrites absent inputs there, ``mmpeft.missing``)."""
        first = self.first_trainable_step()
        if states is None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and first <= EMBED_STEP):
                states = self.embed(inputs)
            start = 0
        if at_first_trainable is not None:
            cut = max(first, start)
            states = at_first_trainable(self.run_steps(states, start, cut, first))
            start = cut
        return self.finalize(self.run_steps(states, start, self.num_steps, first))

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the plain frozen encoders: every method module is skipped inside this block."""
        old, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = old
