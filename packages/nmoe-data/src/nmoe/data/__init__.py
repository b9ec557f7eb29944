"""nmoe.data: byte-level BPE tokenizer, dataset prep into .npy shards, mixtures, and a
deterministic rank-sharded loader with exact resume. No torch, no other nmoe package."""

from nmoe.data.errors import DataError, ShardCorruptError, SourceUnavailableError, TokenizerMismatchError
from nmoe.data.loader import Loader, open_loader
from nmoe.data.manifest import Manifest, ShardInfo, SplitInfo
from nmoe.data.mixture import SourceSpec, mixture_probabilities, prep_mixture
from nmoe.data.prep import PrepOptions, dataset_dir, is_prepared, prep_command, prep_option_fields, prepare
from nmoe.data.shards import sha256_file
from nmoe.data.tokenizer import BOS_TOKEN, Tokenizer

__all__ = [
    "BOS_TOKEN",
    "DataError",
    "Loader",
    "Manifest",
    "PrepOptions",
    "ShardCorruptError",
    "ShardInfo",
    "SourceSpec",
    "SourceUnavailableError",
    "SplitInfo",
    "Tokenizer",
    "TokenizerMismatchError",
    "dataset_dir",
    "is_prepared",
    "mixture_probabilities",
    "open_loader",
    "prep_command",
    "prep_mixture",
    "prep_option_fields",
    "prepare",
    "sha256_file",
]
