"""`python -m dialogue.cli ...`, the same as the `dialogue` console script."""
import sys

from .main import main

sys.exit(main())
