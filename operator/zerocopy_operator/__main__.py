"""`python -m zerocopy_operator [options]` runs the operator, as `zerocopy operator` does."""

import sys

from .cli import main

main(["operator", *sys.argv[1:]])
