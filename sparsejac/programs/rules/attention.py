"""Attention: ``F.scaled_dot_product_attention`` and ``F.multi_head_attention_forward`` (what
``nn.MultiheadAttention`` calls as a whole, and ``nn.TransformerEncoderLayer`` through it), as
decompositions into registered operations: linear projections, reshapes, batched products,
masks as ``masked_fill``/``add`` and a softmax. The Jacobian's structure is that of the
decomposition: each output row couples to every key and value it attends to.

Masks are constants (boolean) or added values (float). Dropout on the attention weights draws a
random mask and is refused unless ``dropout_p`` is 0 (or, for multi-head attention, the module
is in eval mode). ``nn.TransformerEncoderLayer``'s fused fast path
(``torch._transformer_encoder_layer_fwd``) is not taken under the tracer, which torch sees as a
``__torch_function__`` override; the layer runs its Python path, through the functions here.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ...errors import UnsupportedOperationError
from ..registry import decomposition
from ..tracer import PREFIX


@decomposition("scaled_dot_product_attention",
               "query key value attn_mask=None dropout_p=0.0 is_causal=False scale=None "
               "enable_gqa=False")
def scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                 enable_gqa):
    if dropout_p:
        raise UnsupportedOperationError(
            f"{PREFIX}'scaled_dot_product_attention' with dropout_p={dropout_p} draws a random "
            "mask; pass dropout_p=0.0 (as a module does in eval mode)")
    L, S = query.shape[-2], key.shape[-2]
    if enable_gqa and query.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], -3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], -3)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if is_causal:
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
    add = None
    if attn_mask is None:
        keep = None
    elif attn_mask.dtype == torch.bool:
        keep = attn_mask
    else:
        keep, add = attn_mask.detach() > -math.inf, attn_mask
    if keep is not None and not bool(keep.all()):
        return _masked_attention(query, key, value, keep, add, scale)
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    if add is not None:
        scores = scores + add
    return torch.matmul(torch.softmax(scores, -1), value)


def _masked_attention(query, key, value, keep, add, scale):
    """Attention where ``keep`` (a constant, broadcast to ``(*batch, L, S)``) leaves some keys
    out: each query row gathers the keys and values it attends to (an index map), so that the
    Jacobian holds only the couplings that exist (a causal mask halves it). Rows are padded to
    the longest with a key and value of zeros (a constant, so no coupling), weighted zero; a
    row that keeps none gives zeros, as torch has it."""
    L, S = query.shape[-2], key.shape[-2]
    shapes = [query.shape[:-2], key.shape[:-2], value.shape[:-2], keep.shape[:-2]]
    if add is not None:
        shapes.append(add.shape[:-2])
    batch = tuple(np.broadcast_shapes(*(tuple(s) for s in shapes)))  # torch's imports sympy
    keep = keep.expand(batch + (L, S))
    count = keep.sum(-1, keepdim=True)
    K = max(int(count.max()), 1)
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :K]
    valid = torch.arange(K, device=keep.device) < count  # (*batch, L, K)
    index = torch.where(valid, order, S)  # S: the row of zeros appended below

    def padded(t):  # t with a slice of zeros appended along its last axis
        zeros = torch.zeros(t.shape[:-1] + (1,), dtype=t.dtype, device=t.device)
        return torch.cat([t, zeros], -1)

    def rows(t):  # t[..., index[..., l, j], :] for each query row l: (*batch, L, K, d)
        d = t.shape[-1]
        wide = padded(t.transpose(-2, -1)).transpose(-2, -1).unsqueeze(-3)
        wide = wide.expand(batch + (L, S + 1, d))
        return torch.gather(wide, -2, index.unsqueeze(-1).expand(batch + (L, K, d)))

    scores = (query.unsqueeze(-2) * rows(key)).sum(-1) * scale
    if add is not None:
        scores = scores + torch.gather(padded(add.expand(batch + (L, S))), -1, index)
    empty = count == 0
    scores = scores.masked_fill(~valid | empty, -math.inf).masked_fill(empty, 0.0)
    weights = torch.softmax(scores, -1).masked_fill(empty, 0.0)
    return (weights.unsqueeze(-1) * rows(value)).sum(-2)


def _canonical(mask, dtype):
    """nn.MultiheadAttention's masks: boolean ``True`` means *masked out* (``-inf``)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)


def _pad_last(mask):
    if mask is None:
        return None
    return torch.cat([mask, torch.zeros(mask.shape[:-1] + (1,), dtype=mask.dtype,
                                        device=mask.device)], -1)


