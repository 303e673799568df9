"""Lossless entropy coding of uint8 symbol streams (codebook indices) with interleaved static rANS.

Why rANS and not Huffman: the index streams this package writes are dominated by one or two entries (the zero /
pruned entry often covers 60-99 % of the weights). Huffman spends at least one bit per symbol, so a stream with
90 % zeros (0.47 bits/symbol of information for two symbols) would cost twice its entropy; rANS with 16-bit
probabilities lands within a fraction of a percent of the Shannon bound. A sequential coder is slow in Python, so
the stream is split round-robin over many independent rANS states ("lanes") that numpy advances in lockstep;
small streams use a scalar loop over the same lanes instead, which produces identical bytes faster.

Coder parameters: the coder works with frequencies summing to M = 2**16 (`PROB_BITS`); a lane's state lives
in [2**16, 2**32) and renormalises by exactly one 16-bit word at a time (at most one per symbol, which is what
makes the lockstep vectorisation possible). The stored table may be coarser (2**b, b <= 16, scaled up by
2**(16-b) for coding): the encoder picks the b that minimises table bytes + ideal payload, which matters for short
streams. Symbol i goes to lane i % L, with L = `lanes_for(n)` = ceil(n / 8192) (about 8192 symbols per lane),
fixed by the format version so it need not be stored. Each lane ends with a 4-byte state, about 3 bytes more than
its information: ~24 / (8192 * H) relative overhead at H bits/symbol (0.35 % at H = 0.86, 4 % at the extreme
H = 0.08), i.e. ~0.003 bits per symbol, plus the table.

Blob layout, version 1 (all integers little-endian)::

    offset      size            field
    0           1               version (= 1)
    1           B = ceil(A/8)   presence bitmap: bit s % 8 of byte s // 8 is set iff symbol s occurs (A = alphabet
                                size); bits >= A are zero
    -- only if at least two symbols occur (p of them):
    1+B         1               table precision b, with 2**b >= p and b <= 16
    2+B         varints         the frequency of every occurring symbol but the last, in ascending symbol order, as
                                minimal LEB128 varints in [1, 2**b); the last one is 2**b minus their sum (>= 1)
    ...         4*L             each lane's final encoder state, uint32, in [2**16, 2**32)
    ...         2*W             the renormalisation words, uint16, in decoding order (step by step, lanes
                                ascending within a step)

An empty stream, or one that repeats a single symbol, is just the version byte and the bitmap (n comes from the
caller). Decoding checks every field, never reads past the blob, runs exactly n steps, and finally requires every
lane to be back at its initial state 2**16 with every word consumed: a cheap 16-bit-per-lane integrity check.
Any failure raises `EntropyCodingError`, a `weightshare.container.ContainerError` (hence a ValueError).
"""
from __future__ import annotations

import bisect
import numbers

import numpy as np
import torch

from weightshare.container import ContainerError

__all__ = ["encode", "decode", "encoded_size", "entropy_bits", "lanes_for", "EntropyCodingError",
           "FORMAT_VERSION", "PROB_BITS", "SYMBOLS_PER_LANE"]

FORMAT_VERSION = 1
PROB_BITS = 16
PROB_SCALE = 1 << PROB_BITS  # M: quantised frequencies sum to this
STATE_LOW = 1 << 16  # lane states live in [STATE_LOW, STATE_LOW << 16)
WORD_BITS = 16
WORD_MASK = (1 << WORD_BITS) - 1
SYMBOLS_PER_LANE = 8192  # part of the format: lanes_for(n) must agree between writer and reader
# Below this many lanes a plain Python loop beats numpy's per-call overhead (~0.3 us per symbol against ~10 us
# per lockstep step); both paths produce the same bytes.
_SCALAR_MAX_LANES = 16


class EntropyCodingError(ContainerError):
    """An entropy-coded blob is malformed or corrupted."""


