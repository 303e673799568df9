"""The Python reference of the file format's index coder (ops.context_encode / context_decode): a line-by-line
mirror of csrc/cpu/context_coder.cpp (same model, same arithmetic, same bytes); see that file for the design.
Slow (a few microseconds per index): for tests and as the fallback without the native library. Re-exported by
reference.py with the other ops' references."""
from __future__ import annotations

import torch
from torch import Tensor

_CTX_VERSION, _CTX_WINDOW, _CTX_MIN_PROB, _CTX_TOP, _CTX_CLASSES = 2, 1024, 16, 1 << 24, 5
_CTX_ROW_FLAGS, _CTX_COLUMN_FLAGS, _CTX_MODES = 1, 2, 4


class _BitModel:
    __slots__ = ("p0", "seen")

    def __init__(self):
        self.p0, self.seen = 1 << 15, 0

    def update(self, bit: int) -> None:
        target = 0 if bit else 65536
        divisor = self.seen + 2 if self.seen < _CTX_WINDOW else _CTX_WINDOW + 2
        delta = target - self.p0
        step = abs(delta) // divisor * (1 if delta >= 0 else -1)  # C++ integer division truncates towards zero
        self.p0 = min(max(self.p0 + step, _CTX_MIN_PROB), 65536 - _CTX_MIN_PROB)
        if self.seen < _CTX_WINDOW:
            self.seen += 1


def _density_class(count: int, total: int, nnz: int, seen: int) -> int:
    if total == 0:
        return 0
    if count == 0:
        return 1
    here, overall = float(count) * float(seen), float(nnz) * float(total)
    return 2 if 2.0 * here < overall else 3 if here <= 2.0 * overall else 4


class _ContextModel:
    def __init__(self, cols: int, k: int):
        self.flags = [_BitModel() for _ in range(8 * _CTX_CLASSES * _CTX_CLASSES)]
        self.depth = 0
        while (1 << self.depth) < k - 1:
            self.depth += 1
        self.tree = [_BitModel() for _ in range(1 << self.depth)]
        self.row_occupied, self.column_occupied = [_BitModel(), _BitModel()], [_BitModel(), _BitModel()]
        self.col_count, self.above = [0] * cols, [0] * cols
        self.nnz = self.seen = 0
        self.left1 = self.left2 = self.row_count = 0

    def start_row(self) -> None:
        self.left1 = self.left2 = self.row_count = 0

    def flag_model(self, rows_before: int, c: int) -> _BitModel:
        neighbours = self.left1 | (self.left2 << 1) | (self.above[c] << 2)
        column = _density_class(self.col_count[c], rows_before, self.nnz, self.seen)
        row = _density_class(self.row_count, c, self.nnz, self.seen)
        return self.flags[(neighbours * _CTX_CLASSES + column) * _CTX_CLASSES + row]

    def record(self, c: int, flag: int) -> None:
        self.left1, self.left2 = flag, self.left1
        self.row_count += flag
        self.col_count[c] += flag
        self.above[c] = flag
        self.nnz += flag
        self.seen += 1


def _ctx_walk(rows: int, cols: int, k: int, mode: int, truth, background: int, occ_rows: list, occ_cols: list, bit,
              symbol) -> None:
    """csrc/cpu/context_coder.cpp's walk(): one pass of the model; bit(model, value) codes or decodes a decision
    (returning it), symbol(model, r, c) handles a non-background position's rank. truth: the encoder's flat indices
    (None when decoding); occ_rows / occ_cols are the encoder's truth or filled in while decoding."""
    model = _ContextModel(cols, k)
    if mode & _CTX_COLUMN_FLAGS:
        previous = 0
        for c in range(cols):
            previous = occ_cols[c] = bit(model.column_occupied[previous], occ_cols[c])
    else:
        occ_cols[:] = [1] * cols
    last_col = max((c for c in range(cols) if occ_cols[c]), default=-1)
    previous_row = rows_before = 0
    for r in range(rows):
        if mode & _CTX_ROW_FLAGS:
            previous_row = occ_rows[r] = bit(model.row_occupied[previous_row], occ_rows[r])
            if not previous_row:
                continue
            if last_col < 0:
                raise ValueError("weightshare: context_decode: an occupied row but no occupied column (corrupt stream)")
        model.start_row()
        for c in range(cols):
            flag = 0
            if occ_cols[c]:
                if (mode & _CTX_ROW_FLAGS) and model.row_count == 0 and c == last_col:
                    flag = 1
                else:
                    flag = bit(model.flag_model(rows_before, c),
                               None if truth is None else int(truth[r * cols + c] != background))
                if flag:
                    symbol(model, r, c)
            model.record(c, flag)
        rows_before += 1


