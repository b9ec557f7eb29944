"""Deterministic, rank-sharded, memory-mapped batches with exact resume.

Sampling model. A split of a dataset is one token stream (its shards concatenated). Sample `j` is
the window of `seq_len + 1` tokens starting at `j * seq_len` (windows overlap by one token so every
token is a target once); there are `(tokens - 1) // seq_len` samples.

Global step `s` consumes the `G = batch_size * world_size` global slots `s*G ... s*G + G - 1`;
rank `r` gets slots `s*G + r*batch_size ...` (+ batch_size). Each slot is given to a source (always
source 0 without a mixture; with one, by a Weyl low-discrepancy sequence over the sources'
probabilities), and the `c`-th slot of source `i` reads that source's sample
`perm(seed, i, c // N_i)[c % N_i]`: every epoch is a fresh permutation, every sample appears
exactly once per epoch, and ranks never overlap. The state is (global sequences handed out, per-source slot
counts): any rank layout whose global batch divides the first resumes it exactly.
The val split is read in order (no permutation) and its batches stop before any source wraps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nmoe.data.errors import DataError, ShardCorruptError, TokenizerMismatchError
from nmoe.data.manifest import MANIFEST, Manifest, check_tokenizers
from nmoe.data.mixture import SourceSpec, mixture_probabilities, mixture_sources
from nmoe.data.shards import open_shard

__all__ = ["Loader", "SourceSpec", "mixture_probabilities", "open_loader"]

STATE_FORMAT = "nmoe.data.loader/2"
STATE_FORMATS = ("nmoe.data.loader/1", STATE_FORMAT)  # /1: no "slots" (step x batch_size x world_size)
_WEYL = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: consecutive multiples spread evenly mod 2^64


class _TokenStream:
    """One split of one prepared dataset as a single memory-mapped token stream."""

    def __init__(self, manifest: Manifest, split: str, verify: bool, vocab_limit: int | None):
        info = manifest.split(split)
        self.manifest, self.vocab_limit, self.files = manifest, vocab_limit, [s.file for s in info.shards]
        opened = [open_shard(manifest.dir, s, manifest.dtype, verify=verify) for s in info.shards]
        self.shards = [tokens for tokens, _ in opened]
        known = [(max_id, s.file) for s, (_, max_id) in zip(info.shards, opened) if max_id is not None]
        if vocab_limit is not None and known and max(known)[0] >= vocab_limit:
            max_id, file = max(known)
            raise TokenizerMismatchError(
                f"shard {manifest.dir / file} holds token id {max_id} (the largest of split {split!r}), but the "
                f"model has only {vocab_limit} ids (vocab_limit; the dataset's tokenizer reports vocab "
                f"{manifest.vocab_size}); set the model vocab size to at least {max_id + 1}, or re-prep the data "
                f"with a tokenizer of at most {vocab_limit} tokens (new --name)"
            )
        sizes = np.array([s.size for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.tokens = int(self.starts[-1])

    def read(self, start: int, length: int, out: np.ndarray) -> None:
        """Copy tokens [start, start+length) into `out` (int64 [length]), across shard edges."""
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        filled = 0
        while filled < length:
            lo = start + filled - int(self.starts[shard])
            take = min(length - filled, self.shards[shard].size - lo)
            out[filled : filled + take] = self.shards[shard][lo : lo + take]
            if self.vocab_limit is not None and take and int(out[filled : filled + take].max()) >= self.vocab_limit:
                self._out_of_vocab(shard, int(out[filled : filled + take].max()))
            filled += take
            shard += 1

    def _out_of_vocab(self, shard: int, token_id: int) -> None:
        """Shard ids beyond vocab_limit that its manifest did not record: the file changed after prep."""
        raise ShardCorruptError(
            f"shard {self.manifest.dir / self.files[shard]} holds token id {token_id}, but the model has only "
            f"{self.vocab_limit} ids and its manifest entry does not show that id (the file changed after prep, or the "
            "manifest predates recorded maxima). Check every shard with data.verify_shards = true, then re-prep"
        )


class Loader:
    """Batches `(inputs, targets)` of int64 `[batch_size, seq_len]` for one data-parallel rank."""

    def __init__(
        self,
        sources: list[SourceSpec],
        *,
        split: str,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        expect_tokenizer_sha256: str | None = None,
        expect_vocab_size: int | None = None,
        verify: bool = True,
        vocab_limit: int | None = None,
    ):
        """Open and check every source's shards; see open_loader for the arguments."""
        _check_layout(seq_len, batch_size, rank, world_size)
        if split not in ("train", "val"):
            raise DataError(f"split must be 'train' or 'val', got {split!r}")
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        manifests = [Manifest.load(s.path) for s in sources]
        check_tokenizers(manifests, expect_tokenizer_sha256, expect_vocab_size)
        self.manifests = manifests
        self.vocab_size = manifests[0].vocab_size
        self.tokenizer_sha256 = manifests[0].tokenizer["sha256"]
        self.streams = [_TokenStream(m, split, verify, vocab_limit) for m in manifests]
        self.samples = np.array([(s.tokens - 1) // seq_len if s.tokens > 1 else 0 for s in self.streams])
        for m, n in zip(manifests, self.samples):
            if n == 0:
                raise DataError(
                    f"{m.dir}: split {split!r} has too few tokens for one sequence of {seq_len + 1}; "
                    f"prep more data (or a larger --val-tokens / --val-fraction for val) or lower seq_len"
                )
        self.probabilities = mixture_probabilities([(s.weight, s.temperature) for s in sources])
        self._thresholds = _thresholds(self.probabilities)
        self._offset = int(np.random.SeedSequence([seed, 0x5EED]).generate_state(1, np.uint64)[0])
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self.step = 0
        self.consumed = np.zeros(len(sources), dtype=np.int64)

    # ------------------------------------------------------------- public
    @property
    def tokens_per_batch(self) -> int:
        """Input tokens per batch on this rank (batch_size * seq_len)."""
        return self.batch_size * self.seq_len

    @property
    def epochs(self) -> list[int]:
        """Completed passes over each source."""
        return [int(c // n) for c, n in zip(self.consumed, self.samples)]

    @property
    def epoch(self) -> int:
        """Completed passes over the first (for a plain dataset: the only) source."""
        return self.epochs[0]

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """Next `(inputs, targets)`, each int64 `[batch_size, seq_len]`; targets are inputs shifted by one."""
        batch, counts = self._batch(self.step, self.consumed)
        self.step += 1
        self.consumed += counts
        return batch

    def val_batches(self, max_batches: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """The fixed validation batches of this rank (first `max_batches`); does not move the state."""
        if self.split != "val":
            raise DataError("val_batches() needs a loader opened with split='val'")
        out, consumed, step = [], np.zeros_like(self.consumed), 0
        while max_batches is None or len(out) < max_batches:
            if self._step_counts(step, consumed) is None:
                break
            batch, counts = self._batch(step, consumed)
            out.append(batch)
            consumed, step = consumed + counts, step + 1
        if not out:
            raise DataError(
                f"val split has {int(self.samples.min())} sequences, fewer than one global batch of "
                f"{self.batch_size * self.world_size}; prep a larger val split or use a smaller batch"
            )
        return out

    def state_dict(self) -> dict:
        """JSON-serialisable position; the same for every rank, so rank 0's copy resumes all ranks.

        The position is global (`slots`: sequences handed out over all ranks), so a loader of another
        batch_size x world_size resumes it exactly when its global batch divides `slots`.
        """
        return {
            "format": STATE_FORMAT,
            "split": self.split,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "step": self.step,
            "slots": self.step * self.batch_size * self.world_size,
            "consumed": [int(c) for c in self.consumed],
            "sources": self._source_ids(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()` output (of any rank layout): the following batches equal an uninterrupted run's."""
        if state.get("format") not in STATE_FORMATS:
            raise DataError(f"loader state format {state.get('format')!r} is not one of {STATE_FORMATS}")
        for key in ("split", "seed", "seq_len", "sources"):
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise DataError(
                    f"loader state has {key}={state[key]!r} but this loader has {mine!r}; exact resume needs "
                    f"the same {key} (restore the run's data config, or start a fresh run)"
                )
        slots = int(state.get("slots", int(state["step"]) * int(state["batch_size"]) * int(state["world_size"])))
        per_step = self.batch_size * self.world_size
        if slots % per_step:
            raise DataError(
                f"loader state stopped after {slots} sequences over all ranks, not a multiple of this loader's "
                f"{per_step} (batch_size {self.batch_size} x world size {self.world_size}); resume with a global "
                "batch that divides it"
            )
        self.step = slots // per_step
        self.consumed = np.array(state["consumed"], dtype=np.int64)

    # ------------------------------------------------------------- internals
    def _source_ids(self) -> list[str]:
        return [m.sha256 for m in self.manifests]

    def _slot_sources(self, step: int) -> np.ndarray:
        g = self.batch_size * self.world_size
        if len(self.streams) == 1:
            return np.zeros(g, dtype=np.int64)
        k = np.arange(step * g, (step + 1) * g, dtype=np.uint64)
        u = (k + np.uint64(1)) * np.uint64(_WEYL) + np.uint64(self._offset)  # wraps mod 2^64
        return np.searchsorted(self._thresholds, u, side="right").astype(np.int64)

    def _slot_ordinals(self, step: int, consumed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For every global slot of `step`: its source, and the source's running slot count."""
        src = self._slot_sources(step)
        onehot = src[:, None] == np.arange(len(self.streams))[None, :]
        before = np.cumsum(onehot, axis=0) - onehot
        ordinal = consumed[src] + before[np.arange(src.size), src]
        return src, ordinal, onehot.sum(axis=0)

    def _step_counts(self, step: int, consumed: np.ndarray):
        """Per-source counts of `step`, or None when it would wrap a val source."""
        _, ordinal, counts = self._slot_ordinals(step, consumed)
        return None if np.any(consumed + counts > self.samples) else counts

    def _batch(self, step: int, consumed: np.ndarray):
        src, ordinal, counts = self._slot_ordinals(step, consumed)
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        window = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for row, (i, c) in enumerate(zip(src[mine].tolist(), ordinal[mine].tolist())):
            sample = self._sample_index(i, c)
            self.streams[i].read(sample * self.seq_len, self.seq_len + 1, window[row])
        inputs = np.ascontiguousarray(window[:, :-1])
        targets = np.ascontiguousarray(window[:, 1:])
        return (inputs, targets), counts

    def _sample_index(self, source: int, ordinal: int) -> int:
        n = int(self.samples[source])
        epoch, pos = divmod(ordinal, n)
        if self.split == "val":
            return pos
        key = (source, epoch)
        perm = self._perms.get(key)
        if perm is None:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, source, epoch])))
            perm = rng.permutation(n)
            for old in [k for k in self._perms if k[0] == source and k[1] < epoch - 1]:
                del self._perms[old]
            self._perms[key] = perm
        return int(perm[pos])


def _thresholds(p: np.ndarray) -> np.ndarray:
    """uint64 cut points of the cumulative probabilities (all but the last, which is 2^64)."""
    cum = np.cumsum(p)[:-1]
    return np.array([min(int(c * 2.0**64), (1 << 64) - 1) for c in cum], dtype=np.uint64)


def _check_layout(seq_len: int, batch_size: int, rank: int, world_size: int) -> None:
    if seq_len < 1 or batch_size < 1:
        raise DataError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")


def open_loader(
    path: str | Path,
    *,
    split: str = "train",
    seq_len: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    expect_tokenizer_sha256: str | None = None,
    expect_vocab_size: int | None = None,
    verify: bool = True,
    vocab_limit: int | None = None,
) -> Loader:
    """Loader over a prepared dataset dir, a mixture TOML, or a prep-mixture dir.

    Batches are `(inputs, targets)` int64 `[batch_size, seq_len]`. `verify` checks every shard's
    sha256 up front (reads all shards of the split once); size and dtype are always checked.
    `expect_vocab_size`: the datasets' tokenizer must have exactly this vocab (TokenizerMismatchError).
    `vocab_limit` (e.g. the model's vocab size): every token id must be < it, checked at open from
    each shard's max id in the manifest (no scan), so an out-of-range id fails here, naming the shard,
    rather than deep in the embedding. Datasets prepared before manifest format 2 do not record the
    max id: with `verify` it is found during the sha256 pass; without `verify` their ids are unchecked.
    """
    path = Path(path)
    if path.is_dir() and (path / MANIFEST).is_file():
        sources = [SourceSpec(path)]
    elif (path.is_dir() and (path / "mixture.json").is_file()) or path.suffix == ".toml":
        sources = mixture_sources(path)
    else:
        raise DataError(
            f"{path} is neither a prepared dataset (no {MANIFEST}) nor a mixture (.toml or dir with mixture.json); "
            "run `uv run nmoe-data prep ...` or `uv run nmoe-data prep-mixture --mixture FILE` first"
        )
    return Loader(
        sources,
        split=split,
        seq_len=seq_len,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        expect_tokenizer_sha256=expect_tokenizer_sha256,
        expect_vocab_size=expect_vocab_size,
        verify=verify,
        vocab_limit=vocab_limit,
    )
