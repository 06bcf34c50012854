"""Training on Hugging Face Accelerate: ``Trainer(config, output_dir).fit()``; ``evaluate_run`` re-scores a run."""

from .evaluation import evaluate, evaluate_run
from .setup import build_components
from .trainer import StopTraining, Trainer, TrainingError, TrainState

__all__ = [
    "StopTraining",
    "TrainState",
    "Trainer",
    "TrainingError",
    "build_components",
    "evaluate",
    "evaluate_run",
]
