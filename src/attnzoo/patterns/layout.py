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

try:  # see base.Rows: the band path's row arithmetic uses numpy arrays when numpy is there
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _csr(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., nk) bool -> (num (...) int32, indices (..., nk) int32): each row lists its selected columns
    first, ascending, then its unselected columns, ascending (what a stable sort of ``~sel`` gives).

    No sort: a row's selected column ``j`` goes to position ``cumsum(sel)[j] - 1`` and an unselected one
    to ``num + j - cumsum(sel)[j]`` (after the ``num`` selected ones, in order), and one scatter writes the
    permutation. A handful of elementwise kernels, no device->host synchronisation.
    """
    nk = sel.shape[-1]
    cs = torch.cumsum(sel, -1)                                   # int64
    num = cs[..., -1:]
    j = torch.arange(nk, device=sel.device)
    pos = torch.where(sel, cs - 1, (j + num) - cs)
    idx = torch.empty(sel.shape, dtype=torch.int32, device=sel.device)
    idx.scatter_(-1, pos, j.to(torch.int32).expand(sel.shape))
    return num.squeeze(-1).to(torch.int32).contiguous(), idx


def _csr_from_bool(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, nq, nk) bool -> (num (1,H,nq) int32, indices (1,H,nq,nk) int32 with selected first, ascending)."""
    num, idx = _csr(sel)
    return num.unsqueeze(0), idx.unsqueeze(0)


# Breakpoints, jumps and counts of `_band_csr` as integer combinations of (1, a0, f0, f1, a1): columns
# [partial positions x5, partial jumps x5, full positions x5, full jumps x5, partial count, full count].
_BAND_COEF = torch.tensor([
    # 1   a0  f0  f1  a1
    [0, 0, 0, 0, 0], [0, -1, 1, 0, 0], [0, -1, 1, -1, 1], [0, 0, 1, -1, 1], [0, 0, 0, 0, 1],     # partial pos
    [-1, 1, 0, 0, 0], [0, 0, -1, 1, 0], [0, 0, 0, 0, -1], [0, -1, 1, 0, 0], [0, 0, 0, -1, 1],    # partial jump
    [0, 0, 0, 0, 0], [0, 0, -1, 1, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0],        # full pos
    [-1, 0, 1, 0, 0], [0, 0, 0, -1, 0], [0, 0, -1, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0],      # full jump
    [0, -1, 1, -1, 1], [0, 0, -1, 1, 0],                                                          # counts
], dtype=torch.int64).t().contiguous()
_BAND_COEF_NP = _BAND_COEF.numpy() if _np is not None else None


