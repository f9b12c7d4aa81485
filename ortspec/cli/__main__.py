"""`python -m ortspec.cli`, as the `ortspec` script."""

from . import main

main()
