"""Per-call key/value cache: preallocated buffers, one pair per block, plus an optional key-validity mask.

The cache belongs to one generation call, never to a module, so a token policy decides what enters it
(SparseVAR adds only the computed tokens) and two generations can run side by side.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys/values of every block for ``rows`` sequences of at most ``max_len`` tokens."""

    def __init__(
        self,
        *,
        depth: int,
        rows: int,
        heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (rows, heads, max_len, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.length = 0
        self.max_len = max_len
        self.rows = rows
        self._valid: torch.Tensor | None = None  # (rows, max_len) bool, allocated on first padding
        self._pending = 0
        self._pending_valid: torch.Tensor | None = None

    def begin_stage(self, n: int, valid_Rn: torch.Tensor | None) -> None:
        """Announce that every block will append ``n`` tokens this stage (``valid`` False = padding)."""
        if self.length + n > self.max_len:
            raise RuntimeError(f"KV cache overflow: {self.length} + {n} > {self.max_len}")
        self._pending = n
        if valid_Rn is not None and not bool(valid_Rn.all()):
            if self._valid is None:
                self._valid = torch.ones(self.rows, self.max_len, dtype=torch.bool, device=valid_Rn.device)
            self._valid[:, self.length : self.length + n] = valid_Rn
        elif self._valid is not None:
            self._valid[:, self.length : self.length + n] = True

    def append_and_get(
        self, layer: int, k_RHnd: torch.Tensor, v_RHnd: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store this stage's keys/values of ``layer``; return all keys, values and the key mask so far."""
        end = self.length + self._pending
        self.k[layer][:, :, self.length : end] = k_RHnd
        self.v[layer][:, :, self.length : end] = v_RHnd
        mask = None if self._valid is None else self._valid[:, None, None, :end]
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end], mask

    def end_stage(self) -> None:
        self.length += self._pending
        self._pending = 0

    def valid_counts(self) -> torch.Tensor:
        """Number of real (non-padding) keys held per row."""
        if self._valid is None:
            return torch.full((self.rows,), self.length, dtype=torch.long)
        return self._valid[:, : self.length].sum(dim=1).cpu()
