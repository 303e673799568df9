"""The rANS index coder: lossless round trips, size close to the Shannon bound, speed, the documented layout, and
EntropyCodingError (a ContainerError) for every corrupt blob."""
import random
import time

import numpy as np
import pytest
import torch

from weightshare import entropy
from weightshare.container import ContainerError
from weightshare.entropy import (EntropyCodingError, decode, encode, encoded_size, entropy_bits, lanes_for,
                                 SYMBOLS_PER_LANE)


def skewed(n: int, alphabet: int, dominant: float, seed: int = 0) -> torch.Tensor:
    """One symbol (0) with probability `dominant`, the rest uniform over the other alphabet - 1 symbols."""
    rng = np.random.default_rng(seed)
    probs = np.full(alphabet, (1 - dominant) / max(alphabet - 1, 1))
    probs[0] = dominant if alphabet > 1 else 1.0
    return torch.from_numpy(rng.choice(alphabet, n, p=probs).astype(np.uint8))


def uniform(n: int, alphabet: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, alphabet, n).astype(np.uint8))


def round_trip(symbols: torch.Tensor, alphabet: int) -> torch.Tensor:
    blob = encode(symbols, alphabet)
    assert blob.dtype == torch.uint8 and blob.dim() == 1
    assert encoded_size(symbols, alphabet) == blob.numel()
    out = decode(blob, symbols.numel(), alphabet)
    assert out.dtype == torch.uint8 and torch.equal(out, symbols.reshape(-1))
    assert torch.equal(decode(bytes(blob.numpy()), symbols.numel(), alphabet), out)  # bytes-like input too
    return blob


STREAMS = {
    "uniform16": lambda n: (uniform(n, 16), 16),
    "skewed90": lambda n: (skewed(n, 16, 0.9), 16),
    "single-symbol": lambda n: (torch.full((n,), 3, dtype=torch.uint8), 4),
    "two-symbols": lambda n: (skewed(n, 2, 0.7), 2),
    "256-symbols": lambda n: (uniform(n, 256), 256),
    "256-skewed": lambda n: (skewed(n, 256, 0.99), 256),
    "alphabet-1": lambda n: (torch.zeros(n, dtype=torch.uint8), 1),
}


@pytest.mark.parametrize("kind", list(STREAMS))
@pytest.mark.parametrize("n", [0, 1, 2, 1000, SYMBOLS_PER_LANE, SYMBOLS_PER_LANE + 1, 17 * SYMBOLS_PER_LANE + 5])
def test_round_trip(kind, n):
    symbols, alphabet = STREAMS[kind](n)
    round_trip(symbols, alphabet)


def test_multidimensional_input_is_flattened_row_major():
    symbols = uniform(600, 8).reshape(20, 30).t()  # non-contiguous too
    blob = encode(symbols, 8)
    assert torch.equal(decode(blob, 600, 8), symbols.reshape(-1))


@pytest.mark.parametrize("n", [3 * SYMBOLS_PER_LANE + 7, 20 * SYMBOLS_PER_LANE + 1])
def test_scalar_and_vector_paths_write_and_read_the_same_bytes(monkeypatch, n):
    symbols = skewed(n, 16, 0.8, seed=n)
    monkeypatch.setattr(entropy, "_SCALAR_MAX_LANES", 10**9)
    scalar = encode(symbols, 16)
    monkeypatch.setattr(entropy, "_SCALAR_MAX_LANES", 0)
    vector = encode(symbols, 16)
    assert torch.equal(scalar, vector)
    assert torch.equal(decode(scalar, n, 16), symbols)
    monkeypatch.setattr(entropy, "_SCALAR_MAX_LANES", 10**9)
    assert torch.equal(decode(vector, n, 16), symbols)


def test_lanes_policy():
    assert [lanes_for(n) for n in (0, 1, SYMBOLS_PER_LANE, SYMBOLS_PER_LANE + 1)] == [0, 1, 1, 2]


