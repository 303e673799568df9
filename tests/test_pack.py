"""pack/unpack: bit-exact round trips, the documented layout, and agreement with the reference."""
import pytest
import torch
from torch.library import opcheck

import weightshare as ws
from weightshare import reference
from weightshare.formats import packed_row_bytes

from conftest import requires_native

pytestmark = requires_native

SHAPES = [(1,), (7,), (33,), (3, 5), (4, 31), (2, 3, 64), (5, 1000)]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_and_reference(bits, shape, device, gen):
    idx = torch.randint(0, 1 << bits, shape, generator=gen, dtype=torch.uint8).to(device)
    packed = ws.ops.pack(idx, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], packed_row_bytes(shape[-1], bits))
    assert torch.equal(packed.cpu(), reference.pack(idx.cpu(), bits))
    assert torch.equal(ws.ops.unpack(packed, bits, shape[-1]), idx)


def test_documented_example():
    # formats.py: bits=3, indices [5, 1, 7] -> bytes 0b11001101, 0b00000001, then zero padding to 4 bytes
    packed = ws.ops.pack(torch.tensor([5, 1, 7], dtype=torch.uint8), 3)
    assert packed.tolist() == [0b11001101, 0b00000001, 0, 0]


@pytest.mark.parametrize("bits", [3, 5, 7])
def test_padding_bits_are_zero(bits, device, gen):
    n = 13
    idx = torch.full((4, n), (1 << bits) - 1, dtype=torch.uint8, device=device)
    packed = ws.ops.pack(idx, bits).cpu()
    used = n * bits
    stream = ((packed[..., None].long() >> torch.arange(8)) & 1).reshape(4, -1)
    assert stream[:, :used].all() and not stream[:, used:].any()


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_rows_are_word_aligned(bits):
    assert packed_row_bytes(1, bits) == 4
    assert all(packed_row_bytes(n, bits) % 4 == 0 for n in range(1, 200))


def test_out_of_range_index_raises(device):
    idx = torch.tensor([[0, 1, 8]], dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match="idx holds a value >= 2\\*\\*bits = 8"):
        torch.ops.weightshare.pack(idx, 3)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_opcheck(bits, device, gen):
    idx = torch.randint(0, 1 << bits, (6, 37), generator=gen, dtype=torch.uint8).to(device)
    opcheck(torch.ops.weightshare.pack.default, (idx, bits))
    opcheck(torch.ops.weightshare.unpack.default, (ws.ops.pack(idx, bits), bits, 37))


def test_compiles_with_torch_compile(gen):
    idx = torch.randint(0, 16, (8, 50), generator=gen, dtype=torch.uint8)

    @torch.compile(fullgraph=True, backend="eager")
    def f(i):
        return torch.ops.weightshare.unpack(torch.ops.weightshare.pack(i, 4), 4, 50)

    assert torch.equal(f(idx), idx)
