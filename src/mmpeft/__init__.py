"""mmpeft: parameter-efficient fine-tuning of multimodal models."""

__version__ = "0.1.0"

from .adapter_io import load_adapter, load_model_with_adapter, save_adapter  # noqa: E402
from .backbone import LockstepBackbone  # noqa: E402
from .config import ConfigError  # noqa: E402
from .encoders.base import Encoder, EncoderState  # noqa: E402
from .methods.base import Method, MethodConfig  # noqa: E402
from .model import MultimodalModel, build_model  # noqa: E402
from .registry import DATASETS, ENCODERS, METHODS, TASKS  # noqa: E402
from .report import format_parameter_report, parameter_counts  # noqa: E402

__all__ = [
    "ConfigError",
    "DATASETS",
    "ENCODERS",
    "Encoder",
    "EncoderState",
    "LockstepBackbone",
    "METHODS",
    "Method",
    "MethodConfig",
    "MultimodalModel",
    "TASKS",
    "build_model",
    "format_parameter_report",
    "load_adapter",
    "load_model_with_adapter",
    "parameter_counts",
    "save_adapter",
]
