"""The compiler's one error type (no heavy imports: the worker imports this package too)."""


class ModelError(ValueError):
    """The model cannot be compiled; the message names the model file and, where it applies,
    the node (index, name, operator type)."""
