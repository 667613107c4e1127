"""Optimizer state per parameter element, for every optimizer and parameter dtype.

`state_bytes` sums the tensors an optimizer keeps (after its first step,
when the state exists), per state key. `cuda_state_bytes` measures the same
step on a GPU with the caching allocator's counters: what stays allocated
after the first step (the state) and its peak (state plus the step's
temporaries). `table` runs every case of `CASES` on one tensor set and
prints the README's table; on a GPU (``--device cuda``, as bench/gpu_check.sh
may call it) the measured columns are added.

    python bench/state_bytes.py                  # summed state tensors (CPU)
    python bench/state_bytes.py --device cuda    # plus torch.cuda.max_memory_allocated

Per element: the state kept per parameter element (W0, V, U, moments,
momentum buffer); per group: what the exact group-lasso solve keeps per
group (its warm-start sigma, docs/math.md section 4); per tensor: 0-d step
counters.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch

try:
    import ramda_kernels as rk
except ImportError:  # run from a checkout without the package installed
    sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", p)
                    for p in ("", "python")]
    import ramda_kernels as rk

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: (label, optimizer class name, keywords, group lasso?) for every optimizer
#: and state-changing option; torch.optim.AdamW as the yardstick.
CASES: List[Tuple[str, str, Dict, bool]] = [
    ("RAMDA", "RAMDA", {}, False),
    ("RAMDA, group lasso (exact)", "RAMDA", {"lambda_": 1e-3}, True),
    ("RMDA", "RMDA", {}, False),
    ("ProxAdamW", "ProxAdamW", {}, False),
    ("ProxAdamW, group lasso (exact)", "ProxAdamW", {"lambda_": 1e-3}, True),
    ("ProxAdamW, amsgrad", "ProxAdamW", {"amsgrad": True}, False),
    ("ProxSGD", "ProxSGD", {}, False),
    ("ProxSGD, momentum=1 (buf = g)", "ProxSGD", {"momentum": 1.0}, False),
    ("torch.optim.AdamW", "torch.optim.AdamW", {}, False),
]


#: 0-d step counters, one per parameter tensor (torch.optim.AdamW's ``step``;
#: this package's in capturable mode, else Python numbers)
COUNTERS = ("step", "alpha")


def state_bytes(opt: torch.optim.Optimizer) -> Dict[str, int]:
    """Bytes of the tensors in ``opt.state``, summed per state key over every
    parameter (0-d step counters of a capturable optimizer included)."""
    out: Dict[str, int] = {}
    for st in opt.state.values():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                out[key] = out.get(key, 0) + value.numel() * value.element_size()
    return out


def cuda_state_bytes(make: Callable[[], Tuple[torch.optim.Optimizer, List[torch.Tensor]]]
                     ) -> Tuple[int, int]:
    """``(kept, peak)`` bytes of the first step of the optimizer ``make()``
    returns (with gradients already set on its CUDA parameters): allocated
    after the step minus before it (the state it created), and the peak
    during the step minus before it (state plus temporaries)."""
    opt, params = make()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    opt.step()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() - before, torch.cuda.max_memory_allocated() - before


def _optimizer(class_name: str, kwargs: Dict, groups, backend: str):
    if class_name.startswith("torch.optim."):
        return getattr(torch.optim, class_name.rsplit(".", 1)[1])(
            [p for g in groups for p in g["params"]], **kwargs)
    return getattr(rk, class_name)(groups, backend=backend, **kwargs)


def make_case(class_name: str, kwargs: Dict, grouped: bool, dtype: torch.dtype,
              device: torch.device, shape: Tuple[int, int] = (1024, 1024), backend: str = "auto"):
    """One weight of ``shape`` (input-wise groups, ``dims=(0,)``, when ``grouped``)
    with a gradient, and its optimizer: ``(optimizer, [weight])``."""
    gen = torch.Generator(device=device).manual_seed(0)
    w = torch.nn.Parameter(torch.randn(shape, generator=gen, device=device).to(dtype))
    w.grad = torch.randn(shape, generator=gen, device=device).to(dtype)
    group = {"params": [w]}
    if grouped:
        group["dims"] = (0,)
    return _optimizer(class_name, kwargs, [group], backend), [w]


def measure(label_case, dtype: torch.dtype, device: torch.device,
            shape: Tuple[int, int] = (1024, 1024)) -> Dict[str, float]:
    """Per element and per group bytes of one case (summed; measured on CUDA)."""
    _, class_name, kwargs, grouped = label_case
    opt, params = make_case(class_name, kwargs, grouped, dtype, device, shape)
    opt.step()
    per_key = state_bytes(opt)
    numel = sum(p.numel() for p in params)
    groups = shape[1] if grouped else 0
    per_group = per_key.get("sigma", 0)
    counters = sum(n for k, n in per_key.items() if k in COUNTERS)
    row = {"per_element": (sum(per_key.values()) - per_group - counters) / numel,
           "per_group": per_group / groups if groups else 0.0,
           "per_tensor": counters / len(params), "keys": per_key}
    if device.type == "cuda":
        kept, peak = cuda_state_bytes(lambda: make_case(class_name, kwargs, grouped, dtype,
                                                        device, shape))
        row["cuda_kept"] = kept / numel
        row["cuda_peak"] = peak / numel
    return row


def table(device: torch.device, shape: Tuple[int, int] = (1024, 1024)) -> str:
    """The README's table (markdown): one row per case, per dtype the state
    bytes per parameter element; ``+ s/group`` where a group keeps ``s`` bytes,
    ``+ s/tensor`` for 0-d counters."""
    cuda = device.type == "cuda"
    head = "| optimizer | " + " | ".join(DTYPES) + " |"
    if cuda:
        head += " " + " | ".join(f"{n} kept / peak (CUDA)" for n in DTYPES) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for case in CASES:
        rows = [measure(case, dt, device, shape) for dt in DTYPES.values()]
        cells = [f"{r['per_element']:g}" + (f" + {r['per_group']:g}/group" if r["per_group"] else "")
                 + (f" + {r['per_tensor']:g}/tensor" if r["per_tensor"] else "") for r in rows]
        if cuda:
            cells += [f"{r['cuda_kept']:.3f} / {r['cuda_peak']:.3f}" for r in rows]
        lines.append(f"| {case[0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=1024)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    print(f"state bytes per parameter element, one ({args.rows}, {args.cols}) weight "
          f"(group lasso: input-wise, {args.cols} groups), on {device}")
    print(table(device, (args.rows, args.cols)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
