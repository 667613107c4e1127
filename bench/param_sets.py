"""Named parameter sets for the benchmarks: real models' shapes, no torchvision needed.

Each set is an ``nn.Module`` tree built from a shape list (on the meta device,
then allocated on the target device and filled from a seeded generator), so
that ``ramda_kernels.group_parameters`` sees real ``Conv2d``/``Linear``
modules and groups them the way a user's model would be grouped.

* ``convnet``: the authors' FashionMNIST ConvNet (conv 20x1x5x5, conv
  50x20x5x5, fc 500x800, fc 10x500, biases): 431,080 parameters.
* ``resnet50``: torchvision's ResNet-50 (bottleneck blocks [3, 4, 6, 3],
  BatchNorm affine parameters, fc 1000x2048): 25,557,032 parameters.
* ``gpt2-medium``: GPT-2 medium (24 layers, d=1024, 16 heads, vocab 50257,
  context 1024, tied output layer): 354,823,168 parameters. The fused
  ``c_attn`` projection is an ``nn.Linear(1024, 3072)``, weight ``[3072, 1024]``.
* ``llama7b-layer``: one LLaMA-7B decoder layer (d=4096, MLP 11008, 32 heads):
  202,383,360 parameters; ``heads`` groups q/k/v by output head and o by input head.
* ``gpt2-tiny``: the same layout at d=64, 4 heads, 2 layers (for CPU tests).

Grouping kinds (``group_lasso`` only; docs/math.md section 3):

* ``input``: Conv2d channel-wise ``dims=(0,2,3)``, Linear input-wise ``dims=(0,)``;
* ``output``: Conv2d filter-wise ``dims=(1,2,3)``, Linear output-wise ``dims=(1,)``;
* ``heads`` (sets with attention; gpt2-medium's numbers): ``c_attn`` viewed as
  ``(48, 64, 1024)`` with ``dims=(1, 2)`` (one group per output head of q, k
  and v), the attention output ``c_proj`` viewed as ``(1024, 16, 64)`` with
  ``dims=(0, 2)`` (one group per input head); every other Linear input-wise.

Biases, normalization layers and embeddings stay unregularized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn



def _convnet() -> nn.Module:
    return nn.ModuleDict(dict(
        conv1=nn.Conv2d(1, 20, 5), conv2=nn.Conv2d(20, 50, 5),
        fc1=nn.Linear(800, 500), fc2=nn.Linear(500, 10)))


def _resnet50() -> nn.Module:
    """ResNet-50's parameter tree (torchvision names), written out from its recipe."""
    net = nn.Module()
    net.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(64)
    inplanes = 64
    for li, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        layer = nn.Module()
        for bi in range(blocks):
            blk = nn.Module()
            blk.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            blk.bn1 = nn.BatchNorm2d(planes)
            blk.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
            blk.bn2 = nn.BatchNorm2d(planes)
            blk.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            blk.bn3 = nn.BatchNorm2d(planes * 4)
            if bi == 0:
                blk.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, bias=False),
                                               nn.BatchNorm2d(planes * 4))
            inplanes = planes * 4
            setattr(layer, str(bi), blk)
        setattr(net, f"layer{li}", layer)
    net.fc = nn.Linear(2048, 1000)
    return net


def _gpt2(d: int, layers: int, vocab: int, ctx: int) -> nn.Module:
    """GPT-2's parameter tree (HF names, Linear weights as ``[out, in]``)."""
    net = nn.Module()
    net.wte = nn.Embedding(vocab, d)
    net.wpe = nn.Embedding(ctx, d)
    h = nn.Module()
    for i in range(layers):
        blk = nn.Module()
        blk.ln_1 = nn.LayerNorm(d)
        blk.attn = nn.Module()
        blk.attn.c_attn = nn.Linear(d, 3 * d)
        blk.attn.c_proj = nn.Linear(d, d)
        blk.ln_2 = nn.LayerNorm(d)
        blk.mlp = nn.Module()
        blk.mlp.c_fc = nn.Linear(d, 4 * d)
        blk.mlp.c_proj = nn.Linear(4 * d, d)
        setattr(h, str(i), blk)
    net.h = h
    net.ln_f = nn.LayerNorm(d)
    return net


def _llama_layer(d: int, mlp: int) -> nn.Module:
    """One LLaMA decoder layer (HF names, no biases): q/k/v/o ``[d, d]``, gate/up
    ``[mlp, d]``, down ``[d, mlp]``, two RMSNorm weights."""
    net = nn.Module()
    net.self_attn = nn.Module()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        setattr(net.self_attn, name, nn.Linear(d, d, bias=False))
    net.mlp = nn.Module()
    net.mlp.gate_proj = nn.Linear(d, mlp, bias=False)
    net.mlp.up_proj = nn.Linear(d, mlp, bias=False)
    net.mlp.down_proj = nn.Linear(mlp, d, bias=False)
    net.input_layernorm = nn.LayerNorm(d, bias=False)
    net.post_attention_layernorm = nn.LayerNorm(d, bias=False)
    return net


@dataclass(frozen=True)
class ParamSet:
    build: Callable[[], nn.Module]
    gpu_only: bool = False
    heads: Optional[Tuple[int, int]] = None  # (d_model, n_heads) of the attention layers


SETS: Dict[str, ParamSet] = {
    "convnet": ParamSet(_convnet),
    "resnet50": ParamSet(_resnet50),
    "gpt2-medium": ParamSet(lambda: _gpt2(1024, 24, 50257, 1024), gpu_only=True, heads=(1024, 16)),
    "llama7b-layer": ParamSet(lambda: _llama_layer(4096, 11008), gpu_only=True, heads=(4096, 32)),
    # GPT-2's layout at toy size, so the head grouping runs in CPU tests
    "gpt2-tiny": ParamSet(lambda: _gpt2(64, 2, 512, 64), heads=(64, 4)),
}
GROUPINGS = ("input", "output", "heads")


