"""Command-line programs over ``models`` and ``inference`` (run as ``python -m scripts.NAME``)."""
