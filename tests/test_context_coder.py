"""context_encode / context_decode: the file format's context-adaptive arithmetic coder of index matrices.

Checked against the Python mirror in weightshare.reference byte for byte, round-tripped over shapes, alphabets and
sparsity patterns, and its size compared with the static rANS coder and the independent-symbol Shannon bound."""
import math

import pytest
import torch

import weightshare as ws
from weightshare import entropy, reference

from conftest import requires_native

pytestmark = requires_native
W = torch.ops.weightshare


def sparse_indices(rows, cols, k, density, gen, dead_cols=0.0, dead_rows=0.0):
    """Indices with a background symbol 0 at 1 - density, whole dead columns/rows, the rest uniform in 1..k-1."""
    keep = torch.rand(rows, cols, generator=gen) < density
    keep &= torch.rand(1, cols, generator=gen) >= dead_cols
    keep &= torch.rand(rows, 1, generator=gen) >= dead_rows
    values = torch.randint(1, max(k, 2), (rows, cols), generator=gen) if k > 1 else torch.zeros(rows, cols)
    return torch.where(keep, values, 0).to(torch.uint8).contiguous()


@pytest.mark.parametrize("rows, cols, k, density", [
    (1, 1, 1, 0.0), (1, 7, 2, 0.5), (3, 5, 3, 0.3), (17, 33, 16, 0.05), (40, 25, 256, 0.9), (8, 300, 5, 1.0),
    (64, 64, 255, 0.02)])
def test_matches_reference_bytes_and_round_trips(rows, cols, k, density, gen):
    idx = sparse_indices(rows, cols, k, density, gen, dead_cols=0.2, dead_rows=0.1)
    stream = W.context_encode(idx, k)
    assert torch.equal(stream, reference.context_encode(idx, k))
    assert torch.equal(W.context_decode(stream, rows, cols, k), idx)
    assert torch.equal(reference.context_decode(stream, rows, cols, k), idx)


def test_background_need_not_be_zero(gen):
    idx = torch.full((20, 30), 7, dtype=torch.uint8)
    idx[torch.rand(20, 30, generator=gen) < 0.1] = 2
    stream = W.context_encode(idx, 8)
    assert stream[1] == 7 and torch.equal(W.context_decode(stream, 20, 30, 8), idx)


def test_large_pruned_layer_round_trips_and_beats_independent_coding(gen):
    # 300 x 784 at 5 % density with 40 % dead input columns (a pruned first layer on MNIST-like input)
    idx = sparse_indices(300, 784, 16, 0.05, gen, dead_cols=0.4, dead_rows=0.1)
    stream = ws.ops.context_encode(idx, 16)
    assert torch.equal(ws.ops.context_decode(stream, 300, 784, 16), idx)
    shannon_bytes = entropy.entropy_bits(idx.reshape(-1)) / 8
    # positions are ~60 % of the bits here and the dead columns and rows ~15 % of their information
    assert stream.numel() < 0.97 * shannon_bytes < entropy.encoded_size(idx.reshape(-1), 16)


def test_costs_little_more_than_static_coding_on_independent_symbols(gen):
    probs = torch.tensor([0.6, 0.2, 0.1, 0.05, 0.05])
    idx = torch.multinomial(probs, 200 * 500, replacement=True, generator=gen).to(torch.uint8).reshape(200, 500)
    stream = W.context_encode(idx.contiguous(), 5)
    bound = entropy.entropy_bits(idx.reshape(-1)) / 8
    assert bound < stream.numel() < 1.01 * bound + 64  # adaptation costs ~log(n) bits per model, not a table