def shape_list(name: str) -> List[Tuple[str, Tuple[int, ...]]]:
    """``(parameter name, shape)`` of every parameter of set ``name`` (no memory allocated)."""
    with torch.device("meta"):
        model = SETS[name].build()
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def n_params(name: str) -> int:
    return sum(math.prod(s) for _, s in shape_list(name))


def why_unavailable(name: str, device: torch.device) -> Optional[str]:
    if name not in SETS:
        return f"unknown set (expected one of {tuple(SETS)})"
    if SETS[name].gpu_only and device.type != "cuda":
        return "GPU only (too large to time on a CPU)"
    return None


def groupings_for(name: str) -> Tuple[str, ...]:
    return GROUPINGS if SETS[name].heads else GROUPINGS[:2]


def build(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Set ``name`` allocated on ``device`` in ``dtype``, with weights drawn like a
    trained-from-scratch model (``N(0, 1/fan_in)``; 1-D parameters ``1 + N(0, 0.01)``
    for norm weights, ``N(0, 0.01)`` otherwise), reproducibly from ``seed``."""
    with torch.device("meta"):
        model = SETS[name].build()
    model = model.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
            else:
                p.normal_(0.0, 0.01, generator=gen)
                if pname.endswith("weight"):
                    p.add_(1.0)
        for b in model.buffers():
            b.zero_()
    return model


def fill_grads(model: nn.Module, seed: int = 1) -> None:
    """Give every parameter a gradient ``randn * a_row * b_col`` with ``a, b ~ U(0.2, 1)``:
    rows and columns of different strength, so group lasso zeroes some groups of
    either orientation and keeps others (unit scale, like the parity harness)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for p in model.parameters():
        g = torch.empty_like(p).normal_(generator=gen)
        if p.dim() >= 2:
            a = torch.empty((p.shape[0],) + (1,) * (p.dim() - 1), device=device, dtype=p.dtype)
            b = torch.empty((1, p.shape[1]) + (1,) * (p.dim() - 2), device=device, dtype=p.dtype)
            g.mul_(a.uniform_(0.2, 1.0, generator=gen)).mul_(b.uniform_(0.2, 1.0, generator=gen))
        p.grad = g


def _heads_overrides(d: int, h: int) -> Dict[str, Dict[str, Any]]:
    return {"*.attn.c_attn": {"dims": (1, 2), "view": (3 * h, d // h, d)},
            "*.attn.c_proj": {"dims": (0, 2), "view": (d, h, d // h)},
            "*self_attn.[qkv]_proj": {"dims": (1, 2), "view": (h, d // h, d)},
            "*self_attn.o_proj": {"dims": (0, 2), "view": (d, h, d // h)}}


def param_groups(model: nn.Module, regularizer: str, grouping: Optional[str], lambda_: float,
                 heads: Optional[Tuple[int, int]] = None, **hparams) -> Tuple[List[Dict[str, Any]], str]:
    """Param groups for ``model`` and which code built them; ``heads`` is the set's
    ``(d_model, n_heads)`` for the ``heads`` grouping.

    Uses ``ramda_kernels.group_parameters`` when the package has it, else the
    same rules written out here (Conv2d and Linear weights only).
    """
    conv, linear = ("filter", "output") if grouping == "output" else ("channel", "input")
    if grouping == "heads" and heads is None:
        raise ValueError("the heads grouping needs the set's (d_model, n_heads)")
    overrides = None
    if grouping == "heads":  # the patterns of this set's attention naming only
        import fnmatch
        names = [n for n, _ in model.named_modules()]
        overrides = {k: v for k, v in _heads_overrides(*heads).items()
                     if any(fnmatch.fnmatchcase(n, k) for n in names)}
    try:
        from ramda_kernels import group_parameters
    except ImportError:
        group_parameters = None
    if group_parameters is not None:
        groups = group_parameters(model, lambda_, regularizer=regularizer, conv=conv, linear=linear,
                                  overrides=overrides, **hparams)
        return groups, "ramda_kernels.group_parameters"
    return _direct_groups(model, regularizer, conv == "filter", overrides or {}, lambda_,
                          hparams), "bench/param_sets.py"


def _direct_groups(model, regularizer, output_wise, overrides, lambda_, hparams):
    import fnmatch

    groups: Dict[Any, Dict[str, Any]] = {}
    for mname, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            setting: Dict[str, Any] = {"regularizer": "none"}
            if local == "weight" and isinstance(module, (nn.Conv2d, nn.Linear)) and regularizer != "none":
                setting = {"regularizer": regularizer, "lambda_": lambda_}
                if regularizer == "group_lasso":
                    setting["dims"] = ((1,) if output_wise else (0,)) + tuple(range(2, p.dim()))
                    for pattern, value in overrides.items():
                        if fnmatch.fnmatchcase(mname, pattern):
                            setting.update(value)
            key = tuple(sorted(setting.items()))
            group = groups.setdefault(key, {"params": [], "param_names": [], **hparams, **setting})
            group["params"].append(p)
            group["param_names"].append(f"{mname}.{local}" if mname else local)
    return list(groups.values())


__all__ = ["ParamSet", "SETS", "GROUPINGS", "shape_list", "n_params", "why_unavailable", "groupings_for",
           "build", "fill_grads", "param_groups"]
