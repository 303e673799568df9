"""Where the bytes of a saved model go: per shared layer (LayerSize) and for the whole file (SizeReport), as
`ws.size_report` and `ws.save` compute them (io.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LayerSize", "SizeReport"]


@dataclass
class LayerSize:
    """Sizes of one shared layer, in bytes unless said otherwise."""

    name: str
    kind: str
    weights: int            # weights in the layer (dense-equivalent)
    parameters: int         # weights + bias values
    fp32_bytes: int         # the dense layer in float32
    bits: int               # index bits per weight, packed
    k: int
    groups: int
    packed_bytes: int       # packed index rows (32-bit aligned per row)
    entropy_bytes: int      # rANS-coded index stream
    shannon_bytes: float    # the Shannon bound of the indices (n * H / 8)
    encoding: str           # what the file stores: "packed", "rans" or "context"
    index_bytes: int        # the stored index stream
    codebook_bytes: int
    bias_bytes: int
    context_bytes: int = 0  # context-coded index stream (ops.context_encode)
    bias_encoding: str = "dense"  # "dense", or "masked" (bias_bytes then counts the mask and the nonzero values)

    @property
    def stored_bytes(self) -> int:
        return self.index_bytes + self.codebook_bytes + self.bias_bytes

    @property
    def bits_per_weight(self) -> float:
        """Stored index bits per weight (after entropy coding when the file uses it)."""
        return 8 * self.index_bytes / max(self.weights, 1)


@dataclass
class SizeReport:
    """Where the bytes of a saved model go. `file_bytes` is exactly the size of the file `save` writes."""

    layers: list[LayerSize] = field(default_factory=list)
    other_tensors: int = 0       # tensors stored raw (BatchNorm, dense layers, ...)
    other_bytes: int = 0
    other_fp32_bytes: int = 0
    parameters: int = 0          # dense-equivalent trainable values of the whole model
    fp32_bytes: int = 0          # the dense model with every float tensor in float32 (all params and buffers)
    file_bytes: int = 0

    @property
    def overhead_bytes(self) -> int:
        """Preamble, JSON header, alignment padding and checksum."""
        return self.file_bytes - sum(l.stored_bytes for l in self.layers) - self.other_bytes

    @property
    def ratio(self) -> float:
        """Compression ratio against the fp32 model."""
        return self.fp32_bytes / self.file_bytes if self.file_bytes else float("nan")

    def __str__(self) -> str:
        head = ("layer", "kind", "params", "fp32 B", "bits", "k", "packed B", "rANS B", "context B", "Shannon B",
                "stored", "bits/w", "codebook B", "bias B")
        rows = [(l.name, l.kind, f"{l.parameters:,}", f"{l.fp32_bytes:,}", str(l.bits), str(l.k),
                 f"{l.packed_bytes:,}", f"{l.entropy_bytes:,}", f"{l.context_bytes:,}", f"{l.shannon_bytes:,.0f}",
                 l.encoding,
                 f"{l.bits_per_weight:.3f}", f"{l.codebook_bytes:,}", f"{l.bias_bytes:,}") for l in self.layers]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        lines = [fmt(head), "-" * len(fmt(head)), *map(fmt, rows)]
        lines += [f"other tensors: {self.other_tensors} ({self.other_bytes:,} B; fp32 {self.other_fp32_bytes:,} B)",
                  f"header, padding and checksum: {self.overhead_bytes:,} B",
                  f"total: {self.parameters:,} parameters, fp32 {self.fp32_bytes:,} B -> file {self.file_bytes:,} B "
                  f"({self.ratio:.2f}x)"]
        return "\n".join(lines)
