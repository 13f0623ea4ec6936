"""Attention with a learned position bias (T5's, Swin's) exports: torch's own decomposition of
scaled_dot_product_attention breaks the export, and bngraph exports it written out instead."""

from __future__ import annotations

import itertools

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bngraph.attention_math import attention_as_math, attention_math
from bngraph.export import export


class RelativeBiasAttention(nn.Module):
    """Self-attention in T5's style: a learned bias per head and relative position, added to the
    scores as SDPA's float mask, and the heads merged with a reshape after the kernel."""

    def __init__(self, dim=16, heads=2, max_distance=8):
        super().__init__()
        self.heads, self.max_distance = heads, max_distance
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.relative_attention_bias = nn.Embedding(2 * max_distance + 1, heads)

    def forward(self, hidden_states):
        b, t, c = hidden_states.shape
        split = lambda x: x.view(b, t, self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        positions = torch.arange(t, device=hidden_states.device)
        relative = (positions[None, :] - positions[:, None]).clamp(-self.max_distance, self.max_distance)
        position_bias = self.relative_attention_bias(relative + self.max_distance).permute(2, 0, 1).unsqueeze(0)
        attn_output = F.scaled_dot_product_attention(
            split(self.q(hidden_states)), split(self.k(hidden_states)), split(self.v(hidden_states)),
            attn_mask=position_bias,
        )
        return self.o(attn_output.transpose(1, 2).reshape(b, t, c))


def test_attention_with_a_learned_position_bias_exports_written_out_and_verifies(tmp_path):
    torch.manual_seed(0)
    model = RelativeBiasAttention().eval()
    x = torch.randn(3, 6, 16)
    with pytest.raises(Exception, match="Cannot view a tensor"):  # torch's bug, without bngraph's way round it
        torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    result = export(model, [x], tmp_path / "attention.onnx")
    assert result, result.verification.worst.line()  # verified against the model with torch's kernel
    assert any("scaled_dot_product_attention written as matmuls and a softmax" in n for n in result.report.notes)
    ops = {n.op_type for n in onnx.load(result.path).graph.node}
    assert {"MatMul", "Softmax"} <= ops


def test_a_model_that_exports_as_it_is_is_not_written_out(tmp_path):
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
            return F.scaled_dot_product_attention(q, k, v).squeeze(1)

    result = export(Plain().eval(), [torch.randn(2, 5, 8)], tmp_path / "plain.onnx")
    assert result
    assert not any("written as matmuls" in n for n in result.report.notes)


@pytest.mark.parametrize(
    "mask, is_causal, scale, gqa",
    [(m, c, s, g) for m, c, s, g in itertools.product([None, "bool", "float"], [False, True], [None, 0.3], [False, True])
     if not (m and c)],  # the kernel takes a mask or is_causal, not both
)
def test_written_out_attention_computes_what_the_kernel_does(mask, is_causal, scale, gqa):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 5, 8, generator=gen)
    k, v = (torch.randn(2, 2 if gqa else 4, 7 if not is_causal else 5, 8, generator=gen) for _ in range(2))
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.rand(5, k.shape[-2], generator=gen) > 0.3
        attn_mask[:, 0] = True  # no row fully masked: the kernel's NaN-or-zero there is its own choice
    elif mask == "float":
        attn_mask = torch.randn(1, 4, 5, k.shape[-2], generator=gen)
    kwargs = dict(attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    want = F.scaled_dot_product_attention(q, k, v, **kwargs)
    with attention_as_math():
        got = F.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_written_out_attention_refuses_dropout():
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError, match="dropout_p=0.1 is training"):
        attention_math(q, q, q, dropout_p=0.1)
