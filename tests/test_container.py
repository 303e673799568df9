"""The tensor container: round trips, exact sizes, atomic writes, and a refusal (ContainerError) for every way a
file can be truncated, corrupted, forged or oversized, before anything large is allocated."""
import hashlib
import json
import os
import pathlib
import pickle
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

from weightshare import container
from weightshare.container import (DTYPES, MAGIC, MAX_HEADER_BYTES, ContainerError, container_size, read_container,
                                   write_container)

SHAPES = [(), (0,), (1,), (7,), (2, 3), (2, 0, 4), (1, 1, 1, 5)]


def random_tensor(dtype: torch.dtype, shape, gen: torch.Generator) -> torch.Tensor:
    """Any bit pattern at all (NaNs, infinities, subnormals) for floats; 0/1 for bool."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    raw = torch.randint(0, 256, (nbytes,), generator=gen, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (torch.equal would call NaN != NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def assemble(header, data: bytes = b"", *, magic=MAGIC, version=1, flags=0, header_len=None,
             fix_checksum=True, pad_header=True) -> bytes:
    """Hand-build a container (header given as an object or raw bytes), with a correct checksum unless told not
    to: this is how a forger would write one, so the validators, not the checksum, must refuse it."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad_header:
        raw += b" " * (-len(raw) % 8)
    body = struct.pack("<8sIIQ", magic, version, flags, len(raw) if header_len is None else header_len) + raw + data
    return body + (hashlib.sha256(body).digest() if fix_checksum else bytes(32))


def entry(dtype="float32", shape=(2,), offset=0, nbytes=None):
    nbytes = torch.Size(shape).numel() * DTYPES[dtype].itemsize if nbytes is None else nbytes
    return {"dtype": dtype, "shape": list(shape), "offset": offset, "nbytes": nbytes}


@pytest.fixture
def sample(gen):
    tensors = {"codebook": torch.randn(4, 16, generator=gen), "indices": torch.randint(0, 16, (5, 7), generator=gen,
               dtype=torch.uint8), "scale": torch.tensor(0.5, dtype=torch.bfloat16), "empty": torch.empty(0, 3)}
    metadata = {"format": "weightshare", "layers": [{"name": "fc1", "bits": 4}], "ratio": 12.5, "note": None}
    return tensors, metadata


def layout_of(data: bytes) -> dict:
    """Region boundaries of a container file, from its own header."""
    header_len = struct.unpack_from("<Q", data, 16)[0]
    raw = data[24:24 + header_len]
    header = json.loads(zlib.decompressobj().decompress(raw) if struct.unpack_from("<I", data, 12)[0] else raw)
    start = 24 + header_len
    return {"header_len": header_len, "data_start": start, "entries": header["tensors"],
            "trailer": len(data) - 32}


# --------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_every_dtype_and_shape(tmp_path, gen, dtype_name, shape):
    dtype = DTYPES[dtype_name]
    tensors = {"t": random_tensor(dtype, shape, gen), "after": torch.arange(3, dtype=torch.int16)}
    path = tmp_path / "x.ws"
    written = write_container(path, tensors, {"shape": list(shape)})
    assert written == path.stat().st_size == container_size(tensors, {"shape": list(shape)})
    back, metadata = read_container(path)
    assert list(back) == ["t", "after"] and metadata == {"shape": list(shape)}
    assert all(same(back[k], tensors[k]) for k in tensors)


def test_tensors_own_their_memory_and_are_independent(tmp_path, sample):
    tensors, metadata = sample
    write_container(tmp_path / "x.ws", tensors, metadata)
    back, _ = read_container(tmp_path / "x.ws")
    for name, tensor in back.items():
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    back["codebook"].zero_()  # writable, and touches nothing else
    assert same(back["indices"], tensors["indices"])


