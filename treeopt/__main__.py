"""`python -m treeopt` (and `accelerate launch -m treeopt`): the same as the `treeopt` command."""

from treeopt.cli import main

main()
