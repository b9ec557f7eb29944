"""Inference key/value cache: one `LayerKV` per block, filled by `Transformer.decode`.

Global layers keep every position in a buffer allocated once (`capacity` tokens); sliding-window
layers keep at most the last `window` positions. MLA layers store the compressed latent (the
normalised c_kv and the roped k_rope, concatenated), GQA layers store roped k and v per kv head.
All sequences of a batch sit at the same position (no ragged batches).
"""

from __future__ import annotations

import torch

from nmoe.model.config import ModelConfig


class LayerKV:
    """Cached per-position tensors of one attention layer and their absolute positions."""

    def __init__(self, capacity: int, window: int | None):
        self.capacity = capacity
        self.window = window  # None: global layer (buffer of `capacity`); int: keep the last `window` positions
        self.tensors: tuple[torch.Tensor, ...] | None = None
        self.positions: torch.Tensor | None = None  # [K] int64 absolute positions of the cached rows
        self.length = 0  # rows of the global buffer filled so far

    def extend(
        self, new: tuple[torch.Tensor, ...], positions: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Append new[i] ([B,S,...]) at `positions` [S]; return every key row to attend to ([B,K,...], positions[K])."""
        if self.window is None:
            return self._extend_global(new, positions)
        if self.tensors is None:
            keys, key_pos = new, positions
        else:
            keys = tuple(torch.cat((old, t.to(old.dtype)), dim=1) for old, t in zip(self.tensors, new))
            key_pos = torch.cat((self.positions, positions))
        self.tensors = tuple(t[:, -self.window :] for t in keys)
        self.positions = key_pos[-self.window :]
        return keys, key_pos

    def _extend_global(self, new, positions):
        seq = new[0].shape[1]
        end = self.length + seq
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; {end} requested: allocate a larger cache")
        if self.tensors is None:
            self.tensors = tuple(t.new_empty((t.shape[0], self.capacity, *t.shape[2:])) for t in new)
            self.positions = torch.arange(self.capacity, device=positions.device)
        for buf, t in zip(self.tensors, new):
            buf[:, self.length : end] = t
        self.length = end
        return tuple(buf[:, :end] for buf in self.tensors), self.positions[:end]


class KVCache:
    """Per-layer caches for `batch_size` sequences of up to `capacity` tokens (prompt + generated)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, capacity: int):
        if capacity > cfg.max_seq_len:
            raise ValueError(
                f"cache capacity {capacity} > model.max_seq_len ({cfg.max_seq_len}): RoPE tables end there; "
                "shorten the prompt or the generation"
            )
        self.batch_size = batch_size
        self.capacity = capacity
        self.position = 0  # tokens already in the cache (the position of the next token)
        self.layers = [LayerKV(capacity, cfg.layer_window(i)) for i in range(cfg.n_layers)]


def decode_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean [S,K]: query at query_pos[i] may attend key at key_pos[j] (causal, within `window`)."""
    q, k = query_pos[:, None], key_pos[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= q - k < window
    return allowed


__all__ = ["KVCache", "LayerKV", "decode_mask"]
