"""`BlockLayout`: which kv blocks each query block visits, split into fully visible and partial blocks.

The fields use FlexAttention's `BlockMask` layout, with a batch dimension of 1 (layouts broadcast over
the batch) and a head dimension of 1 (broadcast) or the number of query heads:

- ``kv_num_blocks``      (1, H, num_q_blocks)              int32: partial kv blocks per query block
- ``kv_indices``         (1, H, num_q_blocks, num_kv_blocks) int32: their indices first, ascending
- ``full_kv_num_blocks`` (1, H, num_q_blocks)              int32: fully visible kv blocks
- ``full_kv_indices``    (1, H, num_q_blocks, num_kv_blocks) int32

"Partial" blocks contain at least one visible pair and need the elementwise mask; "full" blocks are
entirely visible and need none. A pair outside both lists is never visible.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _csr_from_bool(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, nq, nk) bool -> (num (1,H,nq) int32, indices (1,H,nq,nk) int32 with selected first, ascending)."""
    num = sel.sum(-1, dtype=torch.int32)
    # A stable sort of "not selected" puts the selected indices first, in ascending order.
    order = torch.sort((~sel).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return num.unsqueeze(0).contiguous(), order.unsqueeze(0).contiguous()


def _bool_from_csr(num: torch.Tensor, idx: torch.Tensor, num_kv_blocks: int) -> torch.Tensor:
    """Inverse of `_csr_from_bool`, over the first batch entry: -> (H, nq, nk) bool."""
    num = num[0].long()
    idx = idx[0].long()
    h, nq = num.shape
    valid = torch.arange(idx.shape[-1], device=num.device) < num.unsqueeze(-1)
    counts = torch.zeros(h, nq, num_kv_blocks, dtype=torch.int32, device=num.device)
    # Entries past `num` are padding with arbitrary (possibly repeated) values: they add zero.
    counts.scatter_add_(-1, idx.clamp(0, num_kv_blocks - 1), valid.to(torch.int32))
    return counts > 0


@dataclass(frozen=True, eq=False)
class BlockLayout:
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor
    full_kv_indices: torch.Tensor
    block_q: int
    block_k: int
    q_len: int
    kv_len: int

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_bool(cls, any_visible: torch.Tensor, all_visible: torch.Tensor, *, block_q: int, block_k: int,
                  q_len: int, kv_len: int) -> "BlockLayout":
        """From exact per-block-pair flags of shape (H, num_q_blocks, num_kv_blocks)."""
        full = all_visible & any_visible
        partial = any_visible & ~full
        num, idx = _csr_from_bool(partial)
        fnum, fidx = _csr_from_bool(full)
        return cls(num, idx, fnum, fidx, block_q, block_k, q_len, kv_len)

    @classmethod
    def from_block_mask(cls, block_mask) -> "BlockLayout":
        """From a FlexAttention `BlockMask` (its first batch entry)."""
        bq, bk = block_mask.BLOCK_SIZE
        q_len, kv_len = block_mask.seq_lengths
        nk = _cdiv(kv_len, bk)
        partial = _bool_from_csr(block_mask.kv_num_blocks, block_mask.kv_indices, nk)
        if block_mask.full_kv_num_blocks is not None:
            full = _bool_from_csr(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, nk)
        else:
            full = torch.zeros_like(partial)
        nq = _cdiv(q_len, bq)
        partial, full = partial[:, :nq, :nk], full[:, :nq, :nk]
        return cls.from_bool(partial | full, full, block_q=bq, block_k=bk, q_len=q_len, kv_len=kv_len)

    # -- views ------------------------------------------------------------------------------------
    @property
    def num_q_blocks(self) -> int:
        return self.kv_num_blocks.shape[-1]

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_indices.shape[-1]

    @property
    def num_heads(self) -> int:
        """1 when the layout broadcasts over heads."""
        return self.kv_num_blocks.shape[1]

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    def partial_blocks(self) -> torch.Tensor:
        """(H, nq, nk) bool: blocks that need the elementwise mask."""
        return _bool_from_csr(self.kv_num_blocks, self.kv_indices, self.num_kv_blocks)

    def full_blocks(self) -> torch.Tensor:
        """(H, nq, nk) bool: blocks that are entirely visible."""
        return _bool_from_csr(self.full_kv_num_blocks, self.full_kv_indices, self.num_kv_blocks)

    def block_density(self) -> float:
        """Fraction of block pairs visited (full or partial)."""
        visited = (self.kv_num_blocks.sum() + self.full_kv_num_blocks.sum()).item()
        return visited / (self.num_heads * self.num_q_blocks * self.num_kv_blocks)

    def to(self, device) -> "BlockLayout":
        return BlockLayout(self.kv_num_blocks.to(device), self.kv_indices.to(device),
                           self.full_kv_num_blocks.to(device), self.full_kv_indices.to(device),
                           self.block_q, self.block_k, self.q_len, self.kv_len)

    def to_block_mask(self, mask_mod=None):
        """A FlexAttention `BlockMask` with the same blocks (no N x N evaluation)."""
        from torch.nn.attention.flex_attention import BlockMask

        return BlockMask.from_kv_blocks(
            self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks, self.full_kv_indices,
            BLOCK_SIZE=(self.block_q, self.block_k), mask_mod=mask_mod,
            seq_lengths=(self.q_len, self.kv_len))

    def __repr__(self) -> str:
        return (f"BlockLayout(q_len={self.q_len}, kv_len={self.kv_len}, block=({self.block_q}, {self.block_k}), "
                f"heads={self.num_heads}, blocks={self.num_q_blocks}x{self.num_kv_blocks}, "
                f"partial={int(self.kv_num_blocks.sum())}, full={int(self.full_kv_num_blocks.sum())})")
