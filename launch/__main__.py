"""`python -m launch ...` runs the same command line as the `eva-ray` console script."""

import sys

from launch.cli import main

sys.exit(main())
