"""``python -m stripeconv`` (and ``torchrun ... -m stripeconv``): the command line of :mod:`stripeconv.cli`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
