"""The packed-index layout (the one definition is csrc/include/weightshare/packing.h; this mirrors it).

Indices [..., n] (each < 2**bits, bits in 1..8) pack row by row, a row being the last dimension:

* a row is a little-endian bit stream: index i occupies stream bits [i*bits, (i+1)*bits), least significant bit
  first; stream bit s is bit s % 8 of byte s // 8;
* each row is padded with zero bits to a whole number of 32-bit words, so every row starts 4-byte aligned and
  kernels may read it as little-endian uint32 words;
* the packed tensor is uint8 [..., packed_row_bytes(n, bits)].

Example, bits=3, indices [5, 1, 7]: stream bits 101 100 111 (LSB first per index) -> byte 0 = 0b11001101, byte 1
= 0b00000001, then two zero padding bytes.
"""

MIN_BITS = 1
MAX_BITS = 8


def packed_row_words(n: int, bits: int) -> int:
    """32-bit words that hold one packed row of n indices."""
    return (n * bits + 31) // 32


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes of one packed row of n indices (a multiple of 4)."""
    return packed_row_words(n, bits) * 4


def bits_for(k: int) -> int:
    """Fewest bits (>= 1) that index a codebook of k entries."""
    if not 1 <= k <= 256:
        raise ValueError(f"weightshare: a codebook has 1..256 entries, got {k}")
    return max(1, (k - 1).bit_length())
