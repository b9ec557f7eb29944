"""Deterministic, rank-sharded, memory-mapped batches with exact resume.

Sampling model. A split of a dataset is one token stream (its shards concatenated). Sample `j` is
the window of `seq_len + 1` tokens starting at `j * seq_len` (windows overlap by one token so every
token is a target once); there are `(tokens - 1) // seq_len` samples.

Global step `s` consumes the `G = batch_size * world_size` global slots `s*G ... s*G + G - 1`;
rank `r` gets slots `s*G + r*batch_size ...` (+ batch_size). Each slot is given to a source (always
source 0 without a mixture; with one, by a Weyl low-discrepancy sequence over the sources'
probabilities), and the `c`-th slot of source `i` reads that source's sample
`perm(seed, i, c // N_i)[c % N_i]`: every epoch is a fresh permutation, every sample appears
exactly once per epoch, and ranks never overlap. The state is `(step, per-source slot counts)`.
The val split is read in order (no permutation) and its batches stop before any source wraps.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nmoe.data.errors import DataError, TokenizerMismatchError
from nmoe.data.manifest import MANIFEST, Manifest
from nmoe.data.shards import open_shard

STATE_FORMAT = "nmoe.data.loader/1"
_WEYL = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: consecutive multiples spread evenly mod 2^64


class _TokenStream:
    """One split of one prepared dataset as a single memory-mapped token stream."""

    def __init__(self, manifest: Manifest, split: str, verify: bool):
        info = manifest.split(split)
        self.manifest = manifest
        self.shards = [open_shard(manifest.dir, s, manifest.dtype, verify=verify) for s in info.shards]
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
            out[filled:filled + take] = self.shards[shard][lo:lo + take]
            filled += take
            shard += 1


@dataclass(frozen=True)
class SourceSpec:
    """One dataset of a loader: its prepared dir, mixture weight and temperature."""

    path: Path
    weight: float = 1.0
    temperature: float = 1.0


class Loader:
    """Batches `(inputs, targets)` of int64 `[batch_size, seq_len]` for one data-parallel rank."""

    def __init__(self, sources: list[SourceSpec], *, split: str, seq_len: int, batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0,
                 expect_tokenizer_sha256: str | None = None, expect_vocab_size: int | None = None,
                 verify: bool = True):
        """Open and check every source's shards; see open_loader for the arguments."""
        _check_layout(seq_len, batch_size, rank, world_size)
        if split not in ("train", "val"):
            raise DataError(f"split must be 'train' or 'val', got {split!r}")
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        manifests = [Manifest.load(s.path) for s in sources]
        _check_tokenizers(manifests, expect_tokenizer_sha256, expect_vocab_size)
        self.manifests = manifests
        self.vocab_size = manifests[0].vocab_size
        self.tokenizer_sha256 = manifests[0].tokenizer["sha256"]
        self.streams = [_TokenStream(m, split, verify) for m in manifests]
        self.samples = np.array([(s.tokens - 1) // seq_len if s.tokens > 1 else 0 for s in self.streams])
        for m, n in zip(manifests, self.samples):
            if n == 0:
                raise DataError(
                    f"{m.dir}: split {split!r} has too few tokens for one sequence of {seq_len + 1}; "
                    f"prep more data (or a larger --val-tokens / --val-fraction for val) or lower seq_len")
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
                f"{self.batch_size * self.world_size}; prep a larger val split or use a smaller batch")
        return out

    def state_dict(self) -> dict:
        """JSON-serialisable position; the same for every rank, so rank 0's copy resumes all ranks."""
        return {"format": STATE_FORMAT, "split": self.split, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "world_size": self.world_size, "step": self.step,
                "consumed": [int(c) for c in self.consumed], "sources": self._source_ids()}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()` output: the following batches equal an uninterrupted run's."""
        if state.get("format") != STATE_FORMAT:
            raise DataError(f"loader state format {state.get('format')!r} is not {STATE_FORMAT!r}")
        for key in ("split", "seed", "seq_len", "batch_size", "world_size", "sources"):
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise DataError(
                    f"loader state has {key}={state[key]!r} but this loader has {mine!r}; exact resume needs "
                    f"the same {key} (restore the run's data config, or start a fresh run)")
        self.step = int(state["step"])
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


def mixture_probabilities(weights_temperatures: list[tuple[float, float]]) -> np.ndarray:
    """Sampling probability of each source: p_i proportional to weight_i ** (1 / temperature_i)."""
    for w, t in weights_temperatures:
        if not w > 0 or not t > 0:
            raise DataError(f"mixture weight and temperature must be > 0, got weight={w}, temperature={t}")
    raw = np.array([w ** (1.0 / t) for w, t in weights_temperatures], dtype=np.float64)
    return raw / raw.sum()


def _thresholds(p: np.ndarray) -> np.ndarray:
    """uint64 cut points of the cumulative probabilities (all but the last, which is 2^64)."""
    cum = np.cumsum(p)[:-1]
    return np.array([min(int(c * 2.0**64), (1 << 64) - 1) for c in cum], dtype=np.uint64)


def _check_layout(seq_len: int, batch_size: int, rank: int, world_size: int) -> None:
    if seq_len < 1 or batch_size < 1:
        raise DataError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")


def _check_tokenizers(manifests: list[Manifest], expect_sha: str | None, expect_vocab: int | None) -> None:
    first = manifests[0]
    for m in manifests:
        if m.tokenizer["sha256"] != first.tokenizer["sha256"] or m.vocab_size != first.vocab_size:
            raise TokenizerMismatchError(
                f"mixture datasets {first.dir} and {m.dir} were tokenized differently "
                f"(sha256 {first.tokenizer['sha256'][:12]} vs {m.tokenizer['sha256'][:12]}); "
                "prep every dataset of a mixture with the same --tokenizer")
        if expect_sha is not None and m.tokenizer["sha256"] != expect_sha:
            raise TokenizerMismatchError(
                f"{m.dir} was tokenized with tokenizer sha256 {m.tokenizer['sha256'][:12]}, but the config's "
                f"tokenizer has {expect_sha[:12]}; point the config at {m.dir / m.tokenizer['file']} or "
                "re-prep the data with the config's tokenizer (new --name)")
        if expect_vocab is not None and m.vocab_size != expect_vocab:
            raise TokenizerMismatchError(
                f"{m.dir} has vocab size {m.vocab_size} but {expect_vocab} was expected; "
                f"set the model vocab size to {m.vocab_size} or re-prep with a matching tokenizer")


# ----------------------------------------------------------------- mixtures
def read_mixture(path: str | Path) -> tuple[dict, list[dict]]:
    """Parse a mixture TOML: top-level `name`/`output` and `[[dataset]]` tables (paths relative to it)."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"cannot read mixture file {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise DataError(f"mixture file {path} is not valid TOML: {e}") from e
    entries = doc.get("dataset")
    if not isinstance(entries, list) or not entries:
        raise DataError(f"mixture file {path} needs at least one [[dataset]] table")
    for i, entry in enumerate(entries):
        for key in ("weight", "temperature"):
            value = entry.get(key, 1.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise DataError(f"mixture file {path}: [[dataset]] #{i + 1} has {key} = {value!r}; "
                                f"{key} must be a number > 0 (e.g. {key} = 1.0)")
    return doc, entries


def mixture_sources(path: str | Path) -> list[SourceSpec]:
    """SourceSpecs of a mixture TOML file or a `prep-mixture` output dir (mixture.json)."""
    import json

    path = Path(path)
    if path.is_dir():
        doc = json.loads((path / "mixture.json").read_text(encoding="utf-8"))
        return [SourceSpec(Path(d["path"]), d["weight"], d["temperature"]) for d in doc["datasets"]]
    from nmoe.data.mixture import entry_dir

    doc, entries = read_mixture(path)
    specs = []
    for entry in entries:
        d = entry_dir(path, doc, entry)
        if not (d / MANIFEST).is_file():
            raise DataError(f"mixture dataset {d} is not prepared; run `uv run nmoe-data prep-mixture --mixture {path}`")
        specs.append(SourceSpec(d, float(entry.get("weight", 1.0)), float(entry.get("temperature", 1.0))))
    return specs


def open_loader(path: str | Path, *, split: str = "train", seq_len: int, batch_size: int, rank: int = 0,
                world_size: int = 1, seed: int = 0, expect_tokenizer_sha256: str | None = None,
                expect_vocab_size: int | None = None, verify: bool = True) -> Loader:
    """Loader over a prepared dataset dir, a mixture TOML, or a prep-mixture dir.

    Batches are `(inputs, targets)` int64 `[batch_size, seq_len]`. `verify` checks every shard's
    sha256 up front (reads all shards of the split once); size and dtype are always checked.
    """
    path = Path(path)
    if path.is_dir() and (path / MANIFEST).is_file():
        sources = [SourceSpec(path)]
    elif (path.is_dir() and (path / "mixture.json").is_file()) or path.suffix == ".toml":
        sources = mixture_sources(path)
    else:
        raise DataError(
            f"{path} is neither a prepared dataset (no {MANIFEST}) nor a mixture (.toml or dir with mixture.json); "
            "run `uv run nmoe-data prep ...` or `uv run nmoe-data prep-mixture --mixture FILE` first")
    return Loader(sources, split=split, seq_len=seq_len, batch_size=batch_size, rank=rank,
                  world_size=world_size, seed=seed, expect_tokenizer_sha256=expect_tokenizer_sha256,
                  expect_vocab_size=expect_vocab_size, verify=verify)
