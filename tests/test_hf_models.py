"""Hugging Face models built from tiny configs (never downloaded): grouping
and compaction of GPT-2 (``Conv1D``) and LLaMA-style models (issue 14).

Expected dims are written out from the weight layouts: ``Conv1D.weight`` is
``[in, out]``; GPT-2's ``c_attn`` output columns are ``[q | k | v]``, each
``H`` heads of ``head_dim``; LLaMA's projections are ``nn.Linear`` ``[out, in]``.
Zero groups are planted by hand so that removed neurons / heads can be counted.
"""

import os
import warnings

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

import ramda_kernels as rk  # noqa: E402
from ramda_kernels.compact import compact_model, load_compact, save_compact  # noqa: E402
from ramda_kernels.grouping import group_parameters, head_overrides  # noqa: E402

D, HEADS, DH, LAYERS, VOCAB, T = 32, 4, 8, 2, 64, 12


def gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=D, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB,
                                  n_positions=16, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama(seed=0, kv_heads=2):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=D, intermediate_size=48, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, num_key_value_heads=kv_heads,
                                   vocab_size=VOCAB, max_position_embeddings=16, bos_token_id=0,
                                   eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def tokens(n=6, seed=1):
    return torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))


def by_name(groups):
    return {n: g for g in groups for n in g["param_names"]}


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


# ---------------------------------------------------------------------------
# Grouping
# ---------------------------------------------------------------------------

def test_gpt2_conv1d_weights_are_grouped_input_wise_without_warning():
    model = gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # GPT-2 leaves only embeddings (by design) unregularized
        groups = group_parameters(model, lambda_=1e-3)
    g = by_name(groups)
    for i in range(LAYERS):
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            name = f"transformer.h.{i}.{layer}.weight"
            assert (g[name]["regularizer"], g[name]["dims"], g[name]["lambda_"]) == ("group_lasso", (1,), 1e-3)
    assert g["transformer.wte.weight"]["regularizer"] == "none"  # tied to lm_head: grouped once
    assert sum(len(x["params"]) for x in groups) == len(list(model.parameters()))
    out = by_name(group_parameters(model, overrides={Conv1D: "output"}))
    assert out["transformer.h.0.mlp.c_fc.weight"]["dims"] == (0,)


def test_input_wise_conv1d_groups_are_input_features():
    """One prox step (threshold lr * lambda = 0.1 per group norm) zeroes exactly
    the group whose norm is below it: row 1 of the [in, out] weight, input feature 1."""
    layer = Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs, weight [4, 6]
    with torch.no_grad():
        layer.weight.fill_(10.0)
        layer.weight[1] = 1e-3
    opt = rk.ProxSGD(group_parameters(nn.Sequential(layer), lambda_=1.0), lr=0.1, backend="reference")
    layer.weight.grad = torch.zeros_like(layer.weight)
    layer.bias.grad = torch.zeros_like(layer.bias)
    opt.step()
    assert not layer.weight[1].any()
    assert bool(layer.weight[[0, 2, 3]].all())


class _Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2)
        self.fc = nn.Linear(8, 8)
        self.emb = nn.Embedding(5, 8)


def test_unregularized_matrices_are_named_in_a_warning():
    with pytest.warns(UserWarning, match=r"1 weight\(s\).*'mha.in_proj_weight'") as rec:
        group_parameters(_Odd())
    assert "emb.weight" not in str(rec[0].message) and "fc.weight" not in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        group_parameters(_Odd(), overrides={"mha": None})          # said explicitly: no warning
        group_parameters(_Odd(), regularizer="none")


