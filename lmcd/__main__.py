"""`python -m lmcd` is the `lmcd` command."""

from lmcd.cli import main

main()
