"""Exceptions of dbprop."""


class UnsupportedModelError(ValueError):
    """A model (or one of its modules) cannot be compiled into a program."""
