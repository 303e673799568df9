"""Deterministic training and evaluation of the experiment models, and their safetensors checkpoints.

    python -m weightshare.train --model lenet5 --out checkpoints/lenet5.safetensors

trains on the MNIST training split less the held-out validation set (`weightshare.data.mnist_splits`), so the
compression experiments can check their accuracy constraint on data the model never saw, and reports the test
error separately. Checkpoints are plain safetensors files (never pickle), written atomically, carrying the model
name and the training facts as string metadata; `load_checkpoint` rebuilds and validates the model.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from weightshare.container import fsync_directory
from weightshare._sysinfo import cpu_name
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset, default_collate
from tqdm.auto import tqdm

from weightshare.data import MNIST_MEAN, MNIST_STD, mnist_splits
from weightshare.models import MODELS, BinaryLinear, build_model, model_name

CHECKPOINT_FORMAT = "weightshare.checkpoint/1"

# Default recipes for `main`: the LeNets reach (or beat) the test errors Han et al. 2015 report, and each model
# trains in about 4 minutes or less on one CPU thread (measured numbers: checkpoints/README.md).
RECIPES: dict[str, dict[str, object]] = {
    "lenet300100": dict(epochs=30, lr=0.05, batch_size=128, weight_decay=1e-4, optimizer="sgd"),
    "lenet5": dict(epochs=15, lr=0.05, batch_size=128, weight_decay=5e-4, optimizer="sgd"),
    "bnn_mlp": dict(epochs=30, lr=5e-3, batch_size=100, weight_decay=0.0, optimizer="adam"),
}

# Retraining after each pruning step (ws.compress.prune_retrain): each step's density is reached gradually over the
# first half of its retraining (ramp) while the network is distilled from the dense model (distill, temperature).
# Measured on the bundled checkpoints (validation / test error, base 1.82 / 1.56 % and 1.00 / 0.70 %):
# LeNet-300-100 at 10 % density 1.82 / 1.57 % (20 epochs, ~22 s a step); LeNet-5 at 7.5 % density 0.90 / 0.67 %
# (3 epochs, ~48 s a step; the demo's schedules, cli.PRUNE_SCHEDULES). The earlier recipe (cut at once, then 3
# resp. 1 epochs of plain cross-entropy) lost 0.2-0.4 % validation error below 50 % density.
RETRAIN_RECIPES: dict[str, dict[str, object]] = {
    "lenet300100": dict(epochs=20, lr=0.1, weight_decay=1e-4, ramp=0.5, distill=0.7, temperature=2.0),
    "lenet5": dict(epochs=3, lr=0.05, weight_decay=5e-4, ramp=0.5, distill=0.7, temperature=2.0),
}

# Quantisation-aware retraining of a pruned network (compress.qat.quantize_retrain): the network keeps training
# with its weights shared, distilled from the dense model. On LeNet-300-100 pruned to 7 %, 4 bits with this recipe
# took the validation error from 1.82 % to 1.76 % (k-means without retraining: 1.90 %; 2026-11-29).
QAT_RECIPES: dict[str, dict[str, object]] = {
    "lenet300100": dict(epochs=5, lr=0.01, weight_decay=0.0, distill=0.7, temperature=2.0),
    "lenet5": dict(epochs=3, lr=0.01, weight_decay=0.0, distill=0.7, temperature=2.0),
}


# --------------------------------------------------------------------------------------------- batching
def _batches(dataset: Dataset, order: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(inputs, targets) batches of `dataset` in the given index order (last batch may be smaller)."""
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        if isinstance(dataset, TensorDataset):  # fast path: one gather per tensor instead of per-item collation
            yield tuple(t[idx] for t in dataset.tensors)[:2]  # type: ignore[misc]
        else:
            yield default_collate([dataset[i] for i in idx.tolist()])[:2]


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


# --------------------------------------------------------------------------------------------- training
def _make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                    momentum: float) -> torch.optim.Optimizer:
    # Decay only weight matrices and kernels: on biases and BatchNorm parameters it does not regularise
    # anything useful and can hurt.
    decayed = [p for p in model.parameters() if p.dim() > 1]
    others = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")


