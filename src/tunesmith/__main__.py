"""`python -m tunesmith ...` runs the same command line as the `tunesmith` script."""

import sys

from tunesmith.cli.main import main

sys.exit(main())
