"""`python -m medtune` is the `medtune` command."""
import sys

from medtune.cli import main

sys.exit(main())
