"""`python -m cropformer.info`: the same as `cropformer info` (see `cropformer.cli.info`)."""
import sys

from .cli import run
from .cli.info import main

if __name__ == "__main__":
    sys.exit(run(main))
