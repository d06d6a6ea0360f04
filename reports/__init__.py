"""Measuring and presenting: `bench` (tree vs plain decoding, measured beside predicted), `plots`, `report`.
Imports the stages below it (decoding, search, the core); imported only by the CLI and the demo."""
