"""Small training tasks for ``ramda-kernels train``: a model, its data, its defaults.

A task is a `Task`: a name, a one-line description, ``load(seed) -> Data``,
``model() -> nn.Module`` and the defaults the command uses when a flag is not
given (grouping, lambda, epochs, ...). Tasks register themselves in `TASKS`
with `register`; ``charlm`` is a small byte-level transformer language model on
the Python standard library's own source (found on every machine).

The digits tasks use scikit-learn's 8x8 handwritten digits, which ship inside
the scikit-learn package (no download): 1797 images, split 80/20 with a fixed
seed so every run is scored on the same 360 test images.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

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
    #: `group_parameters` keywords (conv, linear, overrides); --grouping replaces conv and linear
    grouping: Dict[str, Any]
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


class _BasicBlock(nn.Module):
    """``relu(x + bn2(conv2(relu(bn1(conv1(x))))))``, 3x3 convolutions without bias."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class DigitsResNet(nn.Module):
    """A small ResNet: ``[N, 1, 8, 8] -> stem conv (c) + BN -> block -> 2x2 max-pool ->
    block -> global average -> fc (10)``, every block a BatchNorm basic block added
    to its input. With ``grouping="units"`` each residual channel is one group
    across the stem and both blocks' second convolutions (and the fc column), each
    block's inner channel another."""

    def __init__(self, channels: int = 32):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.block1, self.block2 = _BasicBlock(channels), _BasicBlock(channels)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(torch.relu(self.bn(self.stem(x))))
        x = self.block2(self.pool(x))
        return self.fc(x.mean((2, 3)))


register(Task(
    name="digits-convnet",
    description="LeNet-style ConvNet on scikit-learn's 8x8 digits, channel-wise groups",
    load=lambda: load_digits(flat=False), model=DigitsConvNet,
    grouping={"conv": "channel", "linear": "input"},
))
register(Task(
    name="digits-resnet",
    description="small ResNet (BatchNorm basic blocks with residual adds, 32 channels) on "
                "scikit-learn's 8x8 digits, channel-wise groups (--grouping units: residual "
                "and block channels)",
    load=lambda: load_digits(flat=False), model=DigitsResNet,
    grouping={"conv": "channel", "linear": "input"},
))
register(Task(
    name="digits-mlp",
    description="3-layer MLP on scikit-learn's 8x8 digits, input-wise groups",
    load=lambda: load_digits(flat=True), model=DigitsMLP,
    grouping={"conv": "channel", "linear": "input"},
))


#: stdlib modules whose source is the charlm corpus, read in this order
CHARLM_FILES = ("argparse.py", "textwrap.py", "functools.py", "dataclasses.py", "inspect.py",
                "typing.py", "collections/__init__.py", "enum.py", "pathlib.py", "subprocess.py")
CHARLM_BYTES = 200_000
CHARLM_CONTEXT = 64


def load_charlm(context: int = CHARLM_CONTEXT, size: int = CHARLM_BYTES) -> Data:
    """Bytes of Python's own standard-library sources as a next-byte prediction task.

    The first ``size`` bytes of `CHARLM_FILES` (from the running interpreter's
    stdlib, so no download) cut into non-overlapping windows of ``context + 1``
    bytes: ``x`` a window's first ``context`` bytes, ``y`` its last ``context``
    (the next byte at every position). The last 10% of the windows are the test
    set (a fixed split: test text is never seen in training).
    """
    import os

    root = os.path.dirname(os.__file__)
    chunks = []
    for name in CHARLM_FILES:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                chunks.append(f.read())
    text = b"".join(chunks)[:size]
    if len(text) < 20 * (context + 1):
        raise RuntimeError(f"charlm: found only {len(text)} bytes of standard-library source under {root}")
    n = len(text) // (context + 1)
    windows = torch.frombuffer(bytearray(text[:n * (context + 1)]), dtype=torch.uint8).long()
    windows = windows.view(n, context + 1)
    n_test = max(1, n // 10)
    train, test = windows[:-n_test], windows[-n_test:]
    return Data(train[:, :-1].clone(), train[:, 1:].clone(), test[:, :-1].clone(), test[:, 1:].clone())


class Attention(nn.Module):
    """Causal multi-head self-attention with separate ``q``, ``k``, ``v``, ``out`` Linears.

    Head ``h`` owns rows ``h*dh:(h+1)*dh`` of ``q/k/v.weight`` ([d, d], out x in)
    and the same columns of ``out.weight``; `CHARLM_OVERRIDES` makes each of
    those one group.
    """

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.heads
        width = self.q.out_features  # heads * head width: less than d once compaction removed heads

        def split(z):
            return z.view(b, t, h, width // h).transpose(1, 2)

        y = nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                                       is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, width))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(torch.relu(self.fc1(self.ln2(x))))


class CharTransformer(nn.Module):
    """Pre-LN transformer over bytes: ``[N, T] (long) -> [N, T, 256]`` next-byte logits."""

    def __init__(self, layers: int = 2, d: int = 64, heads: int = 4, context: int = CHARLM_CONTEXT,
                 vocab: int = 256):
        super().__init__()
        self.d, self.heads = d, heads
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1], device=x.device)
        h = self.tok(x) + self.pos(pos)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


def charlm_overrides(d: int = 64, heads: int = 4) -> Dict[str, Any]:
    """`group_parameters` overrides giving one group per attention head (docs/math.md section 3:
    ``dims`` are the reduced dims, i.e. a group's elements, after ``view``).

    ``q/k/v.weight`` [d, d] viewed as ``(heads, d/heads, d)``: the head's output
    rows, dims (1, 2). ``out.weight`` [d, d] viewed as ``(d, heads, d/heads)``:
    the head's input columns, dims (0, 2). Other Linears stay input-wise.
    """
    dh = d // heads
    rows = {"dims": (1, 2), "view": (heads, dh, d)}
    cols = {"dims": (0, 2), "view": (d, heads, dh)}
    return {"blocks.*.attn.q": rows, "blocks.*.attn.k": rows, "blocks.*.attn.v": rows,
            "blocks.*.attn.out": cols}


register(Task(
    name="charlm",
    description="2-layer byte-level transformer (d 64, 4 heads, context 64) on ~200 KB of Python's "
                "stdlib source; head-wise attention groups, input-wise Linears; test perplexity",
    load=load_charlm, model=CharTransformer,
    grouping={"conv": "channel", "linear": "input", "overrides": charlm_overrides()},
    # ramda: lr 0.2 / lambda 3e-5 gave test perplexity 7.4 with 60% group sparsity after 6 epochs
    # (lr 1e-2 / lambda 1e-4: 11.2; adamw lr 3e-3: 7.4, dense); the others' lrs are untuned guesses.
    epochs=6, batch_size=32, lambda_=3e-5, metric="perplexity",
    lr={"ramda": 0.2, "rmda": 0.1, "proxadamw": 3e-3, "adamw": 3e-3, "proxsgd": 0.3, "sgd": 0.3},
))


def get(name: str) -> Optional[Task]:
    return TASKS.get(name)


__all__ = ["Task", "Data", "TASKS", "register", "get", "load_digits", "DigitsConvNet", "DigitsResNet",
           "DigitsMLP",
           "load_charlm", "CharTransformer", "charlm_overrides"]
