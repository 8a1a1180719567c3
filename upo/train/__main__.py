"""``python -m upo.train`` (also ``torchrun --nproc-per-node N -m upo.train``): the ``upo-train`` command."""
import sys

from upo.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
