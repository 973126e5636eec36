"""`python -m cropformer COMMAND ...` = the `cropformer` console command."""
import sys

from .cli import main

sys.exit(main())
