"""``python -m upo.train``: the same entry point as ``upo-train`` (also for ``torchrun -m upo.train``)."""
import sys

from upo.cli import main

if __name__ == "__main__":
    sys.exit(main())