def _thirds(t):
    """``t.chunk(3)`` as whole slices of ``t.reshape(3, ...)`` (the query, key and value parts
    of a packed projection)."""
    if t is None:
        return None, None, None
    return t.reshape((3, t.shape[0] // 3) + tuple(t.shape[1:])).unbind(0)


def _linear(x, w, b):
    return torch.nn.functional.linear(x, w, b)


@decomposition("multi_head_attention_forward",
               "query key value embed_dim_to_check num_heads in_proj_weight in_proj_bias "
               "bias_k bias_v add_zero_attn dropout_p out_proj_weight out_proj_bias "
               "training=True key_padding_mask=None need_weights=True attn_mask=None "
               "use_separate_proj_weight=False q_proj_weight=None k_proj_weight=None "
               "v_proj_weight=None static_k=None static_v=None average_attn_weights=True "
               "is_causal=False",
               traced="query key value in_proj_weight in_proj_bias bias_k bias_v "
                      "out_proj_weight out_proj_bias key_padding_mask attn_mask q_proj_weight "
                      "k_proj_weight v_proj_weight static_k static_v")
def multi_head_attention_forward(query, key, value, embed_dim_to_check, num_heads,
                                 in_proj_weight, in_proj_bias, bias_k, bias_v, add_zero_attn,
                                 dropout_p, out_proj_weight, out_proj_bias, training,
                                 key_padding_mask, need_weights, attn_mask,
                                 use_separate_proj_weight, q_proj_weight, k_proj_weight,
                                 v_proj_weight, static_k, static_v, average_attn_weights,
                                 is_causal):
    # (torch has already run the call and checked the shapes)
    if training and dropout_p:
        raise UnsupportedOperationError(
            f"{PREFIX}'multi_head_attention_forward' in training mode with dropout={dropout_p} "
            "draws a random mask; call model.eval() to trace it without dropout")
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    L, N, E = query.shape
    H = num_heads
    hd = E // H
    dtype = query.dtype
    key_padding_mask = _canonical(key_padding_mask, dtype)
    causal_sdpa = bool(is_causal and key_padding_mask is None and not need_weights)
    attn_mask = None if causal_sdpa else _canonical(attn_mask, dtype)

    if use_separate_proj_weight:
        b_q, b_k, b_v = _thirds(in_proj_bias)
        q = _linear(query, q_proj_weight, b_q)
        k = _linear(key, k_proj_weight, b_k)
        v = _linear(value, v_proj_weight, b_v)
    else:
        w_q, w_k, w_v = _thirds(in_proj_weight)
        b_q, b_k, b_v = _thirds(in_proj_bias)
        q, k, v = _linear(query, w_q, b_q), _linear(key, w_k, b_k), _linear(value, w_v, b_v)

    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if bias_k is not None and bias_v is not None:
        k = torch.cat([k, bias_k.repeat(1, N, 1)])
        v = torch.cat([v, bias_v.repeat(1, N, 1)])
        attn_mask, key_padding_mask = _pad_last(attn_mask), _pad_last(key_padding_mask)

    q = q.reshape(L, N * H, hd).transpose(0, 1)
    k = k.reshape(k.shape[0], N * H, hd).transpose(0, 1) if static_k is None else static_k
    v = v.reshape(v.shape[0], N * H, hd).transpose(0, 1) if static_v is None else static_v
    if add_zero_attn:
        zeros = torch.zeros((N * H, 1, hd), dtype=k.dtype, device=k.device)
        k = torch.cat([k, zeros], 1)
        v = torch.cat([v, zeros], 1)
        attn_mask, key_padding_mask = _pad_last(attn_mask), _pad_last(key_padding_mask)
    S = k.shape[1]
    if key_padding_mask is not None:
        kpm = key_padding_mask.reshape(N, 1, 1, S).expand(-1, H, -1, -1).reshape(N * H, 1, S)
        attn_mask = kpm if attn_mask is None else attn_mask + kpm

    if need_weights:
        scores = torch.bmm(q * math.sqrt(1.0 / hd), k.transpose(-2, -1))
        if attn_mask is not None:
            scores = scores + attn_mask
        weights = torch.softmax(scores, -1)
        out = torch.bmm(weights, v)
        out = out.transpose(0, 1).reshape(L * N, E)
        out = _linear(out, out_proj_weight, out_proj_bias).reshape(L, N, -1)
        weights = weights.reshape(N, H, L, S)
        if average_attn_weights:
            weights = weights.mean(1)
        if not batched:
            out, weights = out.squeeze(1), weights.squeeze(0)
        return out, weights

    if attn_mask is not None:
        if attn_mask.shape[0] == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.reshape(N, H, -1, S)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(N, H, L, hd), k.reshape(N, H, S, hd), v.reshape(N, H, S, hd), attn_mask,
        0.0, causal_sdpa)
    out = out.permute(2, 0, 1, 3).reshape(N * L, E)
    out = _linear(out, out_proj_weight, out_proj_bias).reshape(L, N, -1)
    if not batched:
        out = out.squeeze(1)
    return out, None