def _band_csr(band: torch.Tensor, nk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The CSR of both lists straight from per-row block ranges, without any (nq, nk) classification.

    ``band`` (H, nq, 5) int64 on the CPU holds, per query block, ``(1, a0, f0, f1, a1)``: half-open
    kv-block boundaries ``a0 <= f0 <= f1 <= a1``, blocks [a0, a1) visited, [f0, f1) of them entirely
    visible (so the partial ones are [a0, f0) and [f1, a1)). Returns (num (2, H, nq) int32, indices
    (2, H, nq, nk) int32) on ``device``, [0] partial and [1] full, exactly as `_csr` lays them out.

    A row of indices is piecewise ``t + c``. The full list is ``f0 + t`` for its ``nf = f1 - f0`` entries,
    then ``t - nf`` (the unselected blocks below f0), then ``t`` from f1 on; the partial list has five
    such pieces ([a0, f0), [f1, a1), then [0, a0), [f0, f1), [a1, nk) unselected). So a row is the running
    sum of a vector that is 1 except at the breakpoints, where it jumps by the change of ``c`` (c = 1
    before the row: see `_BAND_COEF`). Breakpoints and jumps are linear in the boundaries: one small
    integer matmul on the CPU, one host->device copy, and three device kernels: a fill, a scatter-add of
    the jumps (empty pieces put several breakpoints on one column; their jumps add up telescopically)
    and an in-place cumsum.
    """
    if _np is not None and isinstance(band, _np.ndarray):
        return _band_csr_np(band, nk, device)
    h, nq, _ = band.shape
    r = h * nq
    out = (band.view(r, 5) @ _BAND_COEF)                          # (r, 22)
    lists = out[:, :20].view(r, 2, 2, 5)                          # (row, list, pos / jump, piece)
    lists.masked_fill_(lists[:, :, :1] >= nk, 0)                  # breakpoints past the row change nothing
    lists = lists.view(h, nq, 2, 2, 5).permute(3, 2, 0, 1, 4)     # (pos / jump, list, h, nq, piece)
    return _running_sums(lists[0], lists[1], out[:, 20:].view(h, nq, 2).permute(2, 0, 1), nk, device)


def _band_csr_np(band, nk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`_band_csr` with the CPU side in numpy (band: (H, nq, 5) int64 ndarray)."""
    h, nq, _ = band.shape
    r = h * nq
    out = band.reshape(r, 5) @ _BAND_COEF_NP                      # (r, 22)
    lists = out[:, :20].reshape(r, 2, 2, 5)                       # (row, list, pos / jump, piece)
    lists *= lists[:, :, :1] < nk                                 # breakpoints past the row change nothing
    lists = lists.reshape(h, nq, 2, 2, 5).transpose(3, 2, 0, 1, 4)
    shape = (2, h, nq, 5)
    m, n32, buf_t = _host_buffer(shape, torch.device(device))
    buf = buf_t.numpy()
    b32 = buf[m:].view(_np.int32)
    buf[:m].reshape(shape)[...] = lists[0]
    b32[:m].reshape(shape)[...] = lists[1]
    b32[m:n32].reshape(2, h, nq)[...] = out[:, 20:].reshape(h, nq, 2).transpose(2, 0, 1)
    return _expand(buf_t, shape, m, n32, nk, device)


def _host_buffer(shape, device: torch.device):
    """One int64 host buffer for the breakpoints (int64, scatter's index), then the jumps and counts
    (int32): pinned when it goes to a GPU, so that the copy is asynchronous (no host sync)."""
    two, h, nq, e = shape
    m = two * h * nq * e
    n32 = m + two * h * nq
    pin = device.type == "cuda"
    return m, n32, torch.empty(m + (n32 + 1) // 2, dtype=torch.int64, pin_memory=pin)


def _expand(buf: torch.Tensor, shape, m: int, n32: int, nk: int, device):
    """Ship the buffer (one copy), then on the device: a row of ones, plus the jumps at their positions,
    summed along the row -> (num (2, H, nq) int32, indices (2, H, nq, nk) int32)."""
    buf = buf.to(device, non_blocking=buf.is_pinned())
    b32 = buf[m:].view(torch.int32)
    pos, jump, num = buf[:m].view(shape), b32[:m].view(shape), b32[m:n32].view(shape[:3])
    idx = torch.ones(shape[:3] + (nk,), dtype=torch.int32, device=buf.device)
    idx.scatter_add_(-1, pos, jump)
    idx.cumsum_(-1)
    return num, idx


def _pieces_csr(x: torch.Tensor, code: torch.Tensor, nk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`_band_csr` for any number of pieces per row: ``x`` (H, nq, K+1) int64 kv-block boundaries
    ``0 = x0 <= ... <= xK = nk`` and ``code`` (H, nq, K) the class of each piece [x_j, x_j+1) (1 partial,
    2 full, anything else not visited). Piece j lands at position P_j of its list (selected pieces
    first, then the rest, each in column order) and adds ``c_j = x_j - P_j`` over [P_j, P_j + len_j):
    +c_j at P_j and -c_j at P_j + len_j (an empty piece cancels itself)."""
    s = x[..., :-1]
    ln = x[..., 1:] - s
    sel = torch.stack([code == 1, code == 2])                     # (2, H, nq, K)
    sl = sel * ln
    ul = ln - sl
    num = sl.sum(-1, keepdim=True)
    pos = torch.where(sel, sl.cumsum(-1) - sl, ul.cumsum(-1) - ul + num)
    c = s - pos
    head = torch.zeros_like(num)
    pos = torch.cat([head, pos, pos + ln], -1)
    jump = torch.cat([head - 1, c, -c], -1)                        # the -1: running sums of 1 start at 1
    out = pos >= nk
    return _running_sums(pos.masked_fill_(out, 0), jump.masked_fill_(out, 0), num.squeeze(-1), nk, device)


def _running_sums(pos: torch.Tensor, jump: torch.Tensor, num: torch.Tensor, nk: int, device):
    """Ship (pos, jump (2, H, nq, E), num (2, H, nq)) in one host->device copy, then on the device: a row
    of ones, plus the jumps at their positions, summed along the row -> (num int32, indices int32)."""
    shape = tuple(pos.shape)
    m, n32, buf = _host_buffer(shape, torch.device(device))
    b32 = buf[m:].view(torch.int32)
    buf[:m].view(shape).copy_(pos)
    b32[:m].view(shape).copy_(jump)
    b32[m:n32].view(num.shape).copy_(num)
    return _expand(buf, shape, m, n32, nk, device)


def _selection(any_visible: torch.Tensor, all_visible: torch.Tensor) -> torch.Tensor:
    """(2, H, nq, nk) bool: [0] partial blocks (some but not every pair visible), [1] full blocks."""
    any_visible, all_visible = torch.broadcast_tensors(any_visible, all_visible)
    sel = torch.empty((2,) + tuple(any_visible.shape), dtype=torch.bool, device=any_visible.device)
    torch.logical_and(all_visible, any_visible, out=sel[1])
    torch.logical_xor(any_visible, sel[1], out=sel[0])
    return sel


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
        return cls._from_selection(_selection(any_visible, all_visible), block_q=block_q, block_k=block_k,
                                   q_len=q_len, kv_len=kv_len)

    @classmethod
    def _from_band(cls, band: torch.Tensor, device, *, block_q: int, block_k: int, q_len: int,
                   kv_len: int) -> "BlockLayout":
        """From per-row block ranges (see `_band_csr`): no (nq, nk) classification at all."""
        nums, idxs = _band_csr(band, _cdiv(kv_len, block_k), device)
        return cls(nums[0:1], idxs[0:1], nums[1:2], idxs[1:2], block_q, block_k, q_len, kv_len)

    @classmethod
    def _from_pieces(cls, x: torch.Tensor, code: torch.Tensor, device, *, block_q: int, block_k: int,
                     q_len: int, kv_len: int) -> "BlockLayout":
        """From per-row pieces of kv blocks and their classes (see `_pieces_csr`)."""
        nums, idxs = _pieces_csr(x, code, _cdiv(kv_len, block_k), device)
        return cls(nums[0:1], idxs[0:1], nums[1:2], idxs[1:2], block_q, block_k, q_len, kv_len)

    @classmethod
    def _from_selection(cls, sel: torch.Tensor, *, block_q: int, block_k: int, q_len: int,
                        kv_len: int) -> "BlockLayout":
        """From `_selection`'s (2, H, nq, nk) partial / full flags: one pass of the CSR kernels builds both
        lists (the four fields are views of two buffers)."""
        nums, idxs = _csr(sel)
        return cls(nums[0:1], idxs[0:1], nums[1:2], idxs[1:2], block_q, block_k, q_len, kv_len)

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