def train(model: nn.Module, train_set: Dataset, epochs: int, lr: float, batch_size: int, weight_decay: float,
          seed: int, progress: bool = True, *, optimizer: str = "sgd", momentum: float = 0.9,
          post_step: Optional[Callable[[], None]] = None, teacher: Optional[nn.Module] = None,
          distill: float = 0.0, temperature: float = 2.0) -> nn.Module:
    """Train `model` in place with cross-entropy and return it (in eval mode).

    Deterministic for a given seed, thread count and device: the data order comes from a generator seeded with
    `seed` (one permutation per epoch), the global RNG is seeded too, and deterministic algorithms are requested
    (with a warning, not an error, where an op has none). The learning rate follows a cosine decay to zero over
    all steps. BinaryLinear latent weights are clipped to [-1, 1] after every step (BNN practice); `post_step`,
    when given, runs after every optimiser step too (pruning uses it to hold pruned weights at zero).
    teacher, distill, temperature: knowledge distillation (Hinton et al. 2015): the loss becomes
    (1 - distill) * CE + distill * T^2 * KL(teacher || model) on logits softened by T. Retraining a pruned network
    towards the dense model's soft outputs kept its held-out error where plain cross-entropy lost 0.2-0.4 %
    (LeNet-300-100 at 10 % density, measured; see compress/prune.py).
    """
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"need epochs >= 0 and batch_size >= 1, got {epochs} and {batch_size}")
    if not 0.0 <= distill <= 1.0 or not temperature > 0:
        raise ValueError(f"need 0 <= distill <= 1 and temperature > 0, got {distill} and {temperature}")
    if distill > 0 and teacher is None:
        raise ValueError("distill > 0 needs a teacher model")
    n = len(train_set)  # type: ignore[arg-type]
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = max(1, epochs * steps_per_epoch)
    device = _device_of(model)
    binary_layers = [m for m in model.modules() if isinstance(m, BinaryLinear)]

    if teacher is not None:
        teacher.eval()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    opt = _make_optimizer(model, optimizer, lr, weight_decay, momentum)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    model.train()
    try:
        with tqdm(total=epochs * steps_per_epoch, disable=not progress, desc="train", unit="step",
                  dynamic_ncols=True) as bar:
            for epoch in range(epochs):
                order = torch.randperm(n, generator=generator)
                for inputs, targets in _batches(train_set, order, batch_size):
                    inputs, targets = inputs.to(device), targets.to(device)
                    logits = model(inputs)
                    loss = F.cross_entropy(logits, targets)
                    if distill > 0:
                        loss = (1 - distill) * loss + distill * _distill_loss(logits, teacher, inputs, temperature)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    schedule.step()
                    for layer in binary_layers:
                        layer.clamp_latent_()
                    if post_step is not None:
                        post_step()
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}", refresh=False)
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
    model.eval()
    return model


def _distill_loss(logits: Tensor, teacher: nn.Module, inputs: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(logits / T)), batch mean: the T^2 keeps its gradient on the scale
    of the cross-entropy's as T changes."""
    with torch.no_grad():
        target = F.log_softmax(teacher(inputs) / temperature, dim=1)
    return F.kl_div(F.log_softmax(logits / temperature, dim=1), target, log_target=True,
                    reduction="batchmean") * temperature ** 2


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy, error rate in [0, 1]) of `model` on `dataset`, in eval mode (mode restored after)."""
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    device = _device_of(model)
    was_training = model.training
    model.eval()
    total_loss, errors = 0.0, 0
    try:
        for inputs, targets in _batches(dataset, torch.arange(n), batch_size):
            inputs, targets = inputs.to(device), targets.to(device)
            logits = model(inputs)
            total_loss += F.cross_entropy(logits, targets, reduction="sum").item()
            errors += (logits.argmax(dim=1) != targets).sum().item()
    finally:
        model.train(was_training)
    return total_loss / n, errors / n


# --------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(model: nn.Module, path: str | os.PathLike, metadata: Optional[dict[str, object]] = None,
                    name: Optional[str] = None) -> Path:
    """Write `model`'s state_dict to `path` as safetensors, atomically, with the model name and `metadata`.

    The file is written to a temporary file in the same folder, fsynced, then renamed over `path`, so a crash
    leaves either the old file or the new one, never a torn one. Metadata values are stored as strings.
    """
    path = Path(path)
    name = name or model_name(model)
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; expected one of {sorted(MODELS)}")
    header = {str(k): str(v) for k, v in (metadata or {}).items()}
    header.update(format=CHECKPOINT_FORMAT, model=name)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp_name, metadata=header)
        os.chmod(tmp_name, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual permissions
        with open(tmp_name, "rb") as tmp:  # fsync the data before the rename makes it visible
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_directory(str(path.parent))
    return path


def _current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it, then put it back
    os.umask(mask)
    return mask


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a checkpoint (model name, seed, errors, ...), checked to be a weightshare checkpoint."""
    metadata, _ = _read_checkpoint(Path(path), with_tensors=False)
    return metadata


