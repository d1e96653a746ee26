"""`python -m llamactl` runs the command-line interface."""

from llamactl.cli.root import main

main()
