"""Attention: F.scaled_dot_product_attention (masks, causal, scale, grouped-query) and
nn.MultiheadAttention, which torch hands to the tracer as one F.multi_head_attention_forward
call (batch first or not, unbatched, masks, need_weights, per-head weights, separate key and
value sizes, bias_k/bias_v, zero attention), w.r.t. query, key, value and the module's
parameters."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import Case, D, rand

SDPA = "scaled_dot_product_attention"
MHA = "multi_head_attention_forward"

q, k, v = rand(2, 2, 4, 3, seed=1), rand(2, 2, 5, 3, seed=2), rand(2, 2, 5, 3, seed=3)
bool_mask = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]],
                         dtype=torch.bool)  # row 2 attends to nothing: torch gives zeros
float_mask = rand(4, 5, seed=4)
float_inf_mask = float_mask.masked_fill(~bool_mask, float("-inf"))


def _module(cls, *args, seed=0, **kwargs):
    torch.manual_seed(seed)
    return cls(*args, **kwargs).to(D).eval()


mha_bf = _module(nn.MultiheadAttention, 8, 2, batch_first=True)
mha_sf = _module(nn.MultiheadAttention, 8, 2, seed=1)
mha_kv = _module(nn.MultiheadAttention, 8, 2, kdim=6, vdim=5, batch_first=True, seed=2)
mha_extra = _module(nn.MultiheadAttention, 8, 4, add_bias_kv=True, add_zero_attn=True, seed=3)
mha_nobias = _module(nn.MultiheadAttention, 8, 2, bias=False, batch_first=True, seed=4)

x = rand(2, 3, 8, seed=5)  # (N, L, E) batch first; (L, N, E) otherwise
y = rand(2, 4, 8, seed=6)
kx, vx = rand(2, 4, 6, seed=7), rand(2, 4, 5, seed=8)
kpm = torch.tensor([[False, False, True], [True, False, False]])
kpm_sf = torch.tensor([[False, True], [False, False], [True, False]])  # (N, S) = (3, 2)
kpm_extra = torch.tensor([[False, True, False]] * 4)  # (N, S) = (4, 3)
kpm2 = torch.tensor([[False, False, True], [False, True, True]])  # no row fully masked with causal
kpm_y = torch.tensor([[False, True, False, True], [False, False, False, True]])
causal = torch.triu(torch.ones(3, 3, dtype=torch.bool), 1)  # True: not attended
mask3 = rand(4, 3, 3, seed=9)  # (N * heads, L, S)
params = {n: p.detach().clone() for n, p in mha_bf.named_parameters()}


def _fc(module, p, *inputs, **kwargs):
    return torch.func.functional_call(module, p, inputs, kwargs)


CASES = [
    # --- F.scaled_dot_product_attention ---
    Case(SDPA, F.scaled_dot_product_attention, (q, k, v), id="sdpa-q"),
    Case(SDPA, F.scaled_dot_product_attention, (q, k, v), wrt=1, id="sdpa-k"),
    Case(SDPA, F.scaled_dot_product_attention, (q, k, v), wrt=2, id="sdpa-v"),
    Case(SDPA, F.scaled_dot_product_attention, (q, k, v), wrt=(0, 1, 2), id="sdpa-qkv"),
    Case(SDPA, lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True), (q,),
         id="sdpa-self-causal"),
    # w.r.t. value, row l of the output couples to the values it attends to, feature by feature
    Case(SDPA, lambda v: F.scaled_dot_product_attention(q, k, v, is_causal=True), (v,),
         id="sdpa-causal-v-exact", exact_nnz=True),
    Case(SDPA, lambda v: F.scaled_dot_product_attention(q, k, v, attn_mask=float_inf_mask),
         (v,), id="sdpa-inf-mask-v-exact", exact_nnz=True),
    Case(SDPA, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask),
         (q, k, v), wrt=(0, 1, 2), id="sdpa-bool-mask"),
    Case(SDPA, lambda q, k: F.scaled_dot_product_attention(q, k, v, float_mask, scale=0.3),
         (q, k), wrt=(0, 1), id="sdpa-float-mask-scale"),
    Case(SDPA, lambda q: F.scaled_dot_product_attention(q, k, v, attn_mask=float_inf_mask),
         (q,), id="sdpa-float-inf-mask"),
    Case(SDPA, lambda q, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
         (q, float_mask), wrt=1, id="sdpa-wrt-float-mask"),
    Case(SDPA, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, None, 0.0, True, scale=0.5),
         (q, k, v), wrt=(1, 2), id="sdpa-positional-causal"),
    Case(SDPA, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
         (rand(2, 4, 3, 3, seed=10), rand(2, 2, 5, 3, seed=11), rand(2, 2, 5, 3, seed=12)),
         wrt=(0, 1, 2), id="sdpa-gqa"),
    Case(SDPA, F.scaled_dot_product_attention,
         (rand(4, 3, seed=13), rand(6, 3, seed=14), rand(6, 2, seed=15)), wrt=(0, 1, 2),
         id="sdpa-2d"),
    Case(SDPA, torch.nn.functional.scaled_dot_product_attention,
         (rand(3, 4, 3, seed=16), rand(1, 5, 3, seed=17), rand(3, 5, 3, seed=18)),
         wrt=(0, 1, 2), id="sdpa-broadcast-batch"),
    # --- nn.MultiheadAttention (F.multi_head_attention_forward) ---
    Case(MHA, lambda x: mha_bf(x, x, x)[0], (x,), id="mha-self-batch-first"),
    Case(MHA, lambda x: mha_bf(x, x, x), (x,), id="mha-output-and-weights"),
    Case(MHA, lambda q, k, v: mha_bf(q, k, v, need_weights=False)[0], (x, y, y),
         wrt=(0, 1, 2), id="mha-qkv-no-weights"),
    Case(MHA, lambda q, k: mha_bf(q, k, k, key_padding_mask=kpm_y, average_attn_weights=False),
         (x, y), wrt=(0, 1), id="mha-key-padding-per-head"),
    Case(MHA, lambda q: mha_bf(q, y, y, key_padding_mask=kpm_y, need_weights=False)[0], (x,),
         id="mha-key-padding-no-weights"),
    Case(MHA, lambda x: mha_sf(x, x, x), (x,), id="mha-seq-first"),
    Case(MHA, lambda x: mha_sf(x, x, x, key_padding_mask=kpm_sf), (x,),
         id="mha-seq-first-key-padding"),
    Case(MHA, lambda x: mha_bf(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0],
         (x,), id="mha-causal-no-weights"),
    Case(MHA, lambda x: mha_bf(x, x, x, attn_mask=causal, key_padding_mask=kpm2), (x,),
         id="mha-bool-mask-and-padding"),
    Case(MHA, lambda x: mha_bf(x, x, x, attn_mask=mask3, need_weights=False)[0], (x,),
         id="mha-float-3d-mask"),
    Case(MHA, lambda x: mha_bf(x, x, x, attn_mask=mask3[0]), (x,), id="mha-float-2d-mask"),
    Case(MHA, lambda x: mha_bf(x[0], x[0], x[0]), (x,), id="mha-unbatched"),
    Case(MHA, lambda x: mha_bf(x[0], x[0], x[0], need_weights=False, key_padding_mask=kpm[0])[0],
         (x,), id="mha-unbatched-padding-no-weights"),
    Case(MHA, lambda q, k, v: mha_kv(q, k, v), (x, kx, vx), wrt=(0, 1, 2), id="mha-kdim-vdim"),
    Case(MHA, lambda q, k: mha_extra(q, k, k, key_padding_mask=kpm_extra),
         (y, rand(3, 4, 8, seed=19)), wrt=(0, 1), id="mha-bias-kv-zero-attn"),
    Case(MHA, lambda x: mha_nobias(x, x, x, need_weights=False)[0], (x,), id="mha-no-bias"),
    Case(MHA, lambda x: F.multi_head_attention_forward(
        x, x, x, 8, 2, mha_sf.in_proj_weight, mha_sf.in_proj_bias, None, None, False, 0.0,
        mha_sf.out_proj.weight, mha_sf.out_proj.bias, training=False)[0], (x,),
         id="mha-functional"),
    Case(MHA, lambda p, x: _fc(mha_bf, p, x, x, x), (params, x), wrt=0, variants=False,
         id="mha-wrt-parameters"),
    Case(MHA, lambda p, x: _fc(mha_bf, p, x, x, x, need_weights=False)[0], (params, x),
         wrt=(0, 1), variants=False, id="mha-wrt-parameters-and-input"),
]
