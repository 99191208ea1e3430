"""``python -m pvm_kernels``: the pvm-kernels command line."""
import sys

from .cli import main

sys.exit(main())
