"""Fingerprints of ResNet-50's parameters and optimizer state after a few steps.

A refactor that must not change results runs this before and after and
compares: ``--out before.json`` on the old tree, ``--compare before.json`` on
the new one (exit status 1 and the differing tensors named when any bit
moved). The figures depend on the CPU kernel build (``ramda-kernels info``
shows the ISA), so compare only runs of one machine.

    python tools/bitwise_snapshot.py --out /tmp/before.json
    python tools/bitwise_snapshot.py --compare /tmp/before.json
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


def snapshot(set_name: str, steps: int, backend: str, lambda_: float) -> dict:
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
            out[f"{case}/{name}"] = _digest(p)
            for key, value in sorted(opt.state[p].items()):
                if isinstance(value, torch.Tensor):
                    out[f"{case}/{name}/{key}"] = _digest(value)
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
    args = ap.parse_args(argv)
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
