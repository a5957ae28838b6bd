"""`python -m dialogue ...`, the same as the `dialogue` console script."""
import sys

from .cli.main import main

sys.exit(main())
