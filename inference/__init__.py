"""Model-agnostic machinery: objectives, the training driver, evaluation, guides,
diagnostics, data loading. Nothing here branches on a model's name."""
