"""A safe file container for named tensors plus JSON metadata (the layer under `ws.save` / `ws.load`).

Format, version 1 (all integers little-endian; offsets are absolute file offsets unless said otherwise)::

    offset          size        field
    0               8           magic  b"\\x89WSHARE\\n"
    8               4           format version, uint32 (= 1)
    12              4           flags, uint32: 0, or FLAG_DEFLATED_HEADER (= 1); a reader refuses anything else
    16              8           header length H, uint64: a multiple of 8, at most 16 MiB
    24              H           header: UTF-8 JSON (ASCII in practice), padded at the end with spaces to H bytes;
                                with FLAG_DEFLATED_HEADER, a zlib stream (RFC 1950) of that JSON (unpadded, at
                                most 16 MiB inflated), padded at the end with zero bytes to H bytes
    24+H            D           data section: the tensor buffers in header order, raw little-endian bytes
    24+H+D          32          trailer: SHA-256 of bytes [0, 24+H+D)

The header is one JSON object with exactly two keys::

    {"tensors": {NAME: {"dtype": DTYPE, "shape": [D0, D1, ...], "offset": OFF, "nbytes": N}, ...},
     "metadata": {... the caller's JSON object, unchanged ...}}

* DTYPE is one of `DTYPES` (a whitelist); shape entries are non-negative integers, at most `MAX_DIMS` of them;
  N = prod(shape) * itemsize(DTYPE) exactly.
* OFF is relative to the start of the data section (so the header never depends on its own length). Buffers
  are laid out in header order with no gaps: the first at 0, each next one at the previous end rounded up to a
  multiple of 8; D is the last end rounded up to 8 (0 with no tensors). The data section starts at 24 + H, a
  multiple of 8, so every buffer is 8-byte aligned in the file. Padding bytes are zero.
* bool buffers hold only the bytes 0 and 1.
* Duplicate JSON keys anywhere, NaN/Infinity literals, and unknown keys are errors.

The layout is canonical: for given tensors and metadata, `write_container` always produces the same bytes, and
`container_size` says how many without writing them.

Why a deflated header (the writer's default): a compressed LeNet is 10-30 kB, and its JSON header (tensor names,
shapes, offsets, layer specs) is 1.2-1.6 kB of it; deflate takes that to ~0.45 kB, i.e. 4-6 % off the file.
Inflating is bounded (never more than the 16 MiB cap is produced) and the stream must end exactly before the zero
padding, so a decompression bomb or trailing garbage is refused like any other bad header.

Why SHA-256 rather than CRC32: it catches every corruption pattern (CRC32 lets one random corruption in 2**32
through, and some structured multi-byte ones), and the digest doubles as a content identity for caching or
pinning a published model. It costs 28 more bytes and about 1.5 ms per MB on a CPU without SHA instructions;
compressed models are megabytes. Neither checksum authenticates a file: anyone can recompute it, which is why the
reader validates every field as if the file were hostile, checksum or not.

Reading never unpickles or evaluates anything. It checks, before any allocation that depends on the header:
magic, version, flags, the header length against its cap and the file size, the JSON and its schema, dtypes,
shapes against byte lengths, offsets (order, alignment, overlap, gaps), and the exact file size the header
implies (and `max_bytes`); then it reads the rest, verifies the checksum, padding and bool bytes, and only then
builds tensors (copies that own their memory). Every problem raises `ContainerError` saying what is wrong; a
header that fails its checks is reported as corruption when the checksum fails too (checked by streaming the
file, without allocating it), and as exactly what is wrong with it when the file is intact.

Writing is atomic: a temporary file in the target's directory, flushed and fsynced, then `os.replace`d over the
target (and the directory fsynced where the platform allows). A failed write removes the temporary file and
leaves any existing target untouched; a process killed mid-write leaves the target untouched too (plus, at
worst, an orphaned hidden ``.NAME.*.tmp`` file beside it).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
import zlib
from typing import Any, BinaryIO

import numpy as np
import torch

__all__ = [
    "ContainerError", "write_container", "read_container", "container_size",
    "MAGIC", "FORMAT_VERSION", "DTYPES", "MAX_HEADER_BYTES", "MAX_DIMS",
]

MAGIC = b"\x89WSHARE\n"  # a non-ASCII first byte: never mistaken for text; and no pickle starts this way
FORMAT_VERSION = 1
PREAMBLE = struct.Struct("<8sIIQ")  # magic, version, flags, header length
PREAMBLE_BYTES = PREAMBLE.size  # 24
DIGEST_BYTES = hashlib.sha256().digest_size  # 32
ALIGN = 8
FLAG_DEFLATED_HEADER = 1
MAX_HEADER_BYTES = 16 << 20  # a header this big would already be a million tensors: anything larger is refused
MAX_DIMS = 64
_INT64_MAX = 2**63 - 1

DTYPES: dict[str, torch.dtype] = {
    "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
    "bool": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_HEADER_KEYS = {"tensors", "metadata"}
_ENTRY_KEYS = {"dtype", "shape", "offset", "nbytes"}


class ContainerError(ValueError):
    """A container file (or the data offered for one) is malformed, corrupted, unsupported or over a limit."""


def aligned(n: int) -> int:
    """n bytes rounded up to the buffer alignment: a buffer's footprint in the data section."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _require_little_endian() -> None:
    # Buffers are stored in the host's byte order and copied verbatim; every platform torch supports today is
    # little-endian, so swapping is not implemented rather than implemented untested.
    if sys.byteorder != "little":
        raise NotImplementedError("weightshare containers are only supported on little-endian hosts")


