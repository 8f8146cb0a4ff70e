"""elbolab: a workbench for variational inference on Pyro."""

__version__ = "0.1.0"