def lanes_for(n: int) -> int:
    """Number of interleaved rANS lanes for a stream of n symbols (0 for an empty stream)."""
    return -(-n // SYMBOLS_PER_LANE)


def _steps(n: int, lanes: int) -> int:
    """Lockstep iterations: step t codes symbols t*lanes .. t*lanes + lanes - 1 (the last step may be short)."""
    return -(-n // lanes)


# ----------------------------------------------------------------------------------------------- model


def _as_symbols(symbols: torch.Tensor, alphabet_size: int) -> np.ndarray:
    _check_alphabet(alphabet_size)
    if not isinstance(symbols, torch.Tensor) or symbols.dtype != torch.uint8:
        raise TypeError(f"symbols must be a uint8 torch.Tensor, got {getattr(symbols, 'dtype', type(symbols))}")
    flat = symbols.detach().to("cpu").contiguous().reshape(-1).numpy()
    if flat.size and int(flat.max()) >= alphabet_size:
        raise ValueError(f"symbol {int(flat.max())} is outside the alphabet of {alphabet_size}")
    return flat


def _check_alphabet(alphabet_size: int) -> None:
    if isinstance(alphabet_size, bool) or not isinstance(alphabet_size, numbers.Integral) \
            or not 1 <= alphabet_size <= 256:
        raise ValueError(f"alphabet_size must be an int in 1..256, got {alphabet_size!r}")


def _quantise(counts: np.ndarray, scale: int) -> np.ndarray:
    """Frequencies >= 1 summing to `scale` for the (positive) counts of the occurring symbols, chosen to keep the
    coded size small: round count * scale / n (at least 1), then move single units greedily, adding where one
    more unit saves the most bits or taking where one fewer costs the least (at most ~len(counts) moves)."""
    c = counts.astype(np.float64)
    q = np.maximum(1, np.rint(c * scale / c.sum())).astype(np.int64)
    while (excess := int(q.sum()) - scale) != 0:
        if excess < 0:
            q[int(np.argmax(c * np.log2((q + 1) / q)))] += 1
        else:  # some q > 1 exists, since sum(q) > scale >= len(q)
            cost = np.where(q > 1, c * np.log2(q / np.maximum(q - 1, 1)), np.inf)
            q[int(np.argmin(cost))] -= 1
    return q


def _varint_bytes(values: np.ndarray) -> int:
    return int(sum(max(1, -(-int(v).bit_length() // 7)) for v in values))


def _choose_model(counts: np.ndarray) -> tuple[int, np.ndarray]:
    """Pick the table precision (bits) minimising table bytes + ideal payload, and the frequencies at it.

    Small streams gain most: with few symbols a 16-bit table costs more than the precision saves."""
    best = None
    for bits in range((counts.size - 1).bit_length(), PROB_BITS + 1):
        q = _quantise(counts, 1 << bits)
        payload_bits = float((counts * (bits - np.log2(q))).sum())
        total = 8 * _varint_bytes(q[:-1]) + payload_bits
        if best is None or total < best[0]:
            best = (total, bits, q)
    return best[1], best[2]


def _write_varint(value: int, out: bytearray) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


# ----------------------------------------------------------------------------------------------- encoding


def _encode_scalar(sym: np.ndarray, freq: list[int], cum: list[int], lanes: int) -> tuple[list[int], np.ndarray]:
    """Reference-simple loop. rANS encodes backwards; walking i = n-1..0 visits each step's lanes in descending
    order, so reversing the emitted words yields steps ascending and lanes ascending: the decoder's order."""
    limit = [f << (32 - PROB_BITS) for f in freq]  # a state at or above this must shed a word first
    states = [STATE_LOW] * lanes
    words: list[int] = []
    values = sym.tolist()
    for i in range(len(values) - 1, -1, -1):
        s, lane = values[i], i % lanes
        x = states[lane]
        if x >= limit[s]:
            words.append(x & WORD_MASK)
            x >>= WORD_BITS
        f = freq[s]
        states[lane] = ((x // f) << PROB_BITS) + x % f + cum[s]
    return states, np.array(words[::-1], dtype="<u2")


def _encode_vector(sym: np.ndarray, freq: np.ndarray, cum: np.ndarray, lanes: int) -> tuple[np.ndarray, np.ndarray]:
    """The same coder with all lanes advanced together, one step (one symbol per lane) per iteration."""
    n = sym.size
    limit = freq << (32 - PROB_BITS)
    x = np.full(lanes, STATE_LOW, dtype=np.int64)
    chunks = []
    for t in range(_steps(n, lanes) - 1, -1, -1):
        start = t * lanes
        s = sym[start:start + lanes]
        xs = x[:s.size]  # the last step may cover only the first lanes
        shed = np.flatnonzero(xs >= limit[s])
        if shed.size:
            chunks.append((xs[shed] & WORD_MASK).astype("<u2"))
            xs[shed] >>= WORD_BITS
        f = freq[s]
        quotient, remainder = np.divmod(xs, f)
        xs[:] = (quotient << PROB_BITS) + remainder + cum[s]
    words = np.concatenate(chunks[::-1]) if chunks else np.zeros(0, dtype="<u2")
    return x, words


def encode(symbols: torch.Tensor, alphabet_size: int) -> torch.Tensor:
    """Entropy-code a uint8 stream (any shape; flattened row-major) whose values are < alphabet_size.

    Returns the blob as a 1-D uint8 tensor; `decode(blob, symbols.numel(), alphabet_size)` inverts it.
    """
    sym = _as_symbols(symbols, alphabet_size)
    alphabet_size = int(alphabet_size)
    counts = np.bincount(sym, minlength=alphabet_size).astype(np.int64)
    present = np.flatnonzero(counts)
    blob = bytearray([FORMAT_VERSION])
    blob += np.packbits(counts > 0, bitorder="little").tobytes()
    if present.size < 2:  # nothing to code: the bitmap (and n) say it all
        return torch.frombuffer(blob, dtype=torch.uint8).clone()
    bits, q = _choose_model(counts[present])
    blob.append(bits)
    for value in q[:-1]:
        _write_varint(int(value), blob)
    freq = np.zeros(alphabet_size, dtype=np.int64)
    freq[present] = q << (PROB_BITS - bits)  # the coder always works at full precision
    cum = np.concatenate(([0], np.cumsum(freq)[:-1])).astype(np.int64)
    lanes = lanes_for(sym.size)
    if lanes <= _SCALAR_MAX_LANES:
        states, words = _encode_scalar(sym, freq.tolist(), cum.tolist(), lanes)
    else:
        states, words = _encode_vector(sym, freq, cum, lanes)
    blob += np.asarray(states, dtype="<u4").tobytes()
    blob += words.tobytes()
    return torch.frombuffer(blob, dtype=torch.uint8).clone()


def encoded_size(symbols: torch.Tensor, alphabet_size: int) -> int:
    """Exact byte size of `encode(symbols, alphabet_size)` (it runs the coder: sizes depend on the states)."""
    return int(encode(symbols, alphabet_size).numel())


def entropy_bits(symbols: torch.Tensor) -> float:
    """Shannon bound of the stream under its own empirical distribution: n * H, in bits (for reports)."""
    flat = symbols.detach().to("cpu").reshape(-1).to(torch.int64)
    if flat.numel() == 0:
        return 0.0
    counts = torch.bincount(flat).double()
    counts = counts[counts > 0]
    n = float(flat.numel())
    return float(-(counts * torch.log2(counts / n)).sum())


# ----------------------------------------------------------------------------------------------- decoding


def _as_bytes(blob) -> np.ndarray:
    if isinstance(blob, torch.Tensor):
        if blob.dtype != torch.uint8 or blob.dim() != 1:
            raise TypeError(f"blob must be a 1-D uint8 tensor, got {blob.dtype} of shape {tuple(blob.shape)}")
        return blob.detach().to("cpu").contiguous().numpy()
    return np.frombuffer(memoryview(blob).cast("B"), dtype=np.uint8)


def _read_varint(raw: np.ndarray, pos: int, limit: int) -> tuple[int, int]:
    """One minimal LEB128 varint in [1, limit) at raw[pos]; returns (value, next position)."""
    value, shift = 0, 0
    while True:
        if pos >= raw.size:
            raise EntropyCodingError("blob ends inside the frequency table")
        byte = int(raw[pos])
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
        if shift >= 21:  # values < 2**16 need at most 3 bytes
            raise EntropyCodingError("frequency varint is longer than 3 bytes")
    if (byte == 0 and shift > 7) or not 1 <= value < limit:
        raise EntropyCodingError(f"frequency {value} is not a minimal varint in [1, {limit})")
    return value, pos


def _read_model(raw: np.ndarray, alphabet_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Parse version, bitmap and table: (occurring symbols, their full-precision frequencies, offset after)."""
    bitmap_bytes = (alphabet_size + 7) // 8
    if raw.size < 1 + bitmap_bytes:
        raise EntropyCodingError(f"blob is {raw.size} bytes, shorter than its {1 + bitmap_bytes}-byte header")
    if raw[0] != FORMAT_VERSION:
        raise EntropyCodingError(f"unsupported entropy blob version {raw[0]} (this decoder knows {FORMAT_VERSION})")
    present = np.unpackbits(raw[1:1 + bitmap_bytes], bitorder="little")
    if present[alphabet_size:].any():
        raise EntropyCodingError(f"bitmap marks symbols beyond the alphabet of {alphabet_size}")
    symbols = np.flatnonzero(present)
    pos = 1 + bitmap_bytes
    if symbols.size < 2:
        return symbols, np.full(symbols.size, PROB_SCALE, dtype=np.int64), pos
    if pos >= raw.size:
        raise EntropyCodingError("blob ends before the table precision byte")
    bits = int(raw[pos])
    pos += 1
    if not (symbols.size - 1).bit_length() <= bits <= PROB_BITS:
        raise EntropyCodingError(f"table precision {bits} bits cannot hold {symbols.size} symbols or exceeds "
                                 f"{PROB_BITS}")
    scale = 1 << bits
    freq = np.zeros(symbols.size, dtype=np.int64)
    for k in range(symbols.size - 1):
        freq[k], pos = _read_varint(raw, pos, scale)
    freq[-1] = scale - int(freq[:-1].sum())
    if freq[-1] < 1:
        raise EntropyCodingError(f"frequencies sum to more than {scale}")
    return symbols, freq << (PROB_BITS - bits), pos


def _decode_scalar(states: list[int], words: list[int], symbols: list[int], freq: list[int], n: int) -> np.ndarray:
    cum = [0]
    for f in freq[:-1]:
        cum.append(cum[-1] + f)
    lanes = len(states)
    out = bytearray(n)
    pos = 0
    for i in range(n):
        lane = i % lanes
        x = states[lane]
        slot = x & (PROB_SCALE - 1)
        k = bisect.bisect_right(cum, slot) - 1
        out[i] = symbols[k]
        x = freq[k] * (x >> PROB_BITS) + slot - cum[k]
        if x < STATE_LOW:
            if pos >= len(words):
                raise EntropyCodingError("blob ends before the stream does (corrupted or truncated)")
            x = (x << WORD_BITS) | words[pos]
            pos += 1
        states[lane] = x
    _check_end(states, pos, len(words))
    return np.frombuffer(out, dtype=np.uint8)


def _decode_vector(states: np.ndarray, words: np.ndarray, symbols: np.ndarray, freq: np.ndarray,
                   n: int) -> np.ndarray:
    # Per-slot tables: which symbol a slot belongs to, that symbol's frequency, and slot - cum[symbol].
    owner = np.repeat(np.arange(symbols.size), freq)
    slot_symbol = symbols.astype(np.uint8)[owner]
    slot_freq = freq[owner]
    slot_bias = np.arange(PROB_SCALE, dtype=np.int64) - np.concatenate(([0], np.cumsum(freq)[:-1]))[owner]
    x = states.astype(np.int64)
    w = words.astype(np.int64)
    lanes = x.size
    out = np.empty(n, dtype=np.uint8)
    pos = 0
    for t in range(_steps(n, lanes)):
        start = t * lanes
        xs = x[:min(lanes, n - start)]
        slot = xs & (PROB_SCALE - 1)
        out[start:start + xs.size] = slot_symbol[slot]
        xs[:] = slot_freq[slot] * (xs >> PROB_BITS) + slot_bias[slot]
        low = np.flatnonzero(xs < STATE_LOW)
        if low.size:
            if pos + low.size > w.size:
                raise EntropyCodingError("blob ends before the stream does (corrupted or truncated)")
            xs[low] = (xs[low] << WORD_BITS) | w[pos:pos + low.size]
            pos += low.size
    _check_end(x.tolist(), pos, w.size)
    return out


def _check_end(states: list[int], pos: int, total_words: int) -> None:
    if pos != total_words:
        raise EntropyCodingError(f"{total_words - pos} coded words left over after the last symbol (corrupted?)")
    if any(x != STATE_LOW for x in states):
        raise EntropyCodingError("a lane did not return to its initial state: the blob is corrupted")


def decode(blob, n: int, alphabet_size: int) -> torch.Tensor:
    """Invert `encode`: returns a 1-D uint8 tensor of n symbols.

    `blob` is a uint8 tensor or any bytes-like object. `n` is trusted for the output allocation (a constant
    stream of any length is a few bytes), so callers must bound it, e.g. by a validated shape.
    """
    _check_alphabet(alphabet_size)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    n, alphabet_size = int(n), int(alphabet_size)
    raw = _as_bytes(blob)
    symbols, freq, pos = _read_model(raw, alphabet_size)
    if symbols.size == 0 and n > 0:
        raise EntropyCodingError(f"blob holds no symbols but {n} were expected")
    if symbols.size < 2:
        if pos != raw.size:
            raise EntropyCodingError(f"{raw.size - pos} unexpected bytes after a constant or empty stream")
        if n == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.full((n,), int(symbols[0]), dtype=torch.uint8)
    if n == 0:
        raise EntropyCodingError("blob codes several symbols but n is 0")
    lanes = lanes_for(n)
    if raw.size < pos + 4 * lanes or (raw.size - pos - 4 * lanes) % 2:
        raise EntropyCodingError(f"blob has {raw.size - pos} bytes after its table, which does not fit {lanes} "
                                 "lane states plus whole 16-bit words")
    states = np.frombuffer(raw, dtype="<u4", count=lanes, offset=pos).astype(np.int64)
    if (states < STATE_LOW).any():
        raise EntropyCodingError(f"a lane state is below {STATE_LOW}: the blob is corrupted")
    words = np.frombuffer(raw, dtype="<u2", offset=pos + 4 * lanes)
    if lanes <= _SCALAR_MAX_LANES:
        out = _decode_scalar(states.tolist(), words.tolist(), symbols.tolist(), freq.tolist(), n)
    else:
        out = _decode_vector(states, words, symbols, freq, n)
    return torch.from_numpy(out)
