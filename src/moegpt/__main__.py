"""`python -m moegpt`: the same command line as the `moegpt` console script."""

import sys

from moegpt.cli import main

sys.exit(main())