def test_non_contiguous_views_and_autograd_tensors_are_written_as_values(tmp_path, gen):
    base = torch.randn(6, 5, generator=gen, requires_grad=True)
    tensors = {"t": base.t()[::2], "neg": torch.randn(3, generator=gen)._neg_view()}
    write_container(tmp_path / "x.ws", tensors, {})
    back, _ = read_container(tmp_path / "x.ws")
    assert torch.equal(back["t"], tensors["t"].detach()) and not back["t"].requires_grad
    assert torch.equal(back["neg"], tensors["neg"])


def test_empty_container_and_unicode_names(tmp_path):
    assert write_container(tmp_path / "e.ws", {}, {}) == container_size({}, {})
    assert read_container(tmp_path / "e.ws") == ({}, {})
    tensors = {"layer.权重": torch.ones(2), "\u00e9\ud83d": torch.zeros(1)}  # a lone surrogate survives too
    write_container(tmp_path / "u.ws", tensors, {"ключ": "значение"})
    back, metadata = read_container(tmp_path / "u.ws")
    assert list(back) == list(tensors) and metadata == {"ключ": "значение"}


def test_size_matches_file_and_output_is_deterministic(tmp_path, sample):
    tensors, metadata = sample
    size = container_size(tensors, metadata)
    assert write_container(tmp_path / "a.ws", tensors, metadata) == size
    write_container(tmp_path / "b.ws", tensors, metadata)
    assert (tmp_path / "a.ws").read_bytes() == (tmp_path / "b.ws").read_bytes()
    assert (tmp_path / "a.ws").stat().st_size == size


@pytest.mark.parametrize("deflate", [True, False])
def test_layout_is_aligned_and_documented(tmp_path, sample, deflate):
    tensors, metadata = sample
    write_container(tmp_path / "x.ws", tensors, metadata, deflate_header=deflate)
    data = (tmp_path / "x.ws").read_bytes()
    assert data[:8] == MAGIC and struct.unpack_from("<II", data, 8) == (1, int(deflate))
    assert len(data) == container_size(tensors, metadata, deflate)
    assert read_bytes(tmp_path, data)[1] == metadata
    layout = layout_of(data)
    assert layout["data_start"] % 8 == 0
    for name, e in layout["entries"].items():
        start = layout["data_start"] + e["offset"]
        assert start % 8 == 0
        assert data[start:start + e["nbytes"]] == tensors[name].reshape(-1).view(torch.uint8).numpy().tobytes()
    assert data[-32:] == hashlib.sha256(data[:-32]).digest()


# --------------------------------------------------------------------------------------------- write-side refusals


@pytest.mark.parametrize("tensor", [torch.zeros(2, dtype=torch.complex64), torch.zeros(2, dtype=torch.uint16),
                                    torch.zeros(2, dtype=torch.float8_e4m3fn), torch.zeros(2).to_sparse()],
                         ids=["complex64", "uint16", "float8", "sparse"])
def test_write_refuses_unsupported_tensors(tmp_path, tensor):
    with pytest.raises(ContainerError, match="dtype|layout"):
        write_container(tmp_path / "x.ws", {"t": tensor}, {})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("metadata, message", [
    ({"t": (1, 2)}, "use a list"), ({1: "a"}, "JSON keys are strings"), ({"x": float("nan")}, "NaN"),
    ({"x": [float("inf")]}, "infinity"), ({"x": object()}, "JSON cannot hold"), ({"x": b"raw"}, "bytes"),
])
def test_write_refuses_metadata_json_would_change(tmp_path, metadata, message):
    with pytest.raises(ContainerError, match=message):
        write_container(tmp_path / "x.ws", {}, metadata)


def test_write_argument_types(tmp_path):
    with pytest.raises(TypeError):
        write_container(tmp_path / "x.ws", {"a": [1, 2]}, {})
    with pytest.raises(TypeError):
        write_container(tmp_path / "x.ws", {}, [])
    with pytest.raises(TypeError):
        write_container(tmp_path / "x.ws", {"": torch.ones(1)}, {})


def test_write_refuses_a_header_over_the_cap(tmp_path):
    with pytest.raises(ContainerError, match="cap"):
        container_size({}, {"blob": "x" * MAX_HEADER_BYTES})


