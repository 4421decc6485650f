"""The thin trainer: datasets, models, the loop with its metrics, and the metrix-train command line."""
from .loop import Config, Trainer

__all__ = ["Config", "Trainer"]
