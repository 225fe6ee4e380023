"""Small integer codecs used by the label encodings: fixed-width bit-packing and byte planes.

Both are plain vectorized numpy, so decoding a shard costs a few array passes,
never a Python loop per value.
"""

from __future__ import annotations

import numpy as np


def bit_width(max_value: int) -> int:
    """Bits needed for values in ``[0, max_value]`` (at least 1)."""
    if max_value < 0:
        raise ValueError(f"max_value must be >= 0, got {max_value}")
    return max(1, int(max_value).bit_length())


def pack_bits(values: np.ndarray, width: int) -> np.ndarray:
    """Pack each row of ``values`` ([N, m], non-negative, < 2**width) into ``ceil(m*width/8)`` bytes.

    Bits are little-endian (value bit 0 first); each row starts on a byte
    boundary so rows can be sliced without the others. Returns uint8 [N, bytes].
    """
    if not 1 <= width <= 64:
        raise ValueError(f"width must be in 1..64, got {width}")
    v = np.ascontiguousarray(values, dtype="<u8")
    if v.ndim != 2:
        raise ValueError(f"values must be 2-D [N, m], got shape {v.shape}")
    if v.size and width < 64 and int(v.max()) >> width:
        raise ValueError(f"a value does not fit in {width} bits (max {int(v.max())})")
    n, m = v.shape
    bits = np.unpackbits(v.view(np.uint8).reshape(n, m, 8), axis=-1, bitorder="little")[..., :width]
    return np.packbits(bits.reshape(n, m * width), axis=-1, bitorder="little")


def unpack_bits(packed: np.ndarray, m: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: uint8 [N, bytes] -> int64 [N, m].

    Each value is read as the 8 bytes at its byte offset (little-endian),
    shifted and masked: one gather of [N, m, 8] bytes, no per-bit expansion.
    """
    if not 1 <= width <= 56:
        raise ValueError(f"width must be in 1..56 to unpack, got {width}")
    p = np.ascontiguousarray(packed, dtype=np.uint8)
    n = p.shape[0]
    if width in (8, 16, 32):  # byte-aligned: a plain little-endian view
        return p.view(f"<u{width // 8}").reshape(n, m).astype(np.int64)
    padded = np.zeros((n, p.shape[1] + 8), dtype=np.uint8)
    padded[:, : p.shape[1]] = p
    bit = np.arange(m, dtype=np.int64) * width
    windows = padded[:, (bit // 8)[:, None] + np.arange(8)]  # [N, m, 8]
    words = np.ascontiguousarray(windows).view("<u8")[..., 0]
    return ((words >> (bit % 8).astype(np.uint64)) & np.uint64((1 << width) - 1)).astype(np.int64)


def to_planes(values: np.ndarray, planes: int) -> list[np.ndarray]:
    """Split non-negative ints into ``planes`` uint8 arrays (low byte first).

    Each plane goes to its own compressed column: zstd entropy-codes a plane of
    mostly-small bytes far better than interleaved multi-byte integers.
    """
    v = np.asarray(values, dtype=np.int64)
    if v.size and (int(v.min()) < 0 or int(v.max()) >> (8 * planes)):
        raise ValueError(f"values must lie in [0, 2**{8 * planes}), got [{int(v.min())}, {int(v.max())}]")
    return [((v >> (8 * i)) & 0xFF).astype(np.uint8) for i in range(planes)]


def from_planes(planes: list[np.ndarray]) -> np.ndarray:
    """Inverse of :func:`to_planes`."""
    out = np.zeros(planes[0].shape, dtype=np.int64)
    for i, p in enumerate(planes):
        out |= p.astype(np.int64) << (8 * i)
    return out


def planes_for(max_value: int) -> int:
    """Byte planes needed for values in ``[0, max_value]``."""
    return (bit_width(max_value) + 7) // 8