def _ctx_encode_mode(flat: list, rows: int, cols: int, k: int, background: int, mode: int) -> bytearray:
    out = bytearray([_CTX_VERSION, background, mode])
    state = {"low": 0, "rng": 0xFFFFFFFF, "cache": 0, "pending": 1}

    def shift_low():
        low = state["low"]
        if (low & 0xFFFFFFFF) < 0xFF000000 or (low >> 32) != 0:
            carry, byte = low >> 32, state["cache"]
            while True:
                out.append((byte + carry) & 0xFF)
                byte = 0xFF
                state["pending"] -= 1
                if state["pending"] == 0:
                    break
            state["cache"] = (low >> 24) & 0xFF
        state["pending"] += 1
        state["low"] = (low & 0x00FFFFFF) << 8

    def bit(model: _BitModel, b: int) -> int:
        bound = (state["rng"] >> 16) * model.p0
        if b:
            state["low"], state["rng"] = state["low"] + bound, state["rng"] - bound
        else:
            state["rng"] = bound
        model.update(b)
        while state["rng"] < _CTX_TOP:
            state["rng"] = (state["rng"] << 8) & 0xFFFFFFFF
            shift_low()
        return b

    def rank_of(model, r, c):
        s = flat[r * cols + c]
        rank, node = (s if s < background else s - 1), 1
        for level in range(model.depth - 1, -1, -1):
            b = (rank >> level) & 1
            bit(model.tree[node], b)
            node = 2 * node + b

    occ_rows, occ_cols = [0] * rows, [0] * cols
    for i, s in enumerate(flat):
        if s != background:
            occ_rows[i // cols] = occ_cols[i % cols] = 1
    _ctx_walk(rows, cols, k, mode, flat, background, occ_rows, occ_cols, bit, rank_of)
    for _ in range(5):
        shift_low()
    return out


def context_encode(indices: Tensor, k: int) -> Tensor:
    if indices.dtype != torch.uint8:
        raise TypeError(f"weightshare: indices must be uint8, got {indices.dtype}")
    if indices.dim() != 2 or not 1 <= k <= 256:
        raise ValueError(f"weightshare: indices must be 2-D and k in 1..256, got shape {list(indices.shape)}, k={k}")
    rows, cols = indices.shape
    flat = indices.reshape(-1).tolist()
    if flat and max(flat) >= k:
        raise ValueError(f"weightshare: context_encode: an index is {max(flat)}, not below k = {k}")
    hist = [0] * 256
    for s in flat:
        hist[s] += 1
    background = max(range(256), key=lambda s: (hist[s], -s))
    streams = [_ctx_encode_mode(flat, rows, cols, k, background, mode) for mode in range(_CTX_MODES)]
    best = min(range(_CTX_MODES), key=lambda m: (len(streams[m]), m))
    return torch.tensor(list(streams[best]), dtype=torch.uint8)


def context_decode(stream: Tensor, rows: int, cols: int, k: int) -> Tensor:
    if stream.dtype != torch.uint8 or stream.dim() != 1:
        raise ValueError("weightshare: stream must be a 1-D uint8 tensor")
    if rows < 0 or cols < 0 or not 1 <= k <= 256:
        raise ValueError(f"weightshare: rows, cols must be >= 0 and k in 1..256, got {rows}, {cols}, {k}")
    data = stream.tolist()
    if len(data) < 2 or data[0] not in (1, _CTX_VERSION):
        raise ValueError(f"weightshare: context_decode: stream version {data[0] if data else None} is not 1 or 2")
    background = data[1]
    if background >= k:
        raise ValueError(f"weightshare: context_decode: background symbol {background} is not below k = {k}")
    head = 2 if data[0] == 1 else 3  # version 1 has no mode byte (mode 0)
    if len(data) < head:
        raise ValueError("weightshare: context_decode: stream is shorter than its header")
    mode = data[2] if head == 3 else 0
    if mode >= _CTX_MODES:
        raise ValueError(f"weightshare: context_decode: mode {mode} is not below {_CTX_MODES}")
    body = data[head:]
    if len(body) < 5 or body[0] != 0:
        raise ValueError("weightshare: context_decode: stream is not a context-coded index stream (bad coder start)")
    state = {"pos": 1, "rng": 0xFFFFFFFF, "code": 0}

    def next_byte() -> int:
        state["pos"] += 1
        return body[state["pos"] - 1] if state["pos"] - 1 < len(body) else 0
    for _ in range(4):
        state["code"] = ((state["code"] << 8) | next_byte()) & 0xFFFFFFFF

    def bit(model: _BitModel, _unused=None) -> int:
        bound = (state["rng"] >> 16) * model.p0
        if state["code"] < bound:
            state["rng"], b = bound, 0
        else:
            state["code"], state["rng"], b = state["code"] - bound, state["rng"] - bound, 1
        model.update(b)
        while state["rng"] < _CTX_TOP:
            state["rng"] = (state["rng"] << 8) & 0xFFFFFFFF
            state["code"] = ((state["code"] << 8) | next_byte()) & 0xFFFFFFFF
        return b

    out = [background] * (rows * cols)

    def rank_of(model, r, c):
        node = 1
        for _ in range(model.depth):
            node = 2 * node + bit(model.tree[node])
        rank = node - (1 << model.depth)
        if rank >= k - 1:
            raise ValueError(f"weightshare: context_decode: decoded symbol rank {rank} is not below k - 1 = "
                             f"{k - 1} (corrupt stream)")
        out[r * cols + c] = rank if rank < background else rank + 1

    _ctx_walk(rows, cols, k, mode, None, background, [0] * rows, [0] * cols, bit, rank_of)
    if state["pos"] != len(body):
        raise ValueError(f"weightshare: context_decode: stream is {'longer' if len(body) > state['pos'] else 'shorter'}"
                         f" than its coded symbols ({len(body)} bytes, {state['pos']} used): corrupt or truncated")
    return torch.tensor(out, dtype=torch.uint8).reshape(rows, cols)