# --------------------------------------------------------------------------------------------- corruption


def read_bytes(tmp_path, data: bytes, **kwargs):
    path = tmp_path / "bad.ws"
    path.write_bytes(data)
    return read_container(path, **kwargs)


def test_truncation_at_every_region_boundary(tmp_path, sample):
    tensors, metadata = sample
    write_container(tmp_path / "x.ws", tensors, metadata)
    data = (tmp_path / "x.ws").read_bytes()
    layout = layout_of(data)
    cuts = {0, 1, 7, 8, 12, 16, 23, 24, 25, layout["data_start"] - 1, layout["data_start"], layout["trailer"],
            len(data) - 1}
    for e in layout["entries"].values():
        cuts |= {layout["data_start"] + e["offset"], layout["data_start"] + e["offset"] + e["nbytes"]}
    for cut in sorted(c for c in cuts if c < len(data)):
        with pytest.raises(ContainerError, match="truncated|shorter"):
            read_bytes(tmp_path, data[:cut])


@pytest.mark.parametrize("region", ["header-name", "buffer", "padding", "trailer", "preamble-reserved"])
def test_flipped_byte_in_each_region(tmp_path, sample, region):
    tensors, metadata = sample
    write_container(tmp_path / "x.ws", tensors, metadata, deflate_header=False)
    data = bytearray((tmp_path / "x.ws").read_bytes())
    layout = layout_of(bytes(data))
    scale = layout["entries"]["scale"]
    position = {
        "header-name": data.index(b'"codebook"') + 3,  # still valid JSON, still a valid name: only the checksum
        "buffer": layout["data_start"] + layout["entries"]["indices"]["offset"] + 3,
        "padding": layout["data_start"] + scale["offset"] + scale["nbytes"] + 1,
        "trailer": len(data) - 5,
        "preamble-reserved": 13,
    }[region]
    data[position] ^= 0x20
    with pytest.raises(ContainerError, match="unknown flags" if region == "preamble-reserved" else "checksum"):
        read_bytes(tmp_path, bytes(data))


def test_corruption_that_breaks_the_header_is_reported_as_corruption(tmp_path, sample):
    tensors, metadata = sample
    write_container(tmp_path / "x.ws", tensors, metadata, deflate_header=False)
    data = bytearray((tmp_path / "x.ws").read_bytes())
    data[data.index(b'"dtype"')] ^= 0x80  # no longer UTF-8
    with pytest.raises(ContainerError, match=r"checksum mismatch.*header is not valid UTF-8"):
        read_bytes(tmp_path, bytes(data))
    write_container(tmp_path / "y.ws", tensors, metadata)  # deflated: a flipped byte breaks the stream
    data = bytearray((tmp_path / "y.ws").read_bytes())
    data[24 + 10] ^= 0x55
    with pytest.raises(ContainerError, match=r"checksum mismatch"):
        read_bytes(tmp_path, bytes(data))


def deflated(obj, tail: bytes = b"") -> bytes:
    raw = zlib.compress(json.dumps(obj).encode()) + tail
    return raw + bytes(-len(raw) % 8)


@pytest.mark.parametrize("raw, message", [
    (deflated({"tensors": {}, "metadata": {}}), None),
    (b"not zlib" * 2, "does not inflate"),
    (zlib.compress(json.dumps({"tensors": {}, "metadata": {}}).encode())[:-6] + bytes(2), "incomplete"),
    (deflated({"tensors": {}, "metadata": {}}, b"\x01"), "other than zero padding"),
    (deflated({"tensors": {}, "metadata": {}}) + bytes(8), "more than alignment needs"),
    (deflated({"tensors": {}, "metadata": {"x": " " * (17 << 20)}}), "past the 16777216-byte cap"),  # a bomb
    (deflated([1]), "not an object"),
])
def test_deflated_headers_are_inflated_with_bounds(tmp_path, raw, message):
    data = assemble(raw, flags=1)
    if message is None:
        assert read_bytes(tmp_path, data) == ({}, {})
    else:
        with pytest.raises(ContainerError, match=message):
            read_bytes(tmp_path, data)


