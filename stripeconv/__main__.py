"""``python -m stripeconv`` (and ``torchrun ... -m stripeconv``): the command line of :mod:`stripeconv.cli`."""
from .cli import run

if __name__ == "__main__":
    run()
