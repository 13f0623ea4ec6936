"""`F.scaled_dot_product_attention` written out as two matmuls and a softmax, for the exporter.

torch.onnx.export decomposes scaled_dot_product_attention into ops whose output has other
strides than the kernel's had when the model was captured, and a `reshape` after it, already
turned into a `view` for the kernel's strides, then fails: "Cannot view a tensor with shape ...
and strides ..." (pytorch/pytorch#136543, #141107). HuggingFace's T5 and Swin hit it, whose mask
is a learned position bias, and so does any attention written that way. While
`attention_as_math()` is active, every call of the function (from Python code or from a traced
graph) runs its definition in plain ops instead, which export as they are.

`bngraph.export` uses it only after the exporter failed that way, and verifies the file it then
writes against the model as it is, attention kernel and all.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def attention_math(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """softmax(Q K^T * scale + mask) V, as torch documents the function (inference only)."""
    if dropout_p:
        raise ValueError(f"scaled_dot_product_attention with dropout_p={dropout_p} is training, not inference")
    if enable_gqa:  # grouped-query attention: each key/value head serves several query heads
        groups = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(groups, -3), value.repeat_interleave(groups, -3)
    scores = query @ key.transpose(-2, -1) * (1 / math.sqrt(query.shape[-1]) if scale is None else scale)
    if is_causal:
        keep = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return torch.softmax(scores, dim=-1) @ value


class _AttentionAsMath(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return attention_math(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def attention_as_math() -> TorchFunctionMode:
    """For the duration, each call of `F.scaled_dot_product_attention` runs `attention_math`: a
    torch function mode, so that a traced graph's calls, and a name imported from
    torch.nn.functional, are caught as well as `F.scaled_dot_product_attention(...)`."""
    return _AttentionAsMath()
