"""Errors raised by nmoe.data; every message says what went wrong and how to fix it."""

from __future__ import annotations


class DataError(Exception):
    """Base class for nmoe.data errors."""


class SourceUnavailableError(DataError):
    """The input files or the Hugging Face hub dataset cannot be read from this machine."""


class ShardCorruptError(DataError):
    """A shard is missing, truncated, of the wrong dtype, or fails its sha256 check."""


class TokenizerMismatchError(DataError):
    """Shards were made with a different tokenizer (or vocab size) than the one expected."""
