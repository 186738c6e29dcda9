"""Embedding: ``s = W[x]``, ``W: [V, d]``, ``x: [B, *]`` (T positions), ``g: [B, *, d]``.

* norm (ghost):  ``||G_i||^2 = sum_{t,t'} [x_t = x_t'] <g_t, g_t'>`` over positions that are not
  ``padding_idx`` (their gradient is zero in PyTorch; Opacus counts them)   cost T^2 d, memory B T^2
                 (a sample whose same-token gradients cancel gets its rounding bound,
                 ``fx_bk/kernels/rounding_bound.py``)
* clipped:       ``c_i g_it`` summed into row ``x_it`` by the embedding's own backward kernel
                 (``fx_bk::embedding_weight_grad``; never a B T V one-hot)
* per sample:    ``[B, V, d]`` via one ``index_add`` (only for parameters shared across rules).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fx_bk.cost_model import embedding_cost
from fx_bk.kernels.embedding_grad import embedding_weight_grad
from fx_bk.kernels.rounding_bound import guard_norm_sq
from fx_bk.site import Strategy

from .base import Rule, accumulation_dtype, register_rule, scale_samples, sum_pairs

aten = torch.ops.aten


@dataclass
class EmbeddingState:
    """What the embedding's clipped sum needs (also read by the tie handler)."""

    indices: torch.Tensor  # [B, T] looked-up rows
    grad: torch.Tensor  # [B, T, d] output gradients, padding rows zeroed
    bound: torch.Tensor  # [B] S = sum_t ||g_t|| (one-hot rows: ||a_t|| = 1), rounding_bound.py


@register_rule(aten.embedding.default)
class EmbeddingRule(Rule):
    name = "embedding"
    param_args = ("weight",)
    strategies = "ghost over positions, `padding_idx` excluded; no one-hot"
    tensor_args = ("indices",)

    folds_batch = True  # every index is a row

    def row_role(self, site):
        return "indices"

    def core_dims(self, site):
        return 0

    def validate(self, site):
        if site.const_args.get("sparse"):
            return "sparse=True is not supported; use nn.Embedding(..., sparse=False)"
        if site.const_args.get("scale_grad_by_freq"):
            return (
                "scale_grad_by_freq=True scales each sample's gradient by token counts over the "
                "whole batch, which mixes samples; use scale_grad_by_freq=False"
            )
        return None

    def plan(self, sites):
        (s,) = sites
        t = 1
        for n in s.shapes["indices"][1:]:
            t *= n
        s.strategy, s.cost = Strategy.GHOST, embedding_cost(t, s.shapes["out"][-1])

    @staticmethod
    def _flat(value):
        x = value.tensors["indices"]
        g = value.grad
        x = x.reshape(x.shape[0], -1)  # [B, T]
        g = g.reshape(g.shape[0], -1, g.shape[-1])  # [B, T, d]
        pad = value.site.const_args.get("padding_idx", -1)
        if pad is not None and pad >= 0:
            g = g * (x != pad).unsqueeze(-1).to(g.dtype)  # padding rows get no gradient
        return x, g

    def norm_sq(self, values):
        (value,) = values
        x, g = self._flat(value)
        acc = accumulation_dtype(g)
        same = (x.unsqueeze(2) == x.unsqueeze(1)).to(acc)  # [B, T, T]
        gg = torch.bmm(g, g.transpose(1, 2)).to(acc)  # [B, T, T]
        bound = torch.linalg.vector_norm(g.to(acc), dim=-1).sum(1)  # ||a_t|| = 1 (one-hot)
        norm_sq = guard_norm_sq(sum_pairs(same * gg), bound, g.dtype, g.shape[-1] + g.shape[1])
        return norm_sq, EmbeddingState(x, g, bound)

    def clipped_grads(self, values, state: EmbeddingState, c):
        x, g = state.indices, state.grad
        name = values[0].site.params["weight"]
        vocab = values[0].site.shapes["weight"][0]
        cg = scale_samples(c, g).reshape(-1, g.shape[-1])  # [B*T, d]
        return {name: embedding_weight_grad(cg, x.reshape(-1), vocab)}

    def per_sample_grads(self, value):
        x, g = self._flat(value)
        b, vocab = x.shape[0], value.site.shapes["weight"][0]
        rows = (torch.arange(b, device=x.device).unsqueeze(1) * vocab + x).reshape(-1)
        out = torch.zeros(b * vocab, g.shape[-1], dtype=g.dtype, device=g.device)
        out = out.index_add(0, rows, g.reshape(-1, g.shape[-1]))
        return {value.site.params["weight"]: out.view(b, vocab, g.shape[-1])}