# ----------------------------------------------------------------------------------------------- writing


def _check_metadata(value: Any, where: str = "metadata") -> None:
    """Refuse what JSON would silently change (tuples, non-str keys) or cannot hold (NaN, objects)."""
    if value is None or isinstance(value, (bool, str, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ContainerError(f"{where} is {value!r}: JSON has no NaN or infinity")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_metadata(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ContainerError(f"{where} has key {key!r} of type {type(key).__name__}; JSON keys are strings")
            _check_metadata(item, f"{where}[{key!r}]")
        return
    hint = " (use a list)" if isinstance(value, tuple) else ""
    raise ContainerError(f"{where} is a {type(value).__name__}, which JSON cannot hold unchanged{hint}")


def _plan(tensors: dict[str, torch.Tensor], metadata: dict, deflate: bool = True
          ) -> tuple[bytes, list[tuple[str, torch.Tensor, int]], int]:
    """Validate the inputs and lay the file out: (padded header bytes, [(name, tensor, offset)], data length)."""
    if not isinstance(tensors, dict):
        raise TypeError(f"tensors must be a dict of name -> Tensor, got {type(tensors).__name__}")
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        _check_metadata(metadata)
    except RecursionError:
        raise ContainerError("metadata is nested too deeply") from None
    entries: dict[str, dict] = {}
    layout = []
    offset = 0
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensors[{name!r}] is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.layout != torch.strided:
            raise ContainerError(f"tensors[{name!r}] has layout {tensor.layout}; only dense (strided) tensors")
        if tensor.dtype not in _DTYPE_NAMES:
            raise ContainerError(
                f"tensors[{name!r}] has dtype {tensor.dtype}, which a container does not hold "
                f"(allowed: {', '.join(DTYPES)})")
        if tensor.dim() > MAX_DIMS:
            raise ContainerError(f"tensors[{name!r}] has {tensor.dim()} dimensions, more than {MAX_DIMS}")
        nbytes = tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                         "offset": offset, "nbytes": nbytes}
        layout.append((name, tensor, offset))
        offset = aligned(offset + nbytes)
    try:
        text = json.dumps({"tensors": entries, "metadata": metadata}, ensure_ascii=True, allow_nan=False,
                          separators=(",", ":"))
    except RecursionError:
        raise ContainerError("metadata is nested too deeply") from None
    header = text.encode("ascii")
    if len(header) > MAX_HEADER_BYTES:
        raise ContainerError(f"header would be {len(header)} bytes, over the {MAX_HEADER_BYTES}-byte cap")
    if deflate:  # level 9 with the default window: the same bytes from the same zlib, and tiny headers anyway
        header = zlib.compress(header, 9)
    header += (b"\0" if deflate else b" ") * (aligned(len(header)) - len(header))
    if len(header) > MAX_HEADER_BYTES:
        raise ContainerError(f"header would be {len(header)} bytes, over the {MAX_HEADER_BYTES}-byte cap")
    return header, layout, offset


def container_size(tensors: dict[str, torch.Tensor], metadata: dict, deflate_header: bool = True) -> int:
    """Exact size in bytes of the file `write_container(path, tensors, metadata, deflate_header)` would write."""
    header, _, data_bytes = _plan(tensors, metadata, deflate_header)
    return PREAMBLE_BYTES + len(header) + data_bytes + DIGEST_BYTES


def _tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's raw bytes as a flat uint8 array (on the CPU, contiguous, conjugate/negation bits resolved)."""
    flat = tensor.detach().resolve_conj().resolve_neg().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def _write_body(out: BinaryIO, header: bytes, flags: int, layout: list[tuple[str, torch.Tensor, int]],
                data_bytes: int) -> int:
    """Write preamble, header, buffers and trailer to `out`, hashing as it goes; returns bytes written."""
    digest = hashlib.sha256()

    def emit(chunk) -> None:
        digest.update(chunk)
        out.write(chunk)

    emit(PREAMBLE.pack(MAGIC, FORMAT_VERSION, flags, len(header)))
    emit(header)
    position = 0
    for name, tensor, offset in layout:
        emit(bytes(offset - position))  # zero padding up to the aligned offset
        raw = _tensor_bytes(tensor)
        expected = tensor.numel() * tensor.element_size()
        if raw.nbytes != expected:  # a tensor changed between planning and writing
            raise ContainerError(f"tensors[{name!r}] changed size while being written")
        emit(memoryview(raw))
        position = offset + raw.nbytes
    emit(bytes(data_bytes - position))
    out.write(digest.digest())
    return PREAMBLE_BYTES + len(header) + data_bytes + DIGEST_BYTES


def _open_temporary(target: str) -> tuple[int, str]:
    """Create a new, uniquely named file beside `target` (mode 0o666 minus the umask, like a plain open)."""
    directory, base = os.path.split(target)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        candidate = os.path.join(directory, f".{base}.{os.getpid()}.{os.urandom(6).hex()}.tmp")
        try:
            return os.open(candidate, flags, 0o666), candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {target}")


def fsync_directory(directory: str) -> None:
    """Make the rename durable; not every platform (Windows) or file system lets a directory be fsynced."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_container(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict,
                    deflate_header: bool = True) -> int:
    """Write `tensors` and JSON `metadata` to `path` atomically; returns the bytes written. deflate_header: store
    the JSON header zlib-compressed (FLAG_DEFLATED_HEADER; readers of this format version understand both).

    Tensors may live on any device and need not be contiguous; they are read back on the CPU. `metadata` must
    be JSON as-is (dicts with str keys, lists, str, int, finite float, bool, None): what would not round-trip
    unchanged (tuples, int keys, NaN) is refused rather than silently altered.
    """
    _require_little_endian()
    header, layout, data_bytes = _plan(tensors, metadata, deflate_header)
    target = os.path.realpath(os.fspath(path))  # through a symlink, like open(path, "wb") would write
    fd, temporary = _open_temporary(target)
    try:
        with os.fdopen(fd, "wb") as out:
            written = _write_body(out, header, FLAG_DEFLATED_HEADER if deflate_header else 0, layout, data_bytes)
            out.flush()
            os.fsync(out.fileno())
        try:  # an existing file keeps its permissions, as it would with an in-place write
            os.chmod(temporary, os.stat(target).st_mode & 0o7777)
        except FileNotFoundError:
            pass
        os.replace(temporary, target)
    except BaseException:  # including KeyboardInterrupt: never leave the temporary behind
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(os.path.dirname(target))
    return written


# ----------------------------------------------------------------------------------------------- reading


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    result = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _refuse_constant(literal: str) -> None:
    raise ValueError(f"{literal} is not valid JSON")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true/false parse as bool, an int subtype


def _inflate_header(raw: bytes, fail) -> bytes:
    """The JSON of a deflated header: at most MAX_HEADER_BYTES inflated, the stream complete, then only zeros."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(raw, MAX_HEADER_BYTES)
    except zlib.error as exc:
        raise fail(f"deflated header does not inflate: {exc}") from None
    if inflater.unconsumed_tail:
        raise fail(f"deflated header inflates past the {MAX_HEADER_BYTES}-byte cap")
    if not inflater.eof:
        raise fail("deflated header stream is incomplete")
    if inflater.unused_data.strip(b"\0"):
        raise fail("deflated header is followed by bytes other than zero padding")
    if len(inflater.unused_data) >= ALIGN:
        raise fail(f"deflated header has {len(inflater.unused_data)} bytes of padding, more than alignment needs")
    return text


def _parse_header(raw: bytes, fail) -> tuple[dict[str, dict], dict]:
    """Parse and schema-check the header JSON; returns (tensor entries in file order, metadata)."""
    try:
        text = raw.decode("utf-8")
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except _DuplicateKey as exc:
        raise fail(f"header JSON has a duplicate key {exc.args[0]!r}") from None
    except RecursionError:
        raise fail("header JSON is nested too deeply") from None
    except ValueError as exc:  # includes UnicodeDecodeError and json.JSONDecodeError
        raise fail(f"header is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise fail(f"header JSON is a {type(header).__name__}, not an object")
    if set(header) != _HEADER_KEYS:
        raise fail(f"header keys are {sorted(header)}, expected {sorted(_HEADER_KEYS)}")
    entries, metadata = header["tensors"], header["metadata"]
    if not isinstance(entries, dict):
        raise fail(f"header 'tensors' is a {type(entries).__name__}, not an object")
    if not isinstance(metadata, dict):
        raise fail(f"header 'metadata' is a {type(metadata).__name__}, not an object")
    for name, entry in entries.items():
        _check_entry(name, entry, fail)
    return entries, metadata


def _check_entry(name: str, entry: Any, fail) -> None:
    """Types and internal consistency of one tensor entry (not yet its place in the file)."""
    if not name:
        raise fail("a tensor has an empty name")
    if not isinstance(entry, dict):
        raise fail(f"tensor {name!r}: entry is a {type(entry).__name__}, not an object")
    if set(entry) != _ENTRY_KEYS:
        raise fail(f"tensor {name!r}: keys are {sorted(entry)}, expected {sorted(_ENTRY_KEYS)}")
    dtype, shape, offset, nbytes = entry["dtype"], entry["shape"], entry["offset"], entry["nbytes"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise fail(f"tensor {name!r}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise fail(f"tensor {name!r}: shape must be a list of at most {MAX_DIMS} integers, got {shape!r:.200}")
    if not all(_is_int(d) and d >= 0 for d in shape):
        raise fail(f"tensor {name!r}: shape {shape!r:.200} has an entry that is not a non-negative integer")
    for field, value in (("offset", offset), ("nbytes", nbytes)):
        if not _is_int(value) or value < 0:
            raise fail(f"tensor {name!r}: {field} {value!r:.100} is not a non-negative integer")
    if math.prod(max(d, 1) for d in shape) > _INT64_MAX:  # torch could not even describe an empty one
        raise fail(f"tensor {name!r}: shape {shape!r:.200} is too large for a tensor")
    expected = math.prod(shape) * DTYPES[dtype].itemsize  # exact Python ints: 2**62 elements cannot overflow
    if expected != nbytes:
        raise fail(f"tensor {name!r}: shape {shape} of {dtype} is {expected} bytes but nbytes says {nbytes}")


def _check_layout(entries: dict[str, dict], fail) -> int:
    """Buffers must follow each other in header order, 8-aligned, with only alignment padding between them;
    returns the data-section length this implies."""
    expected = 0
    for name, entry in entries.items():
        offset = entry["offset"]
        if offset % ALIGN:
            raise fail(f"tensor {name!r}: offset {offset} is not a multiple of {ALIGN}")
        if offset < expected:
            raise fail(f"tensor {name!r}: offset {offset} overlaps or precedes the previous buffer "
                       f"(the buffer belongs at {expected})")
        if offset > expected:
            raise fail(f"tensor {name!r}: offset {offset} leaves a gap (the buffer belongs at {expected})")
        expected = aligned(offset + entry["nbytes"])
    return expected


def _read_exactly(source: BinaryIO, buffer: bytearray | memoryview, fail) -> None:
    view = memoryview(buffer)
    done = 0
    while done < len(view):
        got = source.readinto(view[done:])
        if not got:
            raise fail(f"file ended after {done} of {len(view)} expected bytes (truncated while reading?)")
        done += got


def _stored_checksum_matches(source: BinaryIO, file_size: int) -> bool:
    """Whether the last 32 bytes are the SHA-256 of the rest, read in chunks (used only to tell a corrupted
    file from a well-formed one with a bad header, so it must not allocate the file's size)."""
    source.seek(0)
    digest = hashlib.sha256()
    remaining = file_size - DIGEST_BYTES
    while remaining > 0:
        chunk = source.read(min(remaining, 1 << 20))
        if not chunk:
            return False
        digest.update(chunk)
        remaining -= len(chunk)
    return digest.digest() == source.read(DIGEST_BYTES)


def read_container(path: str | os.PathLike, max_bytes: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a container: returns (tensors by name in file order, metadata).

    `max_bytes`, if given, caps the total tensor bytes the file may declare (checked before reading them).
    Raises ContainerError for anything malformed, corrupted or over a limit; OSError if the file cannot be read.
    """
    _require_little_endian()
    where = os.fspath(path)

    def fail(message: str) -> ContainerError:
        return ContainerError(f"{where}: {message}")

    with open(where, "rb", buffering=0) as source:
        file_size = os.fstat(source.fileno()).st_size
        minimum = PREAMBLE_BYTES + DIGEST_BYTES
        if file_size < minimum:
            raise fail(f"file is {file_size} bytes, shorter than the smallest container ({minimum}): truncated "
                       "or not a weightshare container")
        preamble = bytearray(PREAMBLE_BYTES)
        _read_exactly(source, preamble, fail)
        magic, version, flags, header_bytes = PREAMBLE.unpack(preamble)
        if magic != MAGIC:
            raise fail(f"not a weightshare container (magic {bytes(magic)!r}, expected {MAGIC!r})")
        if version != FORMAT_VERSION:
            raise fail(f"unsupported container format version {version} (this reader knows {FORMAT_VERSION})")
        if flags not in (0, FLAG_DEFLATED_HEADER):
            raise fail(f"unknown flags {flags:#x} in the preamble (this reader knows 0 and "
                       f"{FLAG_DEFLATED_HEADER:#x})")
        if header_bytes > MAX_HEADER_BYTES:
            raise fail(f"header length {header_bytes} is over the {MAX_HEADER_BYTES}-byte cap")
        if header_bytes % ALIGN:
            raise fail(f"header length {header_bytes} is not a multiple of {ALIGN}")
        if PREAMBLE_BYTES + header_bytes + DIGEST_BYTES > file_size:
            raise fail(f"header length {header_bytes} runs past the end of the {file_size}-byte file (truncated?)")
        header = bytearray(header_bytes)
        _read_exactly(source, header, fail)
        try:
            text = _inflate_header(bytes(header), fail) if flags & FLAG_DEFLATED_HEADER else bytes(header)
            entries, metadata = _parse_header(text, fail)
            data_bytes = _check_layout(entries, fail)
        except ContainerError as exc:
            if _stored_checksum_matches(source, file_size):
                raise  # an intact file with a bad header: a writer bug or a forgery, say exactly what is wrong
            detail = exc.args[0].removeprefix(f"{where}: ")
            raise fail(f"checksum mismatch: the file is corrupted (and so its header: {detail})") from None
        declared = sum(entry["nbytes"] for entry in entries.values())
        if max_bytes is not None and declared > max_bytes:
            raise fail(f"tensors total {declared} bytes, over max_bytes={max_bytes}")
        implied = PREAMBLE_BYTES + header_bytes + data_bytes + DIGEST_BYTES
        if implied > file_size:
            raise fail(f"header declares {implied} bytes of file but the file has {file_size} (truncated?)")
        if implied < file_size:
            raise fail(f"file has {file_size - implied} bytes after the {implied} its header accounts for")

        # each buffer is read straight into the tensor that will own it (the file's data is never held twice:
        # a model loads in about its file's size), hashed as it goes; nothing is returned before the checksum holds
        digest = hashlib.sha256(preamble)
        digest.update(header)
        buffers: dict[str, torch.Tensor] = {}
        position, bad_padding = 0, None
        for name, entry in entries.items():
            padding = bytearray(entry["offset"] - position)  # < ALIGN bytes (_check_layout)
            _read_exactly(source, padding, fail)
            digest.update(padding)
            if any(padding) and bad_padding is None:
                bad_padding = f"nonzero padding before tensor {name!r}"
            buffer = torch.empty(entry["nbytes"], dtype=torch.uint8)
            if entry["nbytes"]:
                _read_exactly(source, buffer.numpy(), fail)
                digest.update(buffer.numpy())
            buffers[name] = buffer
            position = entry["offset"] + entry["nbytes"]
        padding = bytearray(data_bytes - position)
        _read_exactly(source, padding, fail)
        digest.update(padding)
        if any(padding) and bad_padding is None:
            bad_padding = "nonzero padding at the end of the data section"
        stored = bytearray(DIGEST_BYTES)
        _read_exactly(source, stored, fail)
    if digest.digest() != stored:
        raise fail("checksum mismatch: the file is corrupted")
    if bad_padding is not None:
        raise fail(bad_padding)
    return _build_tensors(buffers, entries, fail), metadata


def _build_tensors(buffers: dict[str, torch.Tensor], entries: dict[str, dict], fail) -> dict[str, torch.Tensor]:
    """Each entry's bytes as its dtype and shape, after checking a bool buffer holds only 0 and 1."""
    tensors = {}
    for name, entry in entries.items():
        raw = buffers[name]
        if entry["dtype"] == "bool" and bool((raw > 1).any()):
            raise fail(f"tensor {name!r}: bool buffer holds bytes other than 0 and 1")
        dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
        tensors[name] = raw.view(dtype).reshape(shape) if entry["nbytes"] else torch.empty(shape, dtype=dtype)
    return tensors
