"""Train a tiny Hugging Face GPT-2 or LLaMA (built from a config, nothing
downloaded) with RAMDA on the charlm bytes, then compact it and time both.

    python tools/hf_compact.py --arch gpt2 --threads 1

Head groups come from `ramda_kernels.grouping.head_overrides`, MLP neurons are
the default input-wise groups of ``c_proj`` / ``down_proj``; embeddings, norms
and the LM head stay unregularized. The stage-wise schedule is counted in
optimizer steps here (one scheduler "epoch" = ``--stage`` steps). Prints the
compaction table (parameters, multiply-adds, CPU time of the test set before
and after) and the test perplexity of both models.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build(arch: str, d: int, layers: int, heads: int, context: int):
    import transformers

    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=d, n_layer=layers, n_head=heads, vocab_size=256,
                                      n_positions=context, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=heads // 2,
                                   vocab_size=256, max_position_embeddings=context, bos_token_id=0,
                                   eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def perplexity(model, x, y, batch: int = 64) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logits = model(x[i:i + batch]).logits
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[i:i + batch].flatten(),
                                                             reduction="sum"))
            count += y[i:i + batch].numel()
    return math.exp(total / count)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2")
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps in all")
    p.add_argument("--stage", type=int, default=200, help="steps before the milestone")
    p.add_argument("--ramp-steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--lambda", dest="lambda_", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    import ramda_kernels as rk
    from ramda_kernels import tasks
    from ramda_kernels.commands.info import cpu_line
    from ramda_kernels.compact import compact_model
    from ramda_kernels.grouping import head_overrides

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = tasks.load_charlm()
    model = build(args.arch, args.d, args.layers, args.heads, tasks.CHARLM_CONTEXT)
    groups = rk.group_parameters(model, lambda_=args.lambda_, overrides=head_overrides(model))
    opt = rk.RAMDA(groups, lr=args.lr)
    sched = rk.StagewiseScheduler(opt, [1], ramp_steps=args.ramp_steps)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in range(args.steps):
        idx = torch.randint(0, len(data.x_train), (args.batch_size,), generator=gen)
        opt.zero_grad(set_to_none=True)
        logits = model(data.x_train[idx]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), data.y_train[idx].flatten())
        loss.backward()
        opt.step()
        if step + 1 == args.stage:
            sched.step()  # the milestone: lr * 0.1, restart, ramp on
    sched.close()
    report = rk.structure_report(model, groups)
    x_test = data.x_test
    small, comp = compact_model(model, x_test[:2], eval_inputs=x_test, batch_size=64, repeats=args.repeats)
    print(f"{args.arch}: d {args.d}, {args.layers} layers, {args.heads} heads; RAMDA lr {args.lr:g} "
          f"lambda {args.lambda_:g}, {args.steps} steps (milestone at {args.stage}, ramp {args.ramp_steps})")
    print(f"{cpu_line()}; torch threads {torch.get_num_threads()}")
    print(f"group sparsity {100 * report.totals.group_sparsity:.1f}%  test perplexity "
          f"{perplexity(model, x_test, data.y_test):.3f} -> {perplexity(small, x_test, data.y_test):.3f}")
    print(comp.table())
    print(f"max |diff| of the logits {comp.max_abs_diff:.2e}; test set {tuple(x_test.shape)}, batch 64")
    for line in comp.skipped:
        print(f"not compacted: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