def test_documented_layout_of_a_small_blob():
    blob = encode(torch.tensor([0, 2, 0, 0], dtype=torch.uint8), 10).tolist()
    assert blob[0] == entropy.FORMAT_VERSION
    assert blob[1:3] == [0b00000101, 0]  # bitmap: symbols 0 and 2 occur (10-symbol alphabet: 2 bytes)
    bits = blob[3]
    assert 1 <= bits <= 16
    assert blob[4] == (1 << bits) * 3 // 4  # frequency of symbol 0 (3 of 4), one-byte varint; symbol 2's is implied
    assert len(blob) == 5 + 4  # one lane state, no words needed for four symbols
    state = int.from_bytes(bytes(blob[5:9]), "little")
    assert 1 << 16 <= state < 1 << 32
    assert encode(torch.full((9,), 7, dtype=torch.uint8), 8).tolist() == [1, 0b10000000]  # constant stream
    assert encode(torch.empty(0, dtype=torch.uint8), 8).tolist() == [1, 0]


# --------------------------------------------------------------------------------------------- size and speed


def test_entropy_bits():
    assert entropy_bits(torch.tensor([0, 1] * 50, dtype=torch.uint8)) == pytest.approx(100.0)
    assert entropy_bits(torch.zeros(10, dtype=torch.uint8)) == 0.0
    assert entropy_bits(torch.empty(0, dtype=torch.uint8)) == 0.0
    assert entropy_bits(torch.arange(256, dtype=torch.uint8)) == pytest.approx(256 * 8)


def overhead_allowance(n: int, alphabet: int) -> int:
    """Bytes a blob may spend beyond 1.01 x Shannon: header, a frequency table of up to 3-byte varints, 4 bytes
    of final state per lane."""
    return 2 + (alphabet + 7) // 8 + 3 * alphabet + 4 * lanes_for(n)


@pytest.mark.parametrize("alphabet, dominant", [(2, 0.9), (4, 0.9), (16, 0.9), (16, 0.6), (32, 0.99), (256, 0.5)])
def test_size_is_within_a_percent_of_the_shannon_bound(alphabet, dominant):
    n = 200_000
    symbols = skewed(n, alphabet, dominant, seed=alphabet)
    size = round_trip(symbols, alphabet).numel()
    bound = entropy_bits(symbols) / 8
    assert bound <= size <= 1.01 * bound + overhead_allowance(n, alphabet)
    assert size < n * max(1, (alphabet - 1).bit_length()) / 8  # beats fixed-width packing


def test_near_bound_for_uniform_streams():
    symbols = uniform(300_000, 256)
    size = round_trip(symbols, 256).numel()
    assert size <= 1.003 * entropy_bits(symbols) / 8 + overhead_allowance(300_000, 256)


def test_speed_500k_symbols_well_under_a_second():
    symbols = skewed(500_000, 16, 0.9)
    best = float("inf")
    for _ in range(2):  # best of two: the machine may be shared
        start = time.perf_counter()
        blob = encode(symbols, 16)
        decode(blob, symbols.numel(), 16)
        best = min(best, time.perf_counter() - start)
    assert best < 1.0, f"encode+decode of 500k symbols took {best:.2f} s"


# --------------------------------------------------------------------------------------------- bad input


def test_encode_argument_checks():
    with pytest.raises(ValueError, match="outside the alphabet"):
        encode(torch.tensor([0, 4], dtype=torch.uint8), 4)
    with pytest.raises(TypeError, match="uint8"):
        encode(torch.tensor([0, 1]), 4)
    for bad in (0, 257, 2.0, True):
        with pytest.raises(ValueError, match="alphabet_size"):
            encode(torch.zeros(2, dtype=torch.uint8), bad)
    with pytest.raises(ValueError, match="n must be"):
        decode(encode(torch.zeros(2, dtype=torch.uint8), 2), -1, 2)


def test_errors_are_container_errors():
    assert issubclass(EntropyCodingError, ContainerError) and issubclass(EntropyCodingError, ValueError)


def blob_of(symbols, alphabet):
    return bytearray(encode(symbols, alphabet).numpy().tobytes())


