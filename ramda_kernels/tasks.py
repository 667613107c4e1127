"""Small training tasks for ``ramda-kernels train``: a model, its data, its defaults.

A task is a `Task`: a name, a one-line description, ``load(seed) -> Data``,
``model() -> nn.Module`` and the defaults the command uses when a flag is not
given (grouping, lambda, epochs, ...). New tasks (a character-level language
model, ...) register themselves in `TASKS` with `register`.

The digits tasks use scikit-learn's 8x8 handwritten digits, which ship inside
the scikit-learn package (no download): 1797 images, split 80/20 with a fixed
seed so every run is scored on the same 360 test images.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

SPLIT_SEED = 0


@dataclasses.dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    description: str
    load: Callable[[], Data]
    model: Callable[[], nn.Module]
    #: `group_parameters` keywords used unless --grouping is given
    grouping: Dict[str, str]
    #: optimizer-independent defaults: epochs, batch_size, lambda_, milestones (as
    #: fractions of the epochs)
    epochs: int = 30
    batch_size: int = 64
    lambda_: float = 3e-4
    milestones: Tuple[float, ...] = (2 / 3,)
    #: lr per optimizer where the task wants something else than the optimizer's default
    lr: Dict[str, float] = dataclasses.field(default_factory=dict)
    #: headline metric: "accuracy" (classification) or "perplexity" (language model)
    metric: str = "accuracy"

    def default_milestones(self, epochs: int) -> list:
        out = sorted({max(1, round(f * epochs)) for f in self.milestones})
        return [m for m in out if m <= epochs]


TASKS: Dict[str, Task] = {}


def register(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def load_digits(flat: bool) -> Data:
    """scikit-learn's digits, pixels scaled to [0, 1], fixed 80/20 split."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    x, y = sk_load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=SPLIT_SEED, stratify=y)

    def images(a):
        t = torch.as_tensor(a, dtype=torch.float32) / 16.0
        return t if flat else t.view(-1, 1, 8, 8)

    return Data(images(x_tr), torch.as_tensor(y_tr, dtype=torch.long),
                images(x_te), torch.as_tensor(y_te, dtype=torch.long))


class DigitsConvNet(nn.Module):
    """LeNet-style: two 3x3 conv + ReLU + 2x2 max-pool stages, two Linear layers.

    ``[N, 1, 8, 8] -> conv1 (32) -> pool -> conv2 (64) -> pool -> fc1 (128) -> fc2 (10)``.
    With channel-wise groups a zero group of ``conv2`` is an unused output
    channel of ``conv1``, a zero group of ``fc1`` an unused input feature.
    """

    def __init__(self, channels: Tuple[int, int] = (32, 64), hidden: int = 128):
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(c2 * 2 * 2, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class DigitsMLP(nn.Module):
    """``64 pixels -> 128 -> 64 -> 10``; input-wise groups of fc1 select pixels."""

    def __init__(self, hidden: Tuple[int, int] = (128, 64)):
        super().__init__()
        h1, h2 = hidden
        self.fc1 = nn.Linear(64, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


register(Task(
    name="digits-convnet",
    description="LeNet-style ConvNet on scikit-learn's 8x8 digits, channel-wise groups",
    load=lambda: load_digits(flat=False), model=DigitsConvNet,
    grouping={"conv": "channel", "linear": "input"},
))
register(Task(
    name="digits-mlp",
    description="3-layer MLP on scikit-learn's 8x8 digits, input-wise groups",
    load=lambda: load_digits(flat=True), model=DigitsMLP,
    grouping={"conv": "channel", "linear": "input"},
))


def get(name: str) -> Optional[Task]:
    return TASKS.get(name)


__all__ = ["Task", "Data", "TASKS", "register", "get", "load_digits", "DigitsConvNet", "DigitsMLP"]
