"""``ramda-kernels compact CHECKPOINT``: turn a trained structured-sparse model into a
smaller dense one with the same outputs.

Reads a ``train`` checkpoint (``<out>/<optimizer>.pt``: ``config`` with the task
name, ``model`` state_dict), rebuilds the task's model (or the ``--model
MODULE:FUNCTION`` one it was trained with, and its ``--data``), removes every unit that
no consumer reads (`ramda_kernels.compact.compact_model`), checks that the small
model's outputs equal the original's on the task's test set, and writes

* ``FOLDER/compact.pt``: the small model as plain data (state_dict, shapes,
  pruning history); load it with ``ramda_kernels.compact.load_compact(path)``;
* ``FOLDER/compact.json``: the `CompactionReport` (parameters, MACs, CPU time
  before and after, units per layer, what was skipped and why).
"""

from __future__ import annotations

import json
import os
import sys

HELP = "remove the channels / neurons a trained model no longer uses; same outputs, fewer FLOPs"


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint written by 'ramda-kernels train'")
    parser.add_argument("--out", default=None, metavar="FOLDER",
                        help="output folder (default: <checkpoint folder>/<checkpoint name>-compact)")
    parser.add_argument("--model", default=None, metavar="MODULE:FUNCTION",
                        help="the function that builds the checkpoint's model (default: the one "
                             "recorded by 'train --model', else the task's)")
    parser.add_argument("--data", default=None, metavar="MODULE:FUNCTION",
                        help="the data to check and time on (default: the one recorded by "
                             "'train --data', else the task's)")
    parser.add_argument("--atol", type=float, default=1e-5,
                        help="largest allowed output difference, absolute (default: 1e-5)")
    parser.add_argument("--rtol", type=float, default=1e-5, help="... and relative (default: 1e-5)")
    parser.add_argument("--batch-size", type=int, default=512,
                        help="evaluation batch size for the check and the timing (default: 512)")
    parser.add_argument("--repeats", type=int, default=20,
                        help="timed passes over the test set per model; 0 skips timing (default: 20)")
    parser.add_argument("--no-recalibrate-bn", dest="recalibrate_bn", action="store_false",
                        help="keep the checkpoint's BatchNorm running statistics instead of "
                             "re-estimating them on up to 50 batches of training inputs before the check "
                             "and the save")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's); on a busy machine 1 gives "
                             "steadier times")


def _error(message: str, code: int = 2) -> int:
    print(f"ramda-kernels compact: error: {message}", file=sys.stderr)
    return code


