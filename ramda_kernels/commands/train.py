"""``ramda-kernels train``: train a small model with structured sparsity and report it.

The default trains the LeNet-style ConvNet of ``digits-convnet`` with RAMDA,
channel-wise group lasso (`group_parameters` defaults) and the authors'
stage-wise schedule, prints loss, test accuracy and (weighted) group sparsity
every epoch and the structure report at the end, and writes
``<out>/<optimizer>.json`` (metrics), ``<out>/<optimizer>.pt`` (model,
optimizer and scheduler state) and ``<out>/<optimizer>.png`` (metric and group
sparsity per epoch). Each epoch also records the optimizer's share of the step
time. ``--compare A,B,...`` runs the same task with each optimizer (or
``OPT:GROUPING``, the same optimizer under another grouping) and writes
``<out>/compare.md`` and ``<out>/compare.png``; ``--compact`` compacts each
trained model and reports what it saved; ``--task charlm`` is a small
byte-level transformer language model (test perplexity); ``--model`` /
``--data MODULE:FUNCTION`` plug in the user's own model and data.

The work is split so that other commands can reuse it: `make_config` turns
flags into a validated `Config` (or raises `UsageError`), `train` runs one
configuration and returns a `Result`, `run` prints and saves.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

HELP = "train a small model with RAMDA (or another optimizer) and report its structured sparsity"

REGULARIZED = ("ramda", "rmda", "proxadamw", "proxsgd")
PLAIN = ("adamw", "sgd")
OPTIMIZERS = REGULARIZED + PLAIN
#: each optimizer's own default learning rate (docs/math.md section 1, torch for adamw/sgd)
DEFAULT_LR = {"ramda": 1e-2, "rmda": 0.1, "proxadamw": 1e-3, "proxsgd": 0.1, "adamw": 1e-3, "sgd": 0.1}
REGULARIZERS = ("group_lasso", "l1", "nuclear", "none")
GROUPINGS = ("channel", "filter", "input", "output", "units")
#: training batches that recalibrate_batchnorm averages over before an evaluation
RECALIBRATE_BATCHES = 50


class UsageError(ValueError):
    """A flag value that cannot work; the message is the whole error line."""


@dataclasses.dataclass
class Config:
    task: str
    optimizer: str
    regularizer: str
    grouping: Optional[str]
    lambda_: float
    lr: float
    momentum: Optional[float]
    epochs: int
    milestones: List[int]
    backend: str
    device: str
    seed: int
    batch_size: int
    out: str
    #: stop each epoch after this many batches (0: all); for quick tests
    max_batches: int = 0
    #: --model / --data as given ("module:function"), None for the task's
    model: Optional[str] = None
    data: Optional[str] = None
    #: re-estimate BatchNorm statistics before each evaluation (--no-recalibrate-bn: off)
    recalibrate_bn: bool = True
    #: after training, compact the model and report its size and speed (--compact)
    compact: bool = False
    #: the run's file stem and table name ("": the optimizer's name)
    name: str = ""

    @property
    def run_name(self) -> str:
        return self.name or self.optimizer
    #: optimizer steps after the last milestone until ramda/rmda's averaging weight is 1
    #: (None: the authors' c0 * sqrt(i) ramp, 1/c0^2 steps)
    ramp_steps: Optional[int] = None


@dataclasses.dataclass
class Result:
    config: Config
    model: Any
    optimizer: Any
    scheduler: Any
    report: Any
    history: List[Dict[str, float]]
    backend: Optional[str]
    #: `ramda_kernels.compact.CompactionReport.as_dict()` with --compact, or
    #: ``{"error": reason}`` where the model could not be compacted
    compaction: Optional[Dict[str, Any]] = None

    @property
    def final(self) -> Dict[str, float]:
        return self.history[-1] if self.history else {}


def add_arguments(parser) -> None:
    from ramda_kernels.tasks import TASKS

    parser.add_argument("--task", default="digits-convnet", choices=sorted(TASKS),
                        help="model and data (default: digits-convnet)")
    parser.add_argument("--optimizer", default=None, choices=OPTIMIZERS,
                        help="default: ramda; adamw and sgd are torch's, unregularized")
    parser.add_argument("--compare", default=None, metavar="OPT1,OPT2,...",
                        help="train the same task with each of these optimizers (same seed, data and "
                             "epochs, each with its own default lr) and write <out>/compare.md (a "
                             "table, also printed) and <out>/compare.png, e.g. "
                             "--compare ramda,proxadamw,rmda,proxsgd,adamw; OPT:GROUPING runs OPT "
                             "under that grouping (default: the task's), e.g. "
                             "--compare ramda:default,ramda:units,adamw --compact")
    parser.add_argument("--compact", action="store_true",
                        help="after training, compact the model (ramda-kernels compact's check: "
                             "equal outputs on the test set) and report parameters, multiply-adds "
                             "and CPU inference time before and after")
    parser.add_argument("--regularizer", default="group_lasso", choices=REGULARIZERS,
                        help="default: group_lasso")
    parser.add_argument("--grouping", choices=GROUPINGS, default=None,
                        help="channel (= input) or filter (= output) groups for every Conv and "
                             "Linear weight, or units (one group per removable unit: residual "
                             "channels, heads, MLP neurons, traced on a training batch); default: "
                             "channel-wise Conv, input-wise Linear")
    parser.add_argument("--lambda", dest="lambda_", type=float, default=None, metavar="LAMBDA",
                        help="regularization weight (default: the task's)")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default: the optimizer's: " +
                             ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    parser.add_argument("--momentum", type=float, default=None,
                        help="averaging weight c of ramda/rmda/proxsgd, heavy-ball momentum of "
                             "sgd (default: the optimizer's)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the task's")
    parser.add_argument("--milestones", default=None, metavar="E1,E2,...",
                        help="epochs at which lr *= 0.1 (and ramda/rmda restart); '' for none; "
                             "default: at 2/3 of the epochs")
    parser.add_argument("--ramp-steps", type=int, default=None, metavar="STEPS",
                        help="ramda/rmda: optimizer steps after the last milestone until the "
                             "averaging weight reaches 1, when groups can become exactly zero "
                             "(default: the authors' ramp c0*sqrt(i), 1/c0^2 = 100 steps for c0 0.1)")
    parser.add_argument("--backend", default="auto", help="auto, reference, triton, cpu or cuda")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seeds initialization and batch order")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the task's")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<task>)")
    parser.add_argument("--model", default=None, metavar="MODULE:FUNCTION",
                        help="your own model: FUNCTION() in MODULE (a dotted module importable from "
                             "the current directory, or a path/to/file.py) returns an nn.Module whose "
                             "output is [N, classes] logits (or [N, T, classes] for a sequence model); "
                             "replaces the --task's model, other defaults stay the task's")
    parser.add_argument("--data", default=None, metavar="MODULE:FUNCTION",
                        help="your own data: FUNCTION() returns ramda_kernels.tasks.Data(x_train, "
                             "y_train, x_test, y_test) (tensors; y are class indices); replaces the "
                             "--task's data")
    parser.add_argument("--no-recalibrate-bn", dest="recalibrate_bn", action="store_false",
                        help="do not re-estimate BatchNorm running statistics on up to "
                             f"{RECALIBRATE_BATCHES} training batches before each evaluation and "
                             "the save (they trail the weights, which RAMDA/RMDA move fast once the "
                             "averaging weight ramps up)")
    parser.add_argument("--max-batches", type=int, default=0, help=argparse.SUPPRESS)


def load_function(spec: str, flag: str):
    """The function named by ``module:function`` (or ``path/file.py:function``); `UsageError` if none."""
    import importlib
    import importlib.util

    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise UsageError(f"{flag} must be MODULE:FUNCTION, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise UsageError(f"{flag}: no such file {module_name!r}")
            name = "_ramda_user_" + os.path.splitext(os.path.basename(module_name))[0]
            module_spec = importlib.util.spec_from_file_location(name, module_name)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except UsageError:
        raise
    except Exception as e:  # the user's module: any import-time error is theirs to fix
        detail = " ".join(str(e).split())[:200]
        raise UsageError(f"{flag}: cannot import {module_name!r}: {type(e).__name__}: {detail}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UsageError(f"{flag}: module {module_name!r} has no function {func_name!r}")
    return func


def _model_and_data(cfg: Config, task):
    """``(model, data)`` of ``cfg``: the task's, or the --model / --data functions' results."""
    import torch

    from ramda_kernels import tasks

    if cfg.data is None:
        data = task.load()
    else:
        data = load_function(cfg.data, "--data")()
        if not isinstance(data, tasks.Data):
            raise UsageError(f"--data {cfg.data}: returned {type(data).__name__}, expected "
                             "ramda_kernels.tasks.Data(x_train, y_train, x_test, y_test)")
        for field in ("x_train", "y_train", "x_test", "y_test"):
            if not isinstance(getattr(data, field), torch.Tensor):
                raise UsageError(f"--data {cfg.data}: {field} is a {type(getattr(data, field)).__name__}, "
                                 "expected a torch.Tensor")
    if cfg.model is None:
        model = task.model()
    else:
        model = load_function(cfg.model, "--model")()
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"--model {cfg.model}: returned {type(model).__name__}, expected a torch.nn.Module")
    return model, data


def _milestones(text: Optional[str], epochs: int, task) -> List[int]:
    if text is None:
        return task.default_milestones(epochs)
    try:
        out = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UsageError(f"--milestones must be comma-separated epochs, got {text!r}") from None
    if any(m <= 0 for m in out) or out != sorted(set(out)):
        raise UsageError(f"--milestones must be increasing positive epochs, got {text!r}")
    if out and out[-1] > epochs:
        raise UsageError(f"--milestones: epoch {out[-1]} is after the last epoch ({epochs})")
    return out


def make_config(args) -> "Config":
    """Flags -> `Config` with the task's and optimizer's defaults filled in."""
    import torch

    from ramda_kernels import backends, tasks

    task = tasks.get(args.task)
    if task is None:
        raise UsageError(f"unknown task {args.task!r} (expected one of {sorted(tasks.TASKS)})")
    if args.optimizer is None:
        args = argparse.Namespace(**{**vars(args), "optimizer": "ramda"})
    if args.optimizer in PLAIN:
        if args.lambda_ not in (None, 0.0):
            raise UsageError(f"--lambda needs a regularized optimizer ({', '.join(REGULARIZED)}); "
                             f"{args.optimizer} has no regularizer")
        if args.backend != "auto":
            raise UsageError(f"--backend applies to {', '.join(REGULARIZED)}, not to {args.optimizer}")
    if args.optimizer in ("adamw", "proxadamw") and args.momentum is not None:
        raise UsageError(f"--momentum does not apply to {args.optimizer} (it uses betas)")
    try:
        backends.check_name(args.backend)
    except ValueError as e:
        raise UsageError(str(e)) from None
    lambda_ = task.lambda_ if args.lambda_ is None else args.lambda_
    if not (math.isfinite(lambda_) and lambda_ >= 0):
        raise UsageError(f"--lambda must be a finite number >= 0, got {lambda_!r}")
    lr = task.lr.get(args.optimizer, DEFAULT_LR[args.optimizer]) if args.lr is None else args.lr
    if not (math.isfinite(lr) and lr > 0):
        raise UsageError(f"--lr must be a positive number, got {lr!r}")
    epochs = task.epochs if args.epochs is None else args.epochs
    if epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {epochs}")
    batch_size = task.batch_size if args.batch_size is None else args.batch_size
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    for flag, spec in (("--model", args.model), ("--data", args.data)):
        if spec is not None:
            load_function(spec, flag)  # fail before training with a one-line error
    if args.max_batches < 0:
        raise UsageError(f"--max-batches must be >= 0, got {args.max_batches}")
    ramp_steps = getattr(args, "ramp_steps", None)
    if ramp_steps is not None and ramp_steps < 1:
        raise UsageError(f"--ramp-steps must be at least 1, got {ramp_steps}")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise UsageError(f"--device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible to torch")
    return Config(task=task.name, optimizer=args.optimizer, regularizer=args.regularizer,
                  grouping=args.grouping, lambda_=lambda_, lr=lr, momentum=args.momentum,
                  epochs=epochs, milestones=_milestones(args.milestones, epochs, task),
                  backend=args.backend, device=str(device), seed=args.seed, batch_size=batch_size,
                  out=args.out or os.path.join("runs", task.name), max_batches=args.max_batches,
                  model=args.model, data=args.data,
                  recalibrate_bn=getattr(args, "recalibrate_bn", True), ramp_steps=ramp_steps,
                  compact=getattr(args, "compact", False), name=getattr(args, "name", ""))


#: ``OPT:default`` in --compare: the task's own grouping
DEFAULT_GROUPING = "default"


def parse_compare(args) -> List[tuple]:
    """``(optimizer, grouping)`` per ``--compare`` entry (``OPT`` or
    ``OPT:GROUPING``; grouping ``None`` is --grouping's, ``"default"`` the
    task's), validated against the other flags."""
    entries = [x for x in args.compare.replace(" ", "").split(",") if x]
    out = []
    for entry in entries:
        name, sep, grouping = entry.partition(":")
        if name not in OPTIMIZERS:
            raise UsageError(f"--compare: unknown optimizer {name!r} (expected some of {', '.join(OPTIMIZERS)})")
        if sep and grouping not in GROUPINGS + (DEFAULT_GROUPING,):
            raise UsageError(f"--compare: unknown grouping {grouping!r} in {entry!r} (expected one of "
                             f"{', '.join(GROUPINGS + (DEFAULT_GROUPING,))})")
        out.append((name, grouping if sep else None))
    if not out or len(set(out)) != len(out):
        raise UsageError(f"--compare needs distinct comma-separated optimizers, got {args.compare!r}")
    for flag, value in (("--optimizer", args.optimizer), ("--lr", args.lr), ("--momentum", args.momentum)):
        if value is not None:
            raise UsageError(f"{flag} cannot be combined with --compare (each optimizer uses its own default)")
    return out


def compare_configs(args) -> List[Config]:
    """One `Config` per ``--compare`` entry; --lambda/--backend go to the regularized ones.
    An entry with a grouping is named ``OPT-GROUPING`` (its files and table row)."""
    out = []
    for name, grouping in parse_compare(args):
        plain = name in PLAIN
        chosen = args.grouping if grouping is None else (None if grouping == DEFAULT_GROUPING else grouping)
        one = argparse.Namespace(**{**vars(args), "optimizer": name, "grouping": chosen,
                                    "name": name if grouping is None else f"{name}-{grouping}",
                                    "lambda_": None if plain else args.lambda_,
                                    "backend": "auto" if plain else args.backend})
        out.append(make_config(one))
    return out


def _grouping_kwargs(cfg: Config, task) -> Dict[str, str]:
    """`group_parameters` keywords: the task's, where --grouping replaces conv and
    linear. A --model is not the task's model, so the task's overrides (name
    patterns of its own layers, e.g. charlm's head groups) do not apply to it."""
    kwargs = dict(task.grouping)
    if cfg.model is not None:
        kwargs.pop("overrides", None)
    if cfg.grouping == "units":
        kwargs["grouping"] = "units"  # the task's grouping for tensors outside every unit
    elif cfg.grouping is not None:
        kwargs.update(conv=cfg.grouping, linear=cfg.grouping)
    return kwargs


def build_optimizer(cfg: Config, model, groups):
    """The optimizer of ``cfg`` over ``groups`` (ramda_kernels' classes or torch's)."""
    import torch

    import ramda_kernels as rk

    kw: Dict[str, Any] = {"lr": cfg.lr}
    if cfg.momentum is not None:
        kw["momentum"] = cfg.momentum
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), **kw)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), **kw)
    cls = {"ramda": rk.RAMDA, "rmda": rk.RMDA, "proxadamw": rk.ProxAdamW, "proxsgd": rk.ProxSGD}[cfg.optimizer]
    return cls(groups, backend=cfg.backend, **kw)