@pytest.mark.parametrize("edit, n, message", [
    (lambda b: b.__setitem__(0, 2), 1000, "version"),
    (lambda b: b.__setitem__(2, 0x10), 1000, "beyond the alphabet"),  # bit 12 of a 12-symbol alphabet
    (lambda b: b.__setitem__(3, 17), 1000, "precision"),
    (lambda b: b.__setitem__(3, 0), 1000, "precision"),
    (lambda b: b.__setitem__(4, 0x80) or b.__setitem__(5, 0x80) or b.__setitem__(6, 0x80), 1000, "varint"),
    (lambda b: b.__setitem__(4, 0), 1000, "frequency 0"),
    (lambda b: b.__delitem__(slice(len(b) - 1, None)), 1000, "fit"),
    (lambda b: b.extend(b"\x00\x00"), 1000, "left over|did not return"),
    (lambda b: b.__delitem__(slice(len(b) - 2, None)), 1000, "ends before|did not return"),
], ids=["version", "bitmap", "precision-high", "precision-low", "varint-long", "freq-zero", "odd-words",
        "extra-word", "missing-word"])
def test_specific_corruptions(edit, n, message):
    blob = blob_of(skewed(n, 12, 0.7), 12)
    edit(blob)
    with pytest.raises(EntropyCodingError, match=message):
        decode(blob, n, 12)


def test_frequencies_summing_past_the_scale_are_refused():
    blob = blob_of(torch.tensor([0, 1, 2, 0], dtype=torch.uint8), 3)
    bits = blob[2]
    blob[3] = (1 << bits) - 1  # the first frequency alone now fills the scale, leaving nothing for the others
    with pytest.raises(EntropyCodingError, match="sum to more"):
        decode(blob, 4, 3)


def test_state_below_the_lower_bound_is_refused():
    blob = blob_of(torch.tensor([0, 1, 0, 0], dtype=torch.uint8), 2)
    blob[-4:] = (5).to_bytes(4, "little")
    with pytest.raises(EntropyCodingError, match="below"):
        decode(blob, 4, 2)


def test_count_mismatches_are_refused():
    with pytest.raises(EntropyCodingError, match="no symbols"):
        decode(encode(torch.empty(0, dtype=torch.uint8), 4), 5, 4)
    with pytest.raises(EntropyCodingError, match="n is 0"):
        decode(encode(torch.tensor([0, 1], dtype=torch.uint8), 4), 0, 4)
    with pytest.raises(EntropyCodingError, match="unexpected bytes"):
        decode(bytes(encode(torch.zeros(5, dtype=torch.uint8), 4).numpy()) + b"\x00", 5, 4)
    blob = encode(skewed(5000, 4, 0.6), 4)
    with pytest.raises(EntropyCodingError):
        decode(blob, 4999, 4)


@pytest.mark.parametrize("n", [300, 3 * SYMBOLS_PER_LANE, 20 * SYMBOLS_PER_LANE])
def test_every_truncation_and_many_flips_are_caught(n):
    """A damaged blob either raises EntropyCodingError or (rarely) is itself a valid encoding of some other
    stream, which re-encodes to exactly the same bytes; nothing else, and never an out-of-bounds read."""
    symbols = skewed(n, 8, 0.8, seed=n)
    blob = blob_of(symbols, 8)
    rng = random.Random(n)
    small = len(blob) < 400  # small blobs are damaged everywhere; large ones (slower to decode) at samples
    for cut in range(len(blob)) if small else rng.sample(range(len(blob)), 20):
        with pytest.raises(EntropyCodingError):
            decode(blob[:cut], n, 8)
    for position in range(len(blob)) if small else rng.sample(range(len(blob)), 40):
        damaged = bytearray(blob)
        damaged[position] ^= 1 << rng.randrange(8)
        try:
            out = decode(damaged, n, 8)
        except EntropyCodingError:
            continue
        assert bytes(encode(out, 8).numpy()) == bytes(damaged)


def test_random_garbage_only_raises_entropy_coding_errors():
    rng = random.Random(7)
    for _ in range(1000):
        alphabet = rng.choice([2, 5, 16, 256])
        n = rng.choice([0, 1, 10, 500])
        garbage = bytes([1]) + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
        try:
            out = decode(garbage, n, alphabet)
        except EntropyCodingError:
            continue
        assert out.numel() == n and (out.numel() == 0 or int(out.max()) < alphabet)
