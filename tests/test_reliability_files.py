"""Reliability of model files (issue "Reliability and security"): a property test that ws.save / ws.load round-trip
small random compressed models bit for bit, and a bounded, seeded mutation fuzz of a real saved model file:
ws.load must either refuse it with ValueError (ContainerError is one) or return the original model; never another
exception, a crash or a hang."""
import copy
import hashlib
import random
import re
import signal
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import weightshare as ws
from weightshare.container import PREAMBLE_BYTES, read_container, write_container

from conftest import requires_native

pytestmark = requires_native


def same_state(a: nn.Module, b: nn.Module) -> bool:
    """Same state_dict names, dtypes, shapes and values (bit-exact: equal_nan is not needed, nothing is NaN)."""
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def build_dense(spec: dict) -> nn.Module:
    """Conv2d -> BatchNorm2d -> ReLU -> Flatten -> Linear layers, from a spec drawn by `model_specs`."""
    torch.manual_seed(spec["seed"])
    c = spec["channels"]
    layers = [nn.Conv2d(2, c, 3, padding=int(spec["padding"]), bias=spec["conv_bias"]), nn.BatchNorm2d(c), nn.ReLU(),
              nn.Flatten()]
    width = c * (6 if spec["padding"] else 4) ** 2  # 6x6 inputs
    for out in spec["widths"]:
        layers += [nn.Linear(width, out, bias=spec["linear_bias"]), nn.ReLU()]
        width = out
    return nn.Sequential(*layers[:-1])


def compress(spec: dict) -> nn.Module:
    """The dense model with non-trivial BatchNorm statistics and every Conv2d / Linear replaced (ws.replace_layers)
    by a ws.kmeans assignment with the spec's k, one codebook per layer or per output row."""
    model = build_dense(spec)
    with torch.no_grad():
        model.train()(torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(spec["seed"])))
    model.eval()
    assignments = {}
    for (name, module), k in zip([(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))],
                                 spec["ks"]):
        groups = module.weight.shape[0] if spec["per_row"] else 1
        assignments[name] = ws.kmeans(module.weight.detach(), k, groups=groups)
    report = ws.replace_layers(model, assignments)
    assert not report.skipped, report.skipped
    return model


@st.composite
def model_specs(draw):
    widths = draw(st.lists(st.integers(1, 24), min_size=1, max_size=3))
    return {
        "seed": draw(st.integers(0, 2**16)),
        "channels": draw(st.integers(1, 6)),
        "padding": draw(st.booleans()),
        "conv_bias": draw(st.booleans()),
        "linear_bias": draw(st.booleans()),
        "widths": widths,
        "ks": draw(st.lists(st.sampled_from([1, 2, 3, 5, 16, 17, 64, 256]), min_size=1 + len(widths),
                            max_size=1 + len(widths))),
        "per_row": draw(st.booleans()),
        "entropy_coding": draw(st.sampled_from([False, True, "auto"])),
    }


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=model_specs())
def test_random_models_round_trip_bit_exactly(tmp_path, spec):
    model = compress(spec)
    path = tmp_path / "m.ws"
    written = ws.save(model, path, entropy_coding=spec["entropy_coding"])
    assert written == path.stat().st_size
    loaded = ws.load(path, model=build_dense({**spec, "seed": spec["seed"] + 1}))  # other dense weights
    assert same_state(loaded, model)
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
    ws.save(loaded, tmp_path / "again.ws", entropy_coding=spec["entropy_coding"])
    assert (tmp_path / "again.ws").read_bytes() == path.read_bytes()  # nothing lost or reordered


# ----------------------------------------------------------------------------------------------- mutation fuzz

FUZZ_CASES = 1500
CASE_SECONDS = 10  # a single load of this ~10 KB file takes milliseconds; anything near this is a hang
FUZZ_SPEC = {"seed": 5, "channels": 4, "padding": True, "conv_bias": True, "linear_bias": True, "widths": [32, 10],
             "ks": [8, 16, 5], "per_row": False, "entropy_coding": "auto"}


class Hang(Exception):
    pass


def _on_alarm(signum, frame):
    raise Hang()


def _fix_checksum(data: bytes) -> bytes:
    return data[:-32] + hashlib.sha256(data[:-32]).digest()


def _header_end(data: bytes) -> int:
    return PREAMBLE_BYTES + int.from_bytes(data[16:24], "little")


