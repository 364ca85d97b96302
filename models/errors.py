"""Errors of the model library that every layer above may catch."""
from __future__ import annotations


class TrainingError(RuntimeError):
    """A training run cannot start or finish (bad dataset, no labelled rows, ...): a clear message."""