def _reason(e: BaseException) -> str:
    """One line saying why torch.load failed (its weights-only message is a page long)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("WeightsUnpickler error:"):
            return ln.split(". Please use")[0]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def load_checkpoint(path: str):
    """``(task, state_dict, config)`` from a train checkpoint, or raise ValueError
    with a one-line message."""
    import torch

    from ramda_kernels import tasks

    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r}: no such file")
    try:
        # Plain data only (no code is unpickled); train stores torch.__version__,
        # a TorchVersion (a str subclass), so that one class is allowed.
        with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and permission errors all mean "unreadable" here
        raise ValueError(f"cannot read checkpoint {path!r}: {_reason(e)}") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("model"), dict):
        raise ValueError(f"checkpoint {path!r} has no 'model' state_dict (not written by 'ramda-kernels train')")
    config = blob.get("config")
    name = config.get("task") if isinstance(config, dict) else None
    if name is None:
        raise ValueError(f"checkpoint {path!r} names no task (config.task)")
    task = tasks.get(name)
    if task is None:
        raise ValueError(f"checkpoint {path!r}: unknown task {name!r} (expected one of {sorted(tasks.TASKS)})")
    return task, blob["model"], config


def run(args) -> int:
    if args.batch_size < 1:
        return _error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.repeats < 0:
        return _error(f"--repeats must be >= 0, got {args.repeats}")
    if not (args.atol >= 0 and args.rtol >= 0):
        return _error("--atol and --rtol must be >= 0")
    if args.threads is not None and args.threads < 1:
        return _error(f"--threads must be at least 1, got {args.threads}")
    try:
        task, state_dict, config = load_checkpoint(args.checkpoint)
    except ValueError as e:
        return _error(str(e))
    from argparse import Namespace

    from ramda_kernels.commands.train import UsageError, load_function

    # The model and data the checkpoint was trained with, unless the flags say otherwise.
    source = Namespace(model=args.model or config.get("model"), data=args.data or config.get("data"))
    try:
        for flag, spec in (("--model", source.model), ("--data", source.data)):
            if spec is not None:
                load_function(spec, flag)
    except UsageError as e:
        return _error(f"{e} (checkpoint {args.checkpoint!r})")

    import torch

    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _compact(args, task, state_dict, source)
    finally:
        torch.set_num_threads(threads)


def _compact(args, task, state_dict, source) -> int:
    import torch

    from ramda_kernels.commands.info import cpu_line
    from ramda_kernels.commands.train import UsageError, _model_and_data
    from ramda_kernels.compact import CompactionError, compact_model, save_compact

    try:
        model, data = _model_and_data(source, task)
    except UsageError as e:
        return _error(str(e))
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        owner = f"--model {source.model}" if source.model else f"task {task.name!r}"
        return _error(f"checkpoint {args.checkpoint!r} does not fit {owner}'s model: {detail}")
    if args.recalibrate_bn:
        from ramda_kernels.batchnorm import recalibrate_batchnorm
        from ramda_kernels.commands.train import RECALIBRATE_BATCHES

        # The same statistics for the original and the small model: compaction
        # keeps BatchNorm's per-channel entries, so it needs no second pass.
        if recalibrate_batchnorm(model, data.x_train, batch_size=args.batch_size,
                                 max_batches=RECALIBRATE_BATCHES):
            n = min(len(data.x_train), RECALIBRATE_BATCHES * args.batch_size)
            print(f"recalibrated BatchNorm statistics on {n} "
                  f"training inputs (--no-recalibrate-bn: keep the checkpoint's)")
    example = data.x_test[:2]
    try:
        small, report = compact_model(model, example, eval_inputs=data.x_test, labels=data.y_test,
                                      batch_size=args.batch_size, atol=args.atol, rtol=args.rtol,
                                      repeats=args.repeats)
    except CompactionError as e:
        return _error(str(e), code=1)

    stem = os.path.splitext(os.path.basename(args.checkpoint))[0]
    out = args.out or os.path.join(os.path.dirname(args.checkpoint), f"{stem}-compact")
    os.makedirs(out, exist_ok=True)
    pt, js = os.path.join(out, "compact.pt"), os.path.join(out, "compact.json")
    save_compact(pt, small, task=task.name, model=source.model, example_shape=example.shape,
                 example_dtype=example.dtype, report=report)
    with open(js, "w") as f:
        json.dump({"checkpoint": args.checkpoint, "task": task.name, "model": source.model,
                   "data": source.data, "torch": torch.__version__, "cpu": cpu_line(),
                   "threads": torch.get_num_threads(), "batch_size": args.batch_size,
                   "repeats": args.repeats, "atol": args.atol, "rtol": args.rtol,
                   **report.as_dict()}, f, indent=1)

    print(f"task {task.name}  checkpoint {args.checkpoint}  ({len(data.x_test)} test inputs, "
          f"batch {args.batch_size}, CPU threads {torch.get_num_threads()})")
    print(report.table())
    print(f"removed {report.units_removed} units; outputs equal (max |diff| {report.max_abs_diff:.2e}, "
          f"atol {args.atol:g}, rtol {args.rtol:g})")
    left = [f"{c.name} {c.zero_inputs_left}" for c in report.layers if c.zero_inputs_left]
    if left:
        print(f"zero input slices left (network input, partly used flattened channels, kept "
              f"groups): {', '.join(left)}")
    for line in report.skipped:
        print(f"not compacted: {line}")
    if report.kept_last_units:
        print(f"kept {report.kept_last_units} unused unit(s) so that no layer is zero-wide")
    if report.folded_units:
        print(f"{report.folded_units} constant unit(s) (all-zero producer weights) folded into the "
              f"next Linear's bias")
    if report.constant_units:
        print(f"{report.constant_units} constant unit(s) kept: a convolution reads them, no bias "
              f"can absorb them")
    print(f"wrote {pt} and {js}")
    if source.model:
        print(f"load it with ramda_kernels.compact.load_compact({pt!r}, model_fn=<{source.model}>)")
    return 0