def test_wrong_magic_version_and_flags(tmp_path):
    good = assemble({"tensors": {}, "metadata": {}})
    assert read_bytes(tmp_path, good) == ({}, {})
    with pytest.raises(ContainerError, match="not a weightshare container"):
        read_bytes(tmp_path, assemble({"tensors": {}, "metadata": {}}, magic=b"\x89WSHARF\n"))
    with pytest.raises(ContainerError, match="unsupported container format version 2"):
        read_bytes(tmp_path, assemble({"tensors": {}, "metadata": {}}, version=2))
    with pytest.raises(ContainerError, match="unknown flags"):
        read_bytes(tmp_path, assemble({"tensors": {}, "metadata": {}}, flags=2))
    with pytest.raises(ContainerError, match="does not inflate"):  # the flag says deflated, the header is not
        read_bytes(tmp_path, assemble({"tensors": {}, "metadata": {}}, flags=1))


@pytest.mark.parametrize("header_len, message", [
    (4096, "runs past the end"), (2**63, "cap"), (MAX_HEADER_BYTES + 8, "cap"), (27, "multiple of 8")])
def test_lying_header_length(tmp_path, header_len, message):
    with pytest.raises(ContainerError, match=message):
        read_bytes(tmp_path, assemble({"tensors": {}, "metadata": {}}, header_len=header_len))


@pytest.mark.parametrize("raw", [
    b'{"tensors":{},"tensors":{},"metadata":{}}',
    b'{"tensors":{"a":{"dtype":"uint8","shape":[0],"offset":0,"nbytes":0},'
    b'"a":{"dtype":"uint8","shape":[0],"offset":0,"nbytes":0}},"metadata":{}}',
    b'{"tensors":{"a":{"dtype":"uint8","dtype":"int8","shape":[0],"offset":0,"nbytes":0}},"metadata":{}}',
    b'{"tensors":{},"metadata":{"k":1,"k":2}}',
], ids=["top", "tensor-name", "entry-field", "metadata"])
def test_duplicate_json_keys_anywhere(tmp_path, raw):
    with pytest.raises(ContainerError, match="duplicate key"):
        read_bytes(tmp_path, assemble(raw))