def mutate(data: bytes, rng: random.Random, plain: bytes) -> tuple[str, bytes]:
    """One random damage: (kind, bytes). Header edits recompute the SHA-256 afterwards (a forger), so the JSON and
    layout validators are what is being fuzzed, not just the checksum. `data` is the file as saved (deflated
    header); the text edits of the JSON work on `plain`, the same container with its header stored as plain JSON."""
    kind = rng.choice(["flip", "truncate", "insert", "header_digit", "header_token", "header_length", "forged_flip"])
    if kind in ("header_digit", "header_token"):
        data = plain
    out = bytearray(data)
    if kind == "flip":
        for _ in range(rng.randint(1, 3)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del out[rng.randrange(len(out)):]
    elif kind == "insert":
        i = rng.randrange(len(out) + 1)
        out[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == "header_length":  # lie about the header length (8-byte field at offset 16)
        value = rng.choice([0, 8, _header_end(data) - PREAMBLE_BYTES + rng.choice([-8, 8, 16]), 2**63, 2**64 - 8])
        out[16:24] = value.to_bytes(8, "little")
        out = bytearray(_fix_checksum(bytes(out)))
    elif kind == "forged_flip":  # a flipped bit anywhere before the checksum, checksum recomputed
        i = rng.randrange(len(out) - 32)
        out[i] ^= 1 << rng.randrange(8)
        return kind, _fix_checksum(bytes(out))
    else:
        end = _header_end(data)
        header = out[PREAMBLE_BYTES:end].decode("ascii")
        if kind == "header_digit":  # change one number: shapes, offsets, bits, k, groups ...
            spots = [m.start() for m in re.finditer(r"\d", header)]
            i = rng.choice(spots)
            header = header[:i] + rng.choice("0123456789") + header[i + 1:]
        else:  # header_token: swap one JSON token for another of the same length where possible
            tokens = ["true", "false", "null", "\"packed\"", "\"rans\"", "\"context\"", "\"float16\"", "\"float32\"",
                      "[]", "{}", "-1", "1e9"]
            spots = [m.start() for m in re.finditer(r"true|false|null|\"packed\"|\"rans\"|\"float(16|32)\"|\d+",
                                                    header)]
            i = rng.choice(spots)
            old = re.match(r"true|false|null|\"packed\"|\"rans\"|\"float(16|32)\"|\d+", header[i:]).group(0)
            header = header[:i] + rng.choice(tokens) + header[i + len(old):]
        raw = header.encode("ascii")
        out[PREAMBLE_BYTES:end] = raw  # may change the length: the header length field then lies too
        out = bytearray(_fix_checksum(bytes(out)))
    return kind, bytes(out)


def test_mutation_fuzz_of_a_saved_model(tmp_path):
    """~1,500 seeded mutations of a real saved model (conv + BatchNorm + 2 linear layers, packed and rANS index
    streams). Unforged damage must be refused or (if it changed nothing) load the original; forged damage (the
    checksum recomputed) must be refused, or load a model that is the original or at least a self-consistent one
    (saving and loading it again round-trips exactly)."""
    original = compress(FUZZ_SPEC)
    template = build_dense({**FUZZ_SPEC, "seed": 99})
    source = tmp_path / "model.ws"
    ws.save(original, source)
    data = source.read_bytes()
    tensors, metadata = read_container(source)
    write_container(tmp_path / "plain.ws", tensors, metadata, deflate_header=False)
    plain = (tmp_path / "plain.ws").read_bytes()
    path = tmp_path / "mutated.ws"
    rng = random.Random(20240607)
    outcomes: dict[str, int] = {}
    slowest = 0.0
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        for case in range(FUZZ_CASES):
            kind, mutated = mutate(data, rng, plain)
            path.write_bytes(mutated)
            forged = kind.startswith("header") or kind == "forged_flip"
            start = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
            try:
                loaded = ws.load(path, model=copy.deepcopy(template))
            except Hang:
                pytest.fail(f"case {case} ({kind}) took over {CASE_SECONDS} s: a hang")
            except ValueError:  # ContainerError included
                outcome = "refused"
            except Exception as exc:  # noqa: BLE001 -- the point: anything else is a finding
                pytest.fail(f"case {case} ({kind}) raised {type(exc).__name__}: {exc}")
            else:
                if same_state(loaded, original):
                    outcome = "loaded the original"
                else:
                    assert forged, f"case {case} ({kind}): unforged damage loaded a different model"
                    again = tmp_path / "again.ws"
                    ws.save(loaded, again)
                    assert same_state(ws.load(again, model=copy.deepcopy(template)), loaded), f"case {case}"
                    outcome = "loaded a different valid model (forged)"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            slowest = max(slowest, time.perf_counter() - start)
            key = f"{kind}: {outcome}"
            outcomes[key] = outcomes.get(key, 0) + 1
    finally:
        signal.signal(signal.SIGALRM, previous)
    total = sum(outcomes.values())
    summary = f"{total} mutation cases, slowest {slowest * 1000:.0f} ms: " + ", ".join(
        f"{k}={v}" for k, v in sorted(outcomes.items()))
    print(summary)
    refused = sum(v for k, v in outcomes.items() if k.endswith("refused"))
    assert total == FUZZ_CASES and refused > FUZZ_CASES // 2, summary
