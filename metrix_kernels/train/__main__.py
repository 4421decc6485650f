"""python -m metrix_kernels.train: the same as metrix-train."""
import sys

from .cli import main

sys.exit(main())
