"""Command-line programs over ``models`` and ``inference``: the ``elbolab`` command's subcommands."""