@pytest.mark.parametrize("damage", ["flip", "truncate", "pad", "version", "background", "mode", "start"])
def test_damaged_streams_raise(damage, gen):
    idx = sparse_indices(50, 60, 8, 0.1, gen)
    stream = W.context_encode(idx, 8).clone()
    if damage == "flip":
        stream[len(stream) // 2] ^= 0x10
    elif damage == "truncate":
        stream = stream[:-2].clone()
    elif damage == "pad":
        stream = torch.cat([stream, torch.zeros(1, dtype=torch.uint8)])
    elif damage == "version":
        stream[0] = 3
    elif damage == "background":
        stream[1] = 8
    elif damage == "mode":
        stream[2] = 4
    else:
        stream[3] = 1
    for decode in (W.context_decode, reference.context_decode):
        try:
            out = decode(stream, 50, 60, 8)
        except ValueError:
            continue
        # a flipped bit may decode to other valid indices of the right count; it can never decode silently to the
        # original, and the container's SHA-256 catches it first in a file
        assert damage == "flip" and not torch.equal(out, idx)


@pytest.mark.parametrize("mode", range(4))
def test_every_occupancy_mode_round_trips_in_both_decoders(mode, gen):
    """Modes 1-3 code row / column occupancy first; the encoder keeps the shortest, the decoders read any."""
    idx = sparse_indices(30, 40, 6, 0.15, gen, dead_cols=0.3, dead_rows=0.4)
    flat, background = idx.reshape(-1).tolist(), 0
    stream = torch.tensor(list(reference._ctx_encode_mode(flat, 30, 40, 6, background, mode)), dtype=torch.uint8)
    assert stream[0] == 2 and stream[2] == mode
    assert torch.equal(W.context_decode(stream, 30, 40, 6), idx)
    assert torch.equal(reference.context_decode(stream, 30, 40, 6), idx)
    chosen = W.context_encode(idx, 6)
    assert chosen.numel() <= stream.numel()


def test_dead_rows_are_coded_by_occupancy_flags(gen):
    # 60 % of the rows empty (dead units): coding them as empty rows beats learning them position by position
    idx = sparse_indices(200, 300, 4, 0.05, gen, dead_rows=0.6)
    stream = W.context_encode(idx, 4)
    plain = reference._ctx_encode_mode(idx.reshape(-1).tolist(), 200, 300, 4, 0, 0)
    assert stream[2] & 1 and stream.numel() < 0.97 * len(plain)  # 1,155 vs 1,214 bytes when written
    assert torch.equal(W.context_decode(stream, 200, 300, 4), idx)


def test_version_1_streams_still_decode(gen):
    """A version-1 stream (session 4's files) is today's mode-0 stream without the mode byte."""
    idx = sparse_indices(25, 30, 5, 0.2, gen)
    mode0 = reference._ctx_encode_mode(idx.reshape(-1).tolist(), 25, 30, 5, 0, 0)
    v1 = torch.tensor([1, mode0[1]] + list(mode0[3:]), dtype=torch.uint8)
    assert torch.equal(W.context_decode(v1, 25, 30, 5), idx)
    assert torch.equal(reference.context_decode(v1, 25, 30, 5), idx)


def test_opcheck(gen):
    idx = sparse_indices(6, 9, 4, 0.3, gen)
    torch.library.opcheck(W.context_encode, (idx, 4))
    torch.library.opcheck(W.context_decode, (W.context_encode(idx, 4), 6, 9, 4))


def test_cuda_tensors_are_refused():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    with pytest.raises((RuntimeError, NotImplementedError)):
        W.context_encode(torch.zeros(2, 2, dtype=torch.uint8, device="cuda"), 2)


def test_wrappers_fall_back_to_the_reference_bytes(gen, monkeypatch):
    idx = sparse_indices(9, 11, 6, 0.4, gen)
    native = ws.ops.context_encode(idx, 6)
    monkeypatch.setattr(ws.ops, "_native", lambda op, *t: False)
    assert torch.equal(ws.ops.context_encode(idx, 6), native)
    assert torch.equal(ws.ops.context_decode(native, 9, 11, 6), idx)
    assert math.isfinite(float(native.float().mean()))
