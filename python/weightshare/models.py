"""The networks the experiments compress: LeNet-300-100, LeNet-5 (Caffe variant), a binarized MLP, and a small
CIFAR-style conv net (tests only).

The MNIST models expect inputs [N, 1, 28, 28] normalised as in `weightshare.data` (see its docstring) and
return logits [N, 10]. Every weight lives in an ordinary nn.Linear / nn.Conv2d (BinaryLinear is an nn.Linear
subclass), so compression code can find the layers with isinstance checks.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LeNet300100(nn.Module):
    """784-300-100-10 fully connected network with ReLU (LeCun et al. 1998; 266,610 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """Caffe's LeNet as used by Han et al. 2015 (Deep Compression): 431,080 parameters.

    conv 1->20 5x5, maxpool 2, conv 20->50 5x5, maxpool 2, fc 800->500, ReLU, fc 500->10. As in Caffe's
    lenet_train_test.prototxt, the only nonlinearity besides pooling is the ReLU after fc1.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(self.conv1(x), 2)  # [N, 20, 12, 12]
        x = F.max_pool2d(self.conv2(x), 2)  # [N, 50, 4, 4]
        x = F.relu(self.fc1(x.flatten(1)))  # channel-major flatten, as Caffe does
        return self.fc2(x)


class _SignSTE(torch.autograd.Function):
    """sign(x) in {-1, +1} forward (0 maps to +1); straight-through gradient, zeroed where |x| > 1.

    The clipped straight-through estimator of Hubara et al. 2016 (BNN): the gradient of sign is taken to be that
    of hardtanh, so latent values that have drifted beyond +-1 stop receiving updates.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad_output * (x.abs() <= 1).to(grad_output.dtype)


def binarize(x: Tensor) -> Tensor:
    """sign(x) in {-1, +1} with the clipped straight-through gradient (see _SignSTE)."""
    return _SignSTE.apply(x)


class BinaryLinear(nn.Linear):
    """nn.Linear whose forward uses sign(weight): `weight` holds the latent real values that training updates.

    Keeping the latent weights in the ordinary `weight` Parameter means compression code, optimisers and
    checkpoints treat this layer like any other Linear; only the forward differs. Training should keep the
    latent weights in [-1, 1] (`clamp_latent_`), since values outside receive no gradient.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, binarize(self.weight), self.bias)

    @torch.no_grad()
    def clamp_latent_(self) -> None:
        """Clip the latent weights to [-1, 1] (call after each optimiser step, as in BNN training)."""
        self.weight.clamp_(-1.0, 1.0)


class BinarizedMLP(nn.Module):
    """BNN-style MLP 784-500-500-10: binary (+-1) weights in every layer, binary hidden activations.

    Each BinaryLinear is followed by BatchNorm (its bias would be redundant, so it has none); the hidden
    activations are binarised with the same clipped straight-through sign. The input layer sees real-valued
    pixels and the last BatchNorm rescales the +-1-weighted sums (of magnitude ~sqrt(500)) into usable logits.
    """

    def __init__(self, hidden: tuple[int, ...] = (500, 500), binary_activations: bool = True) -> None:
        super().__init__()
        self.binary_activations = binary_activations
        sizes = (28 * 28, *hidden, 10)
        self.linears = nn.ModuleList(BinaryLinear(a, b, bias=False) for a, b in zip(sizes[:-1], sizes[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(b) for b in sizes[1:])

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        last = len(self.linears) - 1
        for i, (linear, norm) in enumerate(zip(self.linears, self.norms)):
            x = norm(linear(x))
            if i < last:
                x = binarize(x) if self.binary_activations else F.hardtanh(x)
        return x


class SmallConvNet(nn.Module):
    """A small CIFAR-style network for 3x32x32 inputs, covering the conv kinds the kernels must handle.

    Plain 3x3 conv, a depthwise 3x3 conv (groups = channels), a 1x1 pointwise conv, a grouped 3x3 conv
    (groups = 4), each followed by BatchNorm and ReLU, then global average pooling and a Linear classifier.
    Used in tests only; never trained for the experiments.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
            conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)
            return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(
            block(3, 32, 3),                         # 32x32
            block(32, 32, 3, stride=2, groups=32),   # depthwise, 16x16
            block(32, 64, 1),                        # pointwise
            block(64, 64, 3, stride=2, groups=4),    # grouped, 8x8
        )
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        return self.classifier(x.mean(dim=(2, 3)))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "lenet300100": LeNet300100,
    "lenet5": LeNet5,
    "bnn_mlp": BinarizedMLP,
    "smallconv": SmallConvNet,
}


def build_model(name: str) -> nn.Module:
    """A freshly initialised model by name: "lenet300100", "lenet5", "bnn_mlp" or "smallconv".

    Initialisation draws from the global torch RNG: seed it first (torch.manual_seed) for reproducible weights.
    """
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}") from None
    return factory()


def model_name(model: nn.Module) -> str:
    """The registry name of a model built by `build_model` (by its exact class)."""
    for name, factory in MODELS.items():
        if type(model) is factory:
            return name
    raise ValueError(f"{type(model).__name__} is not one of the registered models {sorted(MODELS)}")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameter values (buffers such as BatchNorm running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())
