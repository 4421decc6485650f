"""metrix-kernels: mixup for deep metric learning (Metrix, ICLR 2022), reference and fused."""
from . import family, pairs, reference
from .api import MetrixLoss, metrix_loss
from .family import FAMILY

__all__ = ["FAMILY", "MetrixLoss", "family", "metrix_loss", "pairs", "reference"]
__version__ = "0.1.0"