@pytest.mark.parametrize("wrap, grouped", [
    (nn.utils.parametrizations.weight_norm, "0.parametrizations.weight.original1"),
    (nn.utils.parametrizations.spectral_norm, "0.parametrizations.weight.original"),
    (nn.utils.parametrizations.orthogonal, None),
])
def test_parametrized_weights(wrap, grouped):
    model = nn.Sequential(wrap(nn.Linear(4, 4)))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        g = by_name(group_parameters(model, lambda_=0.1))
    assert g["0.bias"]["regularizer"] == "none"
    if grouped:
        assert not rec
        assert (g[grouped]["regularizer"], g[grouped]["dims"]) == ("group_lasso", (0,))
    else:  # orthogonal maps a zero column of `original` to a nonzero one: not grouped, but named
        assert g["0.parametrizations.weight.original"]["regularizer"] == "none"
        assert len(rec) == 1 and "0.parametrizations.weight.original" in str(rec[0].message)
    # A module-level override selects the weight's original, not the bias.
    name = grouped or "0.parametrizations.weight.original"
    g = by_name(group_parameters(model, overrides={"0": "output" if grouped is None else "input"}))
    assert g[name]["regularizer"] == "group_lasso" and g["0.bias"]["regularizer"] == "none"


def test_weight_norm_with_a_norm_per_group_is_not_grouped():
    """weight_norm(dim=0) divides each row by its norm: output-wise groups would be 0/0."""
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)))
    with pytest.warns(UserWarning, match="original1"):
        g = by_name(group_parameters(model, linear="output"))
    assert g["0.parametrizations.weight.original1"]["regularizer"] == "none"


def test_head_overrides_give_one_group_per_head():
    model = gpt2()
    g = by_name(group_parameters(model, lambda_=1e9, overrides=head_overrides(model)))
    a = g["transformer.h.0.attn.c_attn.weight"]
    assert (a["view"], a["dims"]) == ((D, 3, HEADS, DH), (0, 1, 3))
    p = g["transformer.h.0.attn.c_proj.weight"]
    assert (p["view"], p["dims"]) == ((HEADS, DH, D), (1, 2))
    m = llama(kv_heads=2)
    g = by_name(group_parameters(m, overrides=head_overrides(m)))
    assert g["model.layers.1.self_attn.o_proj.weight"]["view"] == (D, 2, -1)
    assert g["model.layers.1.self_attn.q_proj.weight"]["view"] == (2, -1, D)


def test_head_groups_zero_whole_heads_and_compaction_removes_them():
    """ProxSGD with a huge lambda on the head groups only: every head's c_proj rows
    become zero, so compaction keeps one head per layer (never zero-wide)."""
    model = gpt2()
    heads = {k: {**v, "lambda_": 1e9} for k, v in head_overrides(model).items()}
    groups = group_parameters(model, lambda_=0.0, overrides=heads)
    opt = rk.ProxSGD(groups, lr=0.1, backend="reference")
    x = tokens()
    model.train()
    model(x, labels=x).loss.backward()
    opt.step()
    model.eval()
    for i in range(LAYERS):
        assert not model.transformer.h[i].attn.c_proj.weight.any()
    small, report = compact_model(model, x[:2], eval_inputs=x)
    assert [small.transformer.h[i].attn.split_size for i in range(LAYERS)] == [DH] * LAYERS
    assert report.kept_last_units == LAYERS and report.max_abs_diff <= 1e-5


# ---------------------------------------------------------------------------
# Compaction
# ---------------------------------------------------------------------------

def _gpt2_params(ff0, ff1, heads0, heads1):
    """GPT-2 parameters with MLP widths ff0/ff1 and heads0/heads1 heads per layer."""
    emb = VOCAB * D + 16 * D
    def layer(ff, h):
        a = h * DH
        return 4 * D + (D * 3 * a + 3 * a) + (a * D + D) + (D * ff + ff) + (ff * D + D)
    return emb + layer(ff0, heads0) + layer(ff1, heads1) + 2 * D


