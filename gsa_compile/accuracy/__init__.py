"""Accuracy tooling: synthetic long-context retrieval tasks, a byte-level natural-text corpus
and the project's own small long-context models trained on them (see tasks.py, text.py and
model.py)."""

from .tasks import TASKS, VOCAB_SIZE, Sample, accuracy_table, answer_accuracy, generate_answers, make_samples, make_sequence
from .model import ASSET_DIR, MODEL_CONFIGS, accuracy_model_config, build_accuracy_model, load_accuracy_model, save_accuracy_model

__all__ = [
    "TASKS", "VOCAB_SIZE", "Sample", "accuracy_table", "answer_accuracy", "generate_answers",
    "make_samples", "make_sequence", "ASSET_DIR", "MODEL_CONFIGS", "accuracy_model_config",
    "build_accuracy_model", "load_accuracy_model", "save_accuracy_model",
]