def _flat(logits, y):
    """``(logits, y)`` as ``[M, classes], [M]``: a sequence model's ``[N, T, V]``
    logits and ``[N, T]`` targets are scored at every position."""
    if logits.dim() > 2:
        return logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
    return logits, y


def evaluate(model, x, y, batch_size: int = 512) -> Dict[str, float]:
    """``{"accuracy", "loss"}`` of ``model`` on ``(x, y)`` (per prediction: per
    sample, or per position of a sequence model); accuracy in [0, 1], loss the
    mean cross-entropy in nats."""
    import torch

    model.eval()
    correct, loss, count = 0, 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            logits, target = _flat(model(x[i:i + batch_size]), y[i:i + batch_size])
            correct += int((logits.argmax(1) == target).sum())
            loss += float(torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum"))
            count += len(target)
    model.train()
    return {"accuracy": correct / max(count, 1), "loss": loss / max(count, 1)}


def _sync(device) -> None:
    """Wait for queued GPU work so that perf_counter intervals cover it."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def onset_message(cfg: Config, scheduler, steps: int) -> str:
    """When ramda/rmda's group sparsity can appear in this run (docs/math.md
    section 6): weights are exactly zero only once the averaging weight is 1."""
    onset = scheduler.onset()
    if onset is None:
        return ("sparsity onset: never (no milestone, so the averaging weight stays at its initial "
                "value and the weights are never exactly zero)")
    last = cfg.milestones[-1]
    at, total = last * steps + onset, cfg.epochs * steps
    text = (f"sparsity onset: groups can become exactly zero {onset} optimizer steps after the last "
            f"milestone (epoch {last}), at step {at} of {total}")
    if at > total:
        text += (f"; this run ends {at - total} steps before that, so expect 0% group sparsity: "
                 f"train longer or pass --ramp-steps")
    return text


def _recalibrator(cfg: Config, model, x_tr, log):
    """A function that re-estimates ``model``'s BatchNorm statistics on a fixed
    sample of up to `RECALIBRATE_BATCHES` training batches (a no-op without
    BatchNorm layers or with --no-recalibrate-bn). Training is not affected:
    training-mode BatchNorm uses batch statistics only."""
    import torch

    from ramda_kernels.batchnorm import recalibrate_batchnorm

    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                 for m in model.modules())
    if not has_bn:
        return lambda: None
    if not cfg.recalibrate_bn:
        log("BatchNorm statistics are not recalibrated (--no-recalibrate-bn): eval-mode scores use "
            "running averages that trail the weights")
        return lambda: None
    order = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(cfg.seed))
    sample = x_tr[order[:RECALIBRATE_BATCHES * cfg.batch_size].to(x_tr.device)]
    log(f"BatchNorm statistics are recalibrated on {len(sample)} training inputs before each "
        f"evaluation (--no-recalibrate-bn: off)")
    return lambda: recalibrate_batchnorm(model, sample, batch_size=cfg.batch_size)


def train(cfg: Config, progress: bool = True, log=print) -> Result:
    """Train one configuration; ``log`` gets one line per epoch."""
    import torch
    from tqdm import tqdm

    import ramda_kernels as rk
    from ramda_kernels import backends, tasks

    task = tasks.get(cfg.task)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model, data = _model_and_data(cfg, task)
    model = model.to(device)
    x_tr, y_tr = data.x_train.to(device), data.y_train.to(device)
    x_te, y_te = data.x_test.to(device), data.y_test.to(device)
    grouping = _grouping_kwargs(cfg, task)
    if grouping.get("grouping") == "units":
        grouping["example_inputs"] = x_tr[:2]
    try:
        groups = rk.group_parameters(model, lambda_=cfg.lambda_, regularizer=cfg.regularizer, **grouping)
        optimizer = build_optimizer(cfg, model, groups)
        scheduler = rk.StagewiseScheduler(optimizer, cfg.milestones, ramp_steps=cfg.ramp_steps)
    except (ValueError, rk.BackendUnavailableError) as e:
        raise UsageError(str(e)) from None
    # Structure is measured on the grouping's groups whatever the optimizer, so
    # unregularized runs are scored the same way.
    measured = rk.group_parameters(model, **grouping)
    backend = backends.resolve(cfg.backend, device) if cfg.optimizer in REGULARIZED else None
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(cfg.seed)
    steps = math.ceil(len(x_tr) / cfg.batch_size)
    if cfg.max_batches:
        steps = min(steps, cfg.max_batches)
    history: List[Dict[str, float]] = []
    recalibrate = _recalibrator(cfg, model, x_tr, log)
    if cfg.optimizer in ("ramda", "rmda") and cfg.regularizer != "none":
        log(onset_message(cfg, scheduler, steps))
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        order = torch.randperm(len(x_tr), generator=gen).to(device)
        total, seen = 0.0, 0
        opt_time = step_time = 0.0
        bar = tqdm(range(steps), desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False,
                   disable=None if progress else True,  # None: only on a terminal
                   file=sys.stderr, dynamic_ncols=True)
        for i in bar:
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(*_flat(model(x_tr[idx]), y_tr[idx]))
            loss.backward()
            _sync(device)
            t1 = time.perf_counter()
            optimizer.step()
            _sync(device)
            t2 = time.perf_counter()
            opt_time += t2 - t1
            step_time += t2 - t0
            total += loss.item() * len(idx)
            seen += len(idx)
            if i % 5 == 0:
                bar.set_postfix(loss=f"{total / seen:.4f}")
        bar.close()
        scheduler.step()
        report = rk.structure_report(model, measured)
        t = report.totals
        recalibrate()
        scores = evaluate(model, x_te, y_te)
        row = {"epoch": epoch, "loss": total / seen, "test_accuracy": scores["accuracy"],
               "test_loss": scores["loss"], "test_perplexity": math.exp(min(scores["loss"], 700.0)),
               "group_sparsity": t.group_sparsity, "weighted_group_sparsity": t.weighted_group_sparsity,
               "unstructured_sparsity": t.unstructured_sparsity, "seconds": time.perf_counter() - start,
               "step_seconds": step_time, "optimizer_seconds": opt_time,
               "optimizer_share": opt_time / step_time if step_time > 0 else 0.0}
        history.append(row)
        ppl = f"test ppl {row['test_perplexity']:7.3f}  " if task.metric == "perplexity" else ""
        log(f"epoch {epoch:>{len(str(cfg.epochs))}}/{cfg.epochs}  loss {row['loss']:.4f}  {ppl}"
            f"test acc {100 * row['test_accuracy']:6.2f}%  group sparsity {100 * t.group_sparsity:6.2f}%  "
            f"weighted {100 * t.weighted_group_sparsity:6.2f}%  ({row['seconds']:.1f}s, "
            f"optimizer {100 * row['optimizer_share']:.0f}% of step time)")
    scheduler.close()
    compaction = _compaction(model, x_te, y_te, cfg, log) if cfg.compact else None
    return Result(cfg, model, optimizer, scheduler, rk.structure_report(model, measured), history, backend,
                  compaction)


#: timed passes over the test set per model with --compact (the median is reported)
COMPACT_REPEATS = 5


def _compaction(model, x_te, y_te, cfg: Config, log) -> Dict[str, Any]:
    """Compact the trained ``model`` (eval mode, BatchNorm statistics as
    evaluated) and return its report as a dict, or ``{"error": ...}``."""
    from ramda_kernels.compact import CompactionError, compact_model

    try:
        _, report = compact_model(model, x_te[:2], eval_inputs=x_te, labels=y_te,
                                  batch_size=max(cfg.batch_size, 256), repeats=COMPACT_REPEATS)
    except CompactionError as e:
        log(f"compact: {e}")
        return {"error": str(e)}
    log(f"compact: multiply-adds {report.flops_before:,} -> {report.flops_after:,}, parameters "
        f"{report.params_before:,} -> {report.params_after:,}, CPU time on the test set "
        f"{report.seconds_before:.4f} -> {report.seconds_after:.4f} s")
    return report.as_dict()


def save(result: Result) -> Dict[str, str]:
    """Write ``<out>/<run>.json``, ``.pt`` and ``.png`` (run: the optimizer, or
    ``OPT-GROUPING`` in --compare); return their paths."""
    import torch

    import ramda_kernels as rk

    cfg = result.config
    os.makedirs(cfg.out, exist_ok=True)
    paths = {"metrics": os.path.join(cfg.out, f"{cfg.run_name}.json"),
             "checkpoint": os.path.join(cfg.out, f"{cfg.run_name}.pt"),
             "plot": os.path.join(cfg.out, f"{cfg.run_name}.png")}
    from ramda_kernels.commands.info import cpu_line

    meta = {"config": dataclasses.asdict(cfg), "backend": result.backend, "torch": str(torch.__version__),
            "ramda_kernels": rk.__version__, "cpu": cpu_line()}
    with open(paths["metrics"], "w") as f:
        json.dump({**meta, "final": result.final, "epochs": result.history,
                   "structure": result.report.as_dict(), "compaction": result.compaction}, f, indent=1)
    torch.save({**meta, "model": result.model.state_dict(), "optimizer": result.optimizer.state_dict(),
                "scheduler": result.scheduler.state_dict(), "final": result.final}, paths["checkpoint"])
    plot_runs([result], paths["plot"], f"{run_label(cfg)}: {cfg.run_name}")
    return paths


def _describe(cfg: Config, backend: Optional[str]) -> str:
    opt = cfg.optimizer + (f" (backend {backend})" if backend else "")
    mom = "" if cfg.momentum is None else f"  momentum {cfg.momentum:g}"
    reg = f"  {cfg.regularizer} lambda {cfg.lambda_:g}" if cfg.optimizer in REGULARIZED else ""
    grouping = cfg.grouping or "task default"
    custom = "".join(f"  {k} {v}" for k, v in (("model", cfg.model), ("data", cfg.data)) if v)
    text = (f"task {cfg.task}{custom}  optimizer {opt}  lr {cfg.lr:g}{mom}{reg}  grouping {grouping}\n"
            f"{cfg.epochs} epochs  batch {cfg.batch_size}  milestones {cfg.milestones}  seed {cfg.seed}  "
            f"device {cfg.device}")
    return text


def _error(message: str) -> int:
    print(f"ramda-kernels train: error: {message}", file=sys.stderr)
    return 2


def _metric(cfg: Config):
    """``(key, label, scale)`` of the task's headline metric in a history row."""
    from ramda_kernels import tasks

    task = tasks.get(cfg.task)
    if task is not None and task.metric == "perplexity":
        return "test_perplexity", "test perplexity", 1.0
    return "test_accuracy", "test accuracy (%)", 100.0


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_label(cfg: Config) -> str:
    """What was trained: the task, or the --model / --data functions and the task
    whose data or defaults they used."""
    if cfg.model is None and cfg.data is None:
        return cfg.task
    model = cfg.model or f"{cfg.task} model"
    data = cfg.data or f"{cfg.task} data"
    return f"{model} on {data}"