def test_gpt2_neurons_and_heads_are_removed_with_equal_outputs(tmp_path):
    model = gpt2()
    ff = 4 * D
    with torch.no_grad():
        model.transformer.h[0].mlp.c_proj.weight[[0, 3, 7, 50, 127]] = 0     # 5 neurons of layer 0
        model.transformer.h[1].mlp.c_proj.weight[:100] = 0                   # 100 of layer 1
        model.transformer.h[1].attn.c_proj.weight[DH:3 * DH] = 0             # heads 1, 2 of layer 1
        model.transformer.h[0].attn.c_proj.weight[:DH - 1] = 0               # head 0 partly: stays
    x = tokens()
    assert sum(p.numel() for p in model.parameters()) == _gpt2_params(ff, ff, HEADS, HEADS)
    small, report = compact_model(model, x[:2], eval_inputs=x)
    h = small.transformer.h
    assert (h[0].mlp.c_fc.nf, h[1].mlp.c_fc.nf, h[1].mlp.c_proj.nx) == (ff - 5, ff - 100, ff - 100)
    assert (h[0].attn.num_heads, h[1].attn.num_heads, h[1].attn.c_attn.nf) == (4, 2, 3 * 2 * DH)
    assert report.units_removed == 5 + 100 + 2
    assert report.params_after == _gpt2_params(ff - 5, ff - 100, HEADS, 2)
    assert report.max_abs_diff <= 1e-5
    torch.testing.assert_close(logits(small, x), logits(model, x), atol=1e-5, rtol=1e-5)
    # Head 2 of layer 1 went, head 3 stayed: the kept q columns are the original's head 3.
    q = model.transformer.h[1].attn.c_attn.weight[:, 3 * DH:4 * DH]
    torch.testing.assert_close(h[1].attn.c_attn.weight[:, DH:2 * DH], q, atol=0, rtol=0)
    # MACs of the Conv1D layers per sample: T tokens times in x out per layer, plus the LM head.
    macs = T * (D * 3 * HEADS * DH + HEADS * DH * D + 2 * D * (ff - 5)
                + D * 3 * 2 * DH + 2 * DH * D + 2 * D * (ff - 100) + D * VOCAB)
    assert report.flops_after == macs
    assert not any("Traceback" in s for s in report.skipped)
    path = str(tmp_path / "gpt2.pt")
    save_compact(path, small, example_shape=x[:2].shape, example_dtype=x.dtype)
    back = load_compact(path, model_fn=gpt2)
    torch.testing.assert_close(logits(back, x), logits(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_llama_neurons_and_heads_are_removed_with_equal_outputs(tmp_path, kv_heads):
    model = llama(kv_heads=kv_heads)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, :20] = 0              # 20 of 48 neurons
        model.model.layers[1].self_attn.o_proj.weight[:, :2 * DH] = 0       # query heads 0, 1
        model.model.layers[0].self_attn.o_proj.weight[:, 3 * DH:] = 0       # query head 3
    x = tokens()
    small, report = compact_model(model, x[:2], eval_inputs=x)
    layers = small.model.layers
    assert (layers[0].mlp.gate_proj.out_features, layers[0].mlp.down_proj.in_features) == (28, 28)
    if kv_heads == HEADS:   # one key/value head per query head: any head can go
        assert [l.self_attn.o_proj.in_features // DH for l in layers] == [3, 2]
        assert report.units_removed == 20 + 3
    else:                   # 2 query heads share a key/value head: only whole pairs go
        assert [l.self_attn.o_proj.in_features // DH for l in layers] == [4, 2]
        assert [l.self_attn.k_proj.out_features // DH for l in layers] == [2, 1]
        assert report.units_removed == 20 + 1
        assert any("1 zero query head(s) kept" in s for s in report.skipped), report.skipped
    torch.testing.assert_close(logits(small, x), logits(model, x), atol=1e-5, rtol=1e-5)
    path = str(tmp_path / "llama.pt")
    save_compact(path, small, example_shape=x[:2].shape, example_dtype=x.dtype)
    back = load_compact(path, model_fn=lambda: llama(kv_heads=kv_heads))
    torch.testing.assert_close(logits(back, x), logits(model, x), atol=1e-5, rtol=1e-5)


def test_untraceable_rest_of_the_model_is_a_reason_not_a_traceback():
    model = gpt2()
    x = tokens()
    _, report = compact_model(model, x[:2], eval_inputs=x)
    assert report.units_removed == 0
    assert [s for s in report.skipped if "Torch-Pruning cannot trace it" in s] == report.skipped
    assert report.skipped[0].startswith("the rest of the model: "), report.skipped