@pytest.mark.parametrize("raw, message", [
    (b"\xff\xfe{}", "UTF-8 JSON"), (b"{not json}", "UTF-8 JSON"), (b"[]", "not an object"),
    (b'{"tensors":{}}', "header keys"), (b'{"tensors":{},"metadata":{},"extra":1}', "header keys"),
    (b'{"tensors":[],"metadata":{}}', "'tensors' is a list"), (b'{"tensors":{},"metadata":[]}', "'metadata' is"),
    (b'{"tensors":{},"metadata":{"x":NaN}}', "NaN"), (b'{"tensors":{"a":5},"metadata":{}}', "not an object"),
    (b'{"tensors":{"a":{"dtype":"uint8"}},"metadata":{}}', "keys are"),
    (b'{"tensors":{"":{"dtype":"uint8","shape":[],"offset":0,"nbytes":1}},"metadata":{}}', "empty name"),
    (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
], ids=["utf8", "json", "array", "missing", "extra", "tensors-list", "metadata-list", "nan", "entry-int",
        "entry-keys", "empty-name", "deep"])
def test_malformed_header_json(tmp_path, raw, message):
    with pytest.raises(ContainerError, match=message):
        read_bytes(tmp_path, assemble(raw, bytes(8)))


@pytest.mark.parametrize("bad, message", [
    ({"dtype": "complex64"}, "dtype 'complex64'"), ({"dtype": "float"}, "dtype 'float'"), ({"dtype": 5}, "dtype 5"),
    ({"dtype": "uint16", "nbytes": 4}, "dtype 'uint16'"),
    ({"shape": [3]}, "nbytes says 8"), ({"nbytes": 12}, "nbytes says 12"), ({"shape": [-2]}, "non-negative"),
    ({"shape": [2.0]}, "non-negative"), ({"shape": [True, 2]}, "non-negative"), ({"shape": "2"}, "list"),
    ({"shape": [1] * 65}, "list of at most 64"), ({"offset": -8}, "offset -8"), ({"offset": 8.0}, "offset 8.0"),
    ({"nbytes": None}, "nbytes None"), ({"shape": [2**70, 0], "nbytes": 0}, "too large"),
    ({"shape": [2**62, 2**62, 0], "nbytes": 0}, "too large"),
])
def test_bad_entry_fields(tmp_path, bad, message):
    e = {**entry("float32", (2,)), **bad}
    with pytest.raises(ContainerError, match=message):
        read_bytes(tmp_path, assemble({"tensors": {"w": e}, "metadata": {}}, bytes(8)))


@pytest.mark.parametrize("second_offset, message", [(0, "overlaps"), (4, "multiple of 8"), (16, "gap"),
                                                     (8, None)])
def test_offsets_in_order_aligned_non_overlapping(tmp_path, second_offset, message):
    header = {"tensors": {"a": entry("float32", (2,), 0), "b": entry("float32", (2,), second_offset)},
              "metadata": {}}
    data = bytes(8) + bytes(second_offset - 8 if second_offset > 8 else 0) + bytes(8)
    if message is None:
        back, _ = read_bytes(tmp_path, assemble(header, bytes(16)))
        assert list(back) == ["a", "b"]
        return
    with pytest.raises(ContainerError, match=message):
        read_bytes(tmp_path, assemble(header, data))


def test_buffers_out_of_header_order_are_refused(tmp_path):
    header = {"tensors": {"b": entry("float32", (2,), 8), "a": entry("float32", (2,), 0)}, "metadata": {}}
    with pytest.raises(ContainerError, match="gap"):
        read_bytes(tmp_path, assemble(header, bytes(16)))


def test_file_size_must_match_the_header_exactly(tmp_path):
    header = {"tensors": {"a": entry("float32", (2,), 0)}, "metadata": {}}
    with pytest.raises(ContainerError, match="after the"):
        read_bytes(tmp_path, assemble(header, bytes(16)))
    with pytest.raises(ContainerError, match="truncated"):
        read_bytes(tmp_path, assemble(header, b""))


def test_nonzero_padding_and_bad_bool_bytes_are_refused_even_with_a_valid_checksum(tmp_path):
    header = {"tensors": {"a": entry("uint8", (3,), 0)}, "metadata": {}}
    with pytest.raises(ContainerError, match="nonzero padding"):
        read_bytes(tmp_path, assemble(header, b"\x01\x02\x03\x00\x00\x09\x00\x00"))
    header = {"tensors": {"a": entry("bool", (3,), 0)}, "metadata": {}}
    with pytest.raises(ContainerError, match="bool buffer"):
        read_bytes(tmp_path, assemble(header, b"\x01\x02\x00" + bytes(5)))


@pytest.mark.parametrize("consistent_nbytes", [True, False])
def test_huge_declared_shape_fails_fast_without_allocating(tmp_path, consistent_nbytes):
    shape = (2**31, 2**31)  # 2**62 elements
    nbytes = 2**62 * 4 if consistent_nbytes else 8
    header = {"tensors": {"w": entry("float32", shape, 0, nbytes)}, "metadata": {}}
    path = tmp_path / "huge.ws"
    path.write_bytes(assemble(header, bytes(8)))
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ContainerError, match="bytes of file|nbytes says"):
            read_container(path)
        with pytest.raises(ContainerError, match="max_bytes|nbytes says"):
            read_container(path, max_bytes=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 0.5
    assert peak < 1 << 20


def test_reading_holds_the_data_once(tmp_path):
    """Each buffer is read straight into its tensor: no Python-side copy of the data section (an 8 MiB file is read
    with well under 1 MiB of Python allocations; the whole-file bytearray it replaced was 8 MiB)."""
    tensors = {"a": torch.randn(1 << 20), "b": torch.randint(0, 255, (1 << 22,), dtype=torch.uint8)}
    write_container(tmp_path / "big.ws", tensors, {})
    tracemalloc.start()
    try:
        got, _ = read_container(tmp_path / "big.ws")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert all(torch.equal(got[k], v) for k, v in tensors.items())


def test_max_bytes(tmp_path, sample):
    tensors, metadata = sample
    write_container(tmp_path / "x.ws", tensors, metadata)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    read_container(tmp_path / "x.ws", max_bytes=total)
    with pytest.raises(ContainerError, match=f"over max_bytes={total - 1}"):
        read_container(tmp_path / "x.ws", max_bytes=total - 1)


class _Trap:
    """Unpickling this creates a marker file: proof that the payload would run code if unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_pickle_payload_is_refused_and_never_executed(tmp_path):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Trap(proof)))
    assert proof.exists()  # the payload is live
    marker = tmp_path / "marker"
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        with pytest.raises(ContainerError, match="not a weightshare container|shorter"):
            read_bytes(tmp_path, pickle.dumps(_Trap(marker), protocol=protocol))
    torch.save({"x": _Trap(marker)}, tmp_path / "bad.ws")  # torch's zip-of-pickles format
    with pytest.raises(ContainerError, match="not a weightshare container"):
        read_container(tmp_path / "bad.ws")
    assert not marker.exists()


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_container(tmp_path / "absent.ws")


# --------------------------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt])
def test_write_interrupted_by_an_exception_leaves_the_old_file(tmp_path, monkeypatch, sample, exception):
    tensors, metadata = sample
    path = tmp_path / "x.ws"
    write_container(path, {"old": torch.arange(10)}, {"v": 1})
    before = path.read_bytes()
    real = container._tensor_bytes
    calls = []

    def fail_on_second(tensor):
        calls.append(1)
        if len(calls) == 2:
            raise exception("interrupted mid-write")
        return real(tensor)

    monkeypatch.setattr(container, "_tensor_bytes", fail_on_second)
    with pytest.raises(exception, match="mid-write"):
        write_container(path, tensors, metadata)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.ws"]  # the temporary file is gone


def test_write_fsyncs_before_replacing(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    write_container(tmp_path / "x.ws", {"a": torch.ones(3)}, {})
    assert events[:2] == ["fsync", "replace"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_overwrite_keeps_permissions_and_new_files_follow_the_umask(tmp_path):
    path = tmp_path / "x.ws"
    write_container(path, {}, {})
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    os.chmod(path, 0o640)
    write_container(path, {"a": torch.ones(1)}, {})
    assert path.stat().st_mode & 0o777 == 0o640


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_write_through_a_symlink_replaces_its_target(tmp_path):
    (tmp_path / "real.ws").write_bytes(b"old")
    (tmp_path / "link.ws").symlink_to(tmp_path / "real.ws")
    write_container(tmp_path / "link.ws", {"a": torch.ones(2)}, {})
    assert (tmp_path / "link.ws").is_symlink()
    assert torch.equal(read_container(tmp_path / "real.ws")[0]["a"], torch.ones(2))


def test_write_into_a_missing_directory_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_container(tmp_path / "nope" / "x.ws", {}, {})
    assert list(tmp_path.iterdir()) == []


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from weightshare import container
    real = container._tensor_bytes
    def announce_then_stall(tensor):
        raw = real(tensor)
        print("WRITING", flush=True)  # the first big buffer is about to go out: the parent kills us here
        time.sleep(60)
        return raw
    if sys.argv[2] == "stall":
        container._tensor_bytes = announce_then_stall
    big = {f"t{i}": torch.full((4 << 20,), float(i)) for i in range(4)}  # 64 MiB
    while True:
        container.write_container(sys.argv[1], big, {"writer": "child"})
        print("WRITING", flush=True)
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("mode", ["stall", "loop"])
def test_sigkill_while_writing_leaves_a_valid_file(tmp_path, mode):
    path = tmp_path / "x.ws"
    write_container(path, {"old": torch.arange(100)}, {"writer": "parent"})
    before = path.read_bytes()
    child = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(path), mode], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"WRITING"
        if mode == "loop":
            time.sleep(random.Random(0).uniform(0.05, 0.3))  # somewhere inside a later write
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    tensors, metadata = read_container(path)  # whichever file is there is complete and valid
    if mode == "stall":
        assert path.read_bytes() == before
        assert list(tmp_path.glob(".x.ws.*.tmp"))  # proof the kill landed mid-write
    else:
        assert metadata == {"writer": "child"} and set(tensors) == {"t0", "t1", "t2", "t3"}
    for orphan in tmp_path.glob(".x.ws.*.tmp"):  # what SIGKILL can leave: a hidden temporary, never the target
        orphan.unlink()


# --------------------------------------------------------------------------------------------- properties


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


@st.composite
def tensor_dicts(draw):
    names = draw(st.lists(st.text(min_size=1, max_size=8), max_size=5, unique=True))
    result = {}
    for name in names:
        dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        seed = draw(st.integers(0, 2**31))
        result[name] = random_tensor(dtype, shape, torch.Generator().manual_seed(seed))
    return result


@settings(max_examples=200, deadline=None)
@given(tensors=tensor_dicts(), metadata=st.dictionaries(st.text(max_size=6), json_values, max_size=4))
def test_property_round_trip(tmp_path_factory, tensors, metadata):
    path = tmp_path_factory.mktemp("prop") / "x.ws"
    assert write_container(path, tensors, metadata) == container_size(tensors, metadata) == path.stat().st_size
    back, meta = read_container(path)
    assert meta == metadata and list(back) == list(tensors)
    assert all(same(back[k], tensors[k]) for k in tensors)


def _mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:  # flip one bit
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # overwrite a few bytes
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(len(out))] = rng.randrange(256)
    elif kind == 2:  # truncate
        del out[rng.randrange(len(out)):]
    elif kind == 3:  # insert
        i = rng.randrange(len(out) + 1)
        out[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:  # delete a run
        i = rng.randrange(len(out))
        del out[i:i + rng.randint(1, 16)]
    return bytes(out)


def _fix_checksum(data: bytes) -> bytes:
    return data[:-32] + hashlib.sha256(data[:-32]).digest() if len(data) >= 32 else data


@pytest.mark.parametrize("fix", [False, True], ids=["raw", "checksum-fixed"])
def test_mutation_fuzz_only_ever_raises_container_error(tmp_path, sample, fix):
    """Random damage must never surface as any other exception. With the checksum recomputed after the damage
    (a forger), the header validators themselves are being fuzzed; whatever then reads must be a valid file."""
    tensors, metadata = sample
    write_container(tmp_path / "x.ws", tensors, metadata)
    original = (tmp_path / "x.ws").read_bytes()
    rng = random.Random(1234 + fix)
    path = tmp_path / "m.ws"
    outcomes = {"refused": 0, "read": 0}
    for _ in range(2000):
        mutated = _mutate(original, rng)
        if fix:
            mutated = _fix_checksum(mutated)
        path.write_bytes(mutated)
        try:
            back, meta = read_container(path)
        except ContainerError:
            outcomes["refused"] += 1
            continue
        outcomes["read"] += 1
        if not fix:  # only a mutation that changed nothing can pass the checksum
            assert mutated == original
        else:  # a forged file that passes every check is a valid container: what was read is what it holds,
            write_container(tmp_path / "again.ws", back, meta)  # so writing it again reproduces its data section
            again = (tmp_path / "again.ws").read_bytes()
            assert again[layout_of(again)["data_start"]:-32] == mutated[layout_of(mutated)["data_start"]:-32]
    assert outcomes["refused"] > 1500