#: line styles and markers per run, so that runs with equal values (0% group
#: sparsity for every unregularized optimizer) stay visible on top of each other
_STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v"), ((0, (1, 3)), "x")]


def _zoom(ax, series: List[List[float]]) -> bool:
    """Limit the y axis to the values of the later half of each run (with a
    margin) when the early epochs would otherwise stretch it so far that the
    final differences between runs are invisible; return whether it did."""
    late = [v for ys in series for v in ys[len(ys) // 2:]]
    every = [v for ys in series for v in ys]
    if not late or max(every) == min(every):
        return False
    lo, hi = min(late), max(late)
    if (hi - lo) >= 0.25 * (max(every) - min(every)):
        return False
    pad = max(0.1 * (hi - lo), 1e-3 * max(abs(hi), 1.0))
    ax.set_ylim(lo - pad, hi + pad)
    return True


def figure(results: List[Result], title: str):
    """The matplotlib figure of `plot_runs` (headline metric, group sparsity)."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    key, label, scale = _metric(results[0].config)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    metric = []
    for k, r in enumerate(results):
        style, marker = _STYLES[k % len(_STYLES)]
        epochs = [h["epoch"] for h in r.history]
        metric.append([scale * h[key] for h in r.history])
        ax1.plot(epochs, metric[-1], linestyle=style, marker=marker, markersize=4, label=r.config.run_name)
        ax2.plot(epochs, [100 * h["group_sparsity"] for h in r.history], linestyle=style, marker=marker,
                 markersize=4, label=r.config.run_name)
    zoomed = len(results) > 1 and _zoom(ax1, metric)
    ax1.set_ylabel(label + (" (zoomed on the later epochs)" if zoomed else ""))
    ax2.set_ylabel("group sparsity (%)")
    for ax in (ax1, ax2):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_runs(results: List[Result], path: str, title: str) -> str:
    """Headline metric and group sparsity vs epoch, one line per run, into ``path`` (PNG)."""
    fig = figure(results, title)
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def compare_table(results: List[Result]) -> str:
    """Markdown table of the final metrics and times of each run (group sparsity
    counts each run's own groups), and with --compact what compaction kept."""
    key, label, scale = _metric(results[0].config)
    head = ["run", "grouping", "lr", label, "group sparsity", "weighted group sparsity", "wall time (s)",
            "optimizer time (s)", "optimizer share of step"]
    compacted = any(r.compaction is not None for r in results)
    if compacted:
        head += ["multiply-adds after compact", "parameters after compact", "CPU time after / before"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        f = r.final
        wall = sum(h["seconds"] for h in r.history)
        opt = sum(h["optimizer_seconds"] for h in r.history)
        step = sum(h["step_seconds"] for h in r.history)
        name = r.config.run_name + (f" ({r.backend})" if r.backend else "")
        metric = f"{scale * f[key]:.2f}"
        cells = [name, r.config.grouping or "task default", f"{r.config.lr:g}", metric,
                 f"{100 * f['group_sparsity']:.2f}%", f"{100 * f['weighted_group_sparsity']:.2f}%",
                 f"{wall:.1f}", f"{opt:.1f}", f"{100 * opt / step if step else 0:.0f}%"]
        if compacted:
            c = r.compaction or {"error": "not compacted"}
            if "error" in c:
                cells += ["-", "-", "-"]
            else:
                cells += [f"{c['flops_after']:,} ({100 * c['flops_after'] / c['flops_before']:.1f}%)",
                          f"{c['params_after']:,} ({100 * c['params_after'] / c['params_before']:.1f}%)",
                          f"{c['seconds_after'] / c['seconds_before']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_compare(args) -> int:
    try:
        configs = compare_configs(args)
    except UsageError as e:
        return _error(str(e))
    from ramda_kernels import backends

    for cfg in configs:
        if cfg.optimizer in REGULARIZED:
            try:
                backends.resolve(cfg.backend, cfg.device)
            except backends.BackendUnavailableError as e:
                return _error(str(e).splitlines()[0])
    results = []
    for cfg in configs:
        print(("\n" if results else "") + _describe(cfg, None if cfg.optimizer in PLAIN else
                                                    backends.resolve(cfg.backend, cfg.device)))
        try:
            result = train(cfg)
        except UsageError as e:
            return _error(str(e))
        save(result)
        results.append(result)
    cfg = configs[0]
    table = compare_table(results)
    md = os.path.join(cfg.out, "compare.md")
    png = os.path.join(cfg.out, "compare.png")
    with open(md, "w") as f:
        f.write(f"Task {cfg.task}, {cfg.epochs} epochs, batch {cfg.batch_size}, milestones "
                f"{cfg.milestones}, seed {cfg.seed}, device {cfg.device}, regularizer "
                f"{cfg.regularizer} lambda {cfg.lambda_:g} (regularized optimizers only).\n\n")
        f.write(table)
    plot_runs(results, png, f"{run_label(cfg)}: {', '.join(c.run_name for c in configs)}")
    print()
    print(table, end="")
    print(f"wrote {md} and {png} (and <run>.json/.pt/.png per run in {cfg.out})")
    return 0


def run(args) -> int:
    if args.compare is not None:
        return run_compare(args)
    try:
        cfg = make_config(args)
    except UsageError as e:
        return _error(str(e))
    from ramda_kernels import backends

    backend = None
    if cfg.optimizer in REGULARIZED:
        try:
            backend = backends.resolve(cfg.backend, cfg.device)
        except backends.BackendUnavailableError as e:
            return _error(str(e).splitlines()[0])
    print(_describe(cfg, backend))
    try:
        result = train(cfg)
    except UsageError as e:
        return _error(str(e))
    print()
    print(result.report)
    paths = save(result)
    final = result.final
    ppl = f"test perplexity {final['test_perplexity']:.3f}  " if _metric(cfg)[0] == "test_perplexity" else ""
    print(f"\nfinal: {ppl}test accuracy {100 * final['test_accuracy']:.2f}%  group sparsity "
          f"{100 * final['group_sparsity']:.2f}%  weighted group sparsity "
          f"{100 * final['weighted_group_sparsity']:.2f}%")
    print(f"wrote {paths['metrics']}, {paths['checkpoint']} and {paths['plot']}")
    return 0
