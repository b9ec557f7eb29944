"""Errors raised by nmoe.kernels."""


class UnsupportedInput(ValueError):
    """Input that the kernels refuse: wrong dtype, alignment, device or GPU architecture."""
