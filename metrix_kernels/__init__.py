"""metrix-kernels: mixup for deep metric learning (Metrix, ICLR 2022), reference and fused."""
from . import family, metrics, ops, pairs, reference
from .api import MetrixLoss, metrix_loss
from .family import FAMILY

__all__ = ["FAMILY", "MetrixLoss", "family", "metrics", "metrix_loss", "ops", "pairs", "reference"]
__version__ = "0.1.0"
