"""What attention needs to know about one step's flattened batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Sequences of a step, in order; tokens of sequence ``i`` are rows
    ``query_start_loc[i]:query_start_loc[i+1]`` of the flattened ``[T, ...]`` tensors.

    ``seq_lens[i]`` counts every token of sequence ``i`` whose K/V exist after this
    step's writes (cached prefix + new tokens); the new tokens are its last
    ``query_lens[i]`` positions. ``use_cache=False`` is the recompute mode: no cache
    exists and each sequence attends only to its own tokens of this step.
    """

    query_start_loc: list[int]  # [B + 1], host
    seq_lens: list[int]  # [B], host
    slot_mapping: torch.Tensor | None  # [T] long: block_id * block_size + offset
    block_tables: list[list[int]]  # [B][num_blocks], host
    block_size: int
    use_cache: bool = True
    # Device tensors for the Triton backend (a ``TritonStepData``), built by the runner.
    triton: Any = None
    # Decode rows (query_len == 1) attended in one batched call; built lazily per step.
    _decode: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    def query_len(self, i: int) -> int:
        return self.query_start_loc[i + 1] - self.query_start_loc[i]

    def decode_batch(
        self, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(seq indices, token rows, padded block tables [Bd, M], seq lens [Bd]) of
        the sequences that add exactly one token this step."""
        if self._decode is None:
            idx = [i for i in range(self.num_seqs) if self.query_len(i) == 1]
            rows = [self.query_start_loc[i] for i in idx]
            width = max((len(self.block_tables[i]) for i in idx), default=0)
            tables = [self.block_tables[i] + [0] * (width - len(self.block_tables[i])) for i in idx]
            self._decode = (
                torch.tensor(idx, dtype=torch.long),
                torch.tensor(rows, dtype=torch.long, device=device),
                torch.tensor(tables, dtype=torch.long, device=device).view(len(idx), width),
                torch.tensor([self.seq_lens[i] for i in idx], dtype=torch.long, device=device),
            )
        return self._decode

    def decode_mask(self, window: int | None, max_len: int, device: torch.device) -> torch.Tensor:
        """[Bd, 1, 1, max_len] bool: which cached positions each decode row may see."""
        if window not in self._masks:
            _, _, _, lens = self.decode_batch(device)
            pos = torch.arange(max_len, device=device)[None, :]
            mask = pos < lens[:, None]
            if window is not None:
                mask &= pos > (lens[:, None] - 1 - window)
            self._masks[window] = mask[:, None, None, :]
        return self._masks[window]
