"""python -m genart: the same command line as the `genart` script."""

from genart.cli import main

main()