def _read_checkpoint(path: Path, with_tensors: bool) -> tuple[dict[str, str], dict[str, Tensor]]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()} if with_tensors else {}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"checkpoint {path}: not a readable safetensors file ({exc})") from exc
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path}: format {metadata.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    if metadata.get("model") not in MODELS:
        raise ValueError(f"checkpoint {path}: model name {metadata.get('model')!r} is not one of {sorted(MODELS)}")
    return metadata, tensors


def load_checkpoint(path: str | os.PathLike, expected_model: Optional[str] = None) -> nn.Module:
    """Rebuild the model a checkpoint names and load its tensors; returned in eval mode on the CPU.

    Raises ValueError (naming the file) if the file is not a weightshare checkpoint, names an unknown model or
    not `expected_model`, or if its tensor names, shapes or dtypes differ from that model's.
    """
    path = Path(path)
    metadata, tensors = _read_checkpoint(path, with_tensors=True)
    name = metadata["model"]
    if expected_model is not None and name != expected_model:
        raise ValueError(f"checkpoint {path}: holds model {name!r}, expected {expected_model!r}")
    with torch.random.fork_rng(devices=[]):  # building initialises weights: leave the caller's RNG untouched
        model = build_model(name)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path}: tensors do not match model {name!r} "
                         f"(missing {missing}, unexpected {unexpected})")
    for key, ref in expected.items():
        got = tensors[key]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise ValueError(f"checkpoint {path}: tensor {key!r} is {got.dtype} {tuple(got.shape)}, model "
                             f"{name!r} expects {ref.dtype} {tuple(ref.shape)}")
    model.load_state_dict(tensors, strict=True)
    return model.eval()


# --------------------------------------------------------------------------------------------- command line
def _parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m weightshare.train",
                                     description="Train an MNIST model deterministically and save a checkpoint.")
    parser.add_argument("--model", required=True, choices=sorted(RECIPES))
    parser.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, help="default: the model's recipe (see RECIPES)")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--optimizer", choices=["sgd", "adam"])
    parser.add_argument("--val-size", type=int, default=5000, help="training examples held out for validation")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="torch device to train on (the published checkpoints: cpu)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def _machine() -> str:
    """A short description of where training ran, for the checkpoint metadata (e.g. "Intel Xeon, 2 CPUs")."""
    return f"{cpu_name()}, {os.cpu_count()} CPUs"

def main(argv: Optional[list[str]] = None) -> None:
    """Train `--model` with its recipe (overridable by flags), evaluate, and save the checkpoint to `--out`."""
    args = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = dict(RECIPES[args.model])
    for key in ("epochs", "lr", "batch_size", "weight_decay", "optimizer"):
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)

    splits = mnist_splits(val_size=args.val_size, seed=0)  # split seed fixed: all models share one validation set
    torch.manual_seed(args.seed)
    model = build_model(args.model).to(args.device)
    start = time.perf_counter()
    train(model, splits.train, seed=args.seed, progress=not args.no_progress, **recipe)  # type: ignore[arg-type]
    train_time = time.perf_counter() - start
    val_loss, val_error = evaluate(model, splits.val) if len(splits.val) else (float("nan"), float("nan"))
    test_loss, test_error = evaluate(model, splits.test)

    metadata = dict(
        seed=args.seed, **recipe, val_size=args.val_size, split_seed=0,
        input_normalization=f"(x - {MNIST_MEAN}) / {MNIST_STD}, x in [0, 1]",
        val_error=f"{val_error:.6f}", test_error=f"{test_error:.6f}", test_loss=f"{test_loss:.6f}",
        train_time_s=f"{train_time:.1f}", torch_version=torch.__version__, device=args.device,
        threads=torch.get_num_threads(),
        machine=_machine(),
        command="python -m weightshare.train " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    out = save_checkpoint(model, args.out, metadata, name=args.model)
    print(f"{args.model}: test error {100 * test_error:.2f}% (loss {test_loss:.4f}), "
          f"val error {100 * val_error:.2f}%, trained in {train_time:.1f} s; saved {out}")


if __name__ == "__main__":
    main()
