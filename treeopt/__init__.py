"""treeopt: calibrate Medusa heads, search the speculative-decoding tree, decode, bench and report.

The product namespace. `treeopt.core` is the ground floor; `treeopt.cli`, `treeopt.demo` and
`treeopt.info` are the top of the pipeline (see the README's layout). Nothing is imported here, so
importing `treeopt.core` loads no package above it."""

__version__ = "0.2.0"
