"""Fingerprints of ResNet-50's parameters and optimizer state after a few steps.

A refactor that must not change results runs this before and after and
compares: ``--out before.json`` on the old tree, ``--compare before.json`` on
the new one (exit status 1 and the differing tensors named when any bit
moved). The figures depend on the CPU kernel build (``ramda-kernels info``
shows the ISA), so compare only runs of one machine.

    python tools/bitwise_snapshot.py --out /tmp/before.json
    python tools/bitwise_snapshot.py --compare /tmp/before.json

A change that may move results by rounding (say a new solver start) saves
the tensors instead and reports how far each case moved:

    python tools/bitwise_snapshot.py --save-tensors /tmp/before.pt
    python tools/bitwise_snapshot.py --diff-tensors /tmp/before.pt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import param_sets  # noqa: E402

import ramda_kernels as rk  # noqa: E402

CASES = [(opt, grouping) for opt in ("RAMDA", "ProxAdamW") for grouping in ("input", "output")]


def _digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def run_cases(set_name: str, steps: int, backend: str, lambda_: float) -> dict:
    """Parameters (``case/name``) and state tensors (``case/name/key``) after
    ``steps`` steps of every case."""
    out = {}
    for opt_name, grouping in CASES:
        torch.manual_seed(0)
        model = param_sets.build(set_name, torch.device("cpu"), torch.float32)
        groups, _ = param_sets.param_groups(model, "group_lasso", grouping, lambda_)
        opt = getattr(rk, opt_name)(groups, backend=backend)
        names = {p: n for n, p in model.named_parameters()}
        for step in range(steps):
            param_sets.fill_grads(model, seed=1 + step)
            opt.step()
        case = f"{opt_name}/{grouping}"
        for p, name in names.items():
            out[f"{case}/{name}"] = p.detach().clone()
            for key, value in sorted(opt.state[p].items()):
                if isinstance(value, torch.Tensor):
                    out[f"{case}/{name}/{key}"] = value.detach().clone()
    return out


def snapshot(set_name: str, steps: int, backend: str, lambda_: float) -> dict:
    return {k: _digest(v) for k, v in run_cases(set_name, steps, backend, lambda_).items()}


def max_relative_differences(before: dict, now: dict) -> dict:
    """Per case, the largest ``max|a - b| / max|b|`` over its parameters (not state)."""
    out: dict = {}
    for opt_name, grouping in CASES:
        case = f"{opt_name}/{grouping}/"
        for key, b in before.items():
            rest = key[len(case):]
            if not key.startswith(case) or "/" in rest or key not in now or b.numel() == 0:
                continue
            scale = float(b.abs().max())
            rel = float((now[key].double() - b.double()).abs().max()) / scale if scale else 0.0
            out[case[:-1]] = max(out.get(case[:-1], 0.0), rel)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", default="resnet50", choices=sorted(param_sets.SETS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--lambda", dest="lambda_", type=float, default=0.4)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", help="write the fingerprints to this JSON file")
    mode.add_argument("--compare", help="compare with fingerprints written by --out")
    mode.add_argument("--save-tensors", help="write the tensors themselves (torch.save) to this file")
    mode.add_argument("--diff-tensors", help="print each case's largest relative parameter "
                      "difference from tensors written by --save-tensors")
    args = ap.parse_args(argv)
    if args.save_tensors or args.diff_tensors:
        tensors = run_cases(args.set, args.steps, args.backend, args.lambda_)
        if args.save_tensors:
            torch.save(tensors, args.save_tensors)
            print(f"{len(tensors)} tensors written to {args.save_tensors}")
            return 0
        diffs = max_relative_differences(torch.load(args.diff_tensors), tensors)
        for case, rel in diffs.items():
            print(f"{case}: max |p - p_before| / max |p_before| over its parameters = {rel:.3g}")
        return 0
    now = snapshot(args.set, args.steps, args.backend, args.lambda_)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(now, f, indent=0, sort_keys=True)
        print(f"{len(now)} fingerprints written to {args.out}")
        return 0
    with open(args.compare) as f:
        before = json.load(f)
    differ = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    for key in differ[:40]:
        print(f"differs: {key}: {before.get(key)} -> {now.get(key)}")
    print(f"{len(now)} fingerprints, {len(differ)} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
