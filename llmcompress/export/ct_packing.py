"""compressed-tensors' int32 packing of 4- and 8-bit integer codes (its `pack_to_int32` / `unpack_from_int32`).

Element i of a row (of a column, for zero points: packed_dim 0) goes into bits [i·b mod 32, +b) of word
⌊i·b / 32⌋, as the unsigned code u = q + 2^(b−1) of the signed code q; a row is padded with zeros to whole words.
For b = 4 this is byte ⌊i / 2⌋, low nibble for even i (little-endian words): our own int4 `qweight` byte layout.
Only b ∈ {4, 8} occur in our schemes; with them no code straddles a word.
"""

from __future__ import annotations

import torch


def _per_word(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"packing of {bits}-bit codes is not served (4 or 8)")
    return 32 // bits


def pack_int32(q: torch.Tensor, bits: int, packed_dim: int = 1) -> torch.Tensor:
    """Signed codes [R, C] (any int dtype, in −2^(b−1)..2^(b−1)−1) -> int32 [R, ⌈C·b/32⌉] (or along dim 0)."""
    per = _per_word(bits)
    u = q.to(torch.int64) + (1 << (bits - 1))
    if packed_dim == 0:
        u = u.t()
    rows, cols = u.shape
    words = -(-cols // per)
    u = torch.nn.functional.pad(u, (0, words * per - cols)).reshape(rows, words, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    packed = (u << shifts).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed.t().contiguous() if packed_dim == 0 else packed.contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, size: int, packed_dim: int = 1) -> torch.Tensor:
    """Inverse of pack_int32: int32 words -> signed int8 codes, `size` elements along the packed dim."""
    per = _per_word(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"packed codes must be int32, got {packed.dtype}")
    w = packed.to(torch.int64) & 0xFFFFFFFF
    if packed_dim == 0:
        w = w.t()
    shifts = torch.arange(per, dtype=torch.int64) * bits
    u = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    q = (u.reshape(w.shape[0], -1)[:, :size] - (1 << (bits - 1))).to(torch.int8)
    return q.t().contiguous() if packed_dim == 0 else q
