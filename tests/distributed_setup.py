"""The model and data of the distributed compression tests, the same in the test process and in each rank
(tests/distributed_worker.py): a small conv + MLP classifier and seeded synthetic batches."""
from __future__ import annotations

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def model() -> Net:
    """Net, briefly trained on its own batches (deterministic: one thread in every process of the tests)."""
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for x, y in batches(8, seed=7) * 4:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


def batches(n: int, seed: int, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n batches of 1x8x8 images labelled by a fixed random teacher (learnable, so the model's fit matters)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(64, 5, generator=torch.Generator().manual_seed(99))
    out = []
    for _ in range(n):
        x = torch.randn(size, 1, 8, 8, generator=g)
        out.append((x, (x.flatten(1) @ teacher).argmax(1)))
    return out


def shard(data: list, rank: int, world: int) -> list:
    """Rank r's batches: r, r + world, r + 2 world, ..."""
    return data[rank::world]


def accuracy(m: nn.Module, data: list) -> float:
    with torch.no_grad():
        right = sum(int((m(x).argmax(1) == y).sum()) for x, y in data)
    return right / sum(len(y) for _, y in data)
