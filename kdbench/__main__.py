"""`python -m kdbench [overrides]`: the same as the `kdbench` command."""
from kdbench.cli import main

main()
