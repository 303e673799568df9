"""gather_stats(kind="fisher") through sq_grad_accum equals the vmap per-sample Fisher (FisherPass)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from weightshare.curvature import fisher_diag, gather_stats
from weightshare.curvature.fused_fisher import fused_modules
from weightshare.curvature.parameters import compressible_parameters
from weightshare.models import build_model


class SeqNet(nn.Module):
    """Linear layers on [N, T, F] inputs and a Conv1d: positions sum inside each sample's gradient."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, padding=1, stride=2)
        self.a = nn.Linear(6, 16)
        self.b = nn.Linear(16, 5)

    def forward(self, x):
        h = self.conv(x).transpose(1, 2)  # [N, T, 6]
        return self.b(torch.relu(self.a(h))).mean(1)


CASES = {
    "lenet5": (lambda: build_model("lenet5"), (1, 28, 28), 10),
    "lenet300100": (lambda: build_model("lenet300100"), (1, 28, 28), 10),
    "seqnet": (SeqNet, (4, 9), 5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_equals_vmap_fisher(case):
    torch.manual_seed(0)
    build, shape, classes = CASES[case]
    model = build().eval()
    data = [(torch.randn(24, *shape), torch.randint(0, classes, (24,))) for _ in range(2)]
    assert fused_modules(model, dict(compressible_parameters(model))) is not None
    fused = gather_stats(model, F.cross_entropy, data).diagonal
    reference = fisher_diag(model, F.cross_entropy, data)
    for name in reference:
        # fp32 sums in a different order: entries near zero (1e-10 where the largest is ~1e-4) differ by more than
        # rtol (4e-5 relative on an AMD EPYC), so the absolute tolerance scales with the tensor's largest entry
        scale = float(reference[name].abs().max())
        torch.testing.assert_close(fused[name], reference[name], rtol=1e-5, atol=1e-6 * scale)


def test_unsupported_models_fall_back():
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Flatten(), nn.LazyLinear(3)).eval()
    grouped(torch.randn(1, 4, 5, 5))
    assert fused_modules(grouped, dict(compressible_parameters(grouped))) is None
    tied = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)).eval()
    tied[2].weight = tied[0].weight
    assert fused_modules(tied, dict(compressible_parameters(tied))) is None
    assert fused_modules(build_model("lenet5").train(), dict(compressible_parameters(build_model("lenet5")))) is None
    data = [(torch.randn(6, 4, 5, 5), torch.randint(0, 3, (6,)))]  # still computed, by the vmap pass
    stats = gather_stats(grouped, F.cross_entropy, data)
    torch.testing.assert_close(stats.diagonal["0.weight"], fisher_diag(grouped, F.cross_entropy, data)["0.weight"])
