"""`python -m tunesmith ...` is the `tunesmith` command; torchrun starts it so: `torchrun --nproc-per-node N -m
tunesmith train CONFIG`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
