"""Tied input/output embeddings: one weight ``W: [V, d]`` used by an embedding site (rows
``x_t`` looked up, output grads ``e_t``) and linear sites (``W`` as the output projection,
activations ``a_s``, logit grads ``l_s``; GPT-2's ``wte`` / ``lm_head``).

The per-sample gradient is ``E_i + L_i``; its norm ``||E||^2 + ||L||^2 + 2<E, L>`` takes each
rule's own norm plus the cross term, with no ``[B, V, d]`` tensor:

    <E_i, L_i> = sum_{t,s} l_s[x_t] * <e_t, a_s>      cost T T' d  (+ a gather of T T' logits)

(padding positions have ``e_t = 0``); the sum goes through ``rounding_bound.guard_norm_sq``
with ``S = sum_t ||e_t|| + sum_s ||a_s|| ||l_s||``. The clipped gradient is the sum of both rules'
clipped gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fx_bk.cost_model import positions, tie_cross_cost
from fx_bk.kernels.rounding_bound import guard_norm_sq, position_bound
from fx_bk.site import Site

from .base import accumulation_dtype, register_tie_handler, sum_pairs
from .embedding import EmbeddingRule, EmbeddingState
from .linear import LinearRule, LinearState


@dataclass
class TieState:
    embedding: EmbeddingState
    linear: LinearState


def _is_embedding(site: Site) -> bool:
    return isinstance(site.rule, EmbeddingRule)


def _is_output_projection(site: Site) -> bool:
    """A Linear site with ``W: [V, d]`` (``x @ W`` of the matmul rule has ``W: [d, p]``)."""
    return isinstance(site.rule, LinearRule) and not site.rule.transposed_weight


class EmbeddingLinearTie:
    """Bundle handler: one embedding site and Linear sites on the same ``[V, d]`` weight."""

    label = "tie cross term"

    @staticmethod
    def _split(items, site_of=lambda s: s):
        emb = [i for i in items if _is_embedding(site_of(i))]
        lin = [i for i in items if _is_output_projection(site_of(i))]
        return emb, lin

    def matches(self, sites: list[Site]) -> bool:
        emb, lin = self._split(sites)
        if len(emb) != 1 or not lin or len(emb) + len(lin) != len(sites):
            return False
        weight = emb[0].params.get("weight")
        return all(s.params.get("weight") == weight for s in lin) and lin[0].rule.can_merge(lin)

    def plan(self, sites: list[Site]) -> None:
        emb, lin = self._split(sites)
        emb[0].rule.plan(emb)
        lin[0].rule.plan(lin)
        t_emb = math.prod(emb[0].shapes["indices"][1:])
        t_lin = sum(positions(s.shapes["input"]) for s in lin)
        cross = tie_cross_cost(t_emb, t_lin, emb[0].shapes["out"][-1])
        for s in sites:  # the rules read s.strategy: the tie is noted beside it
            s.bundle_note = self.label
            s.cost += cross

    def norm_sq(self, values):
        (emb,), lin = self._split(values, lambda v: v.site)
        n_emb, st_emb = emb.site.rule.norm_sq([emb])
        n_lin, st_lin = lin[0].site.rule.norm_sq(lin)
        x, e = st_emb.indices, st_emb.grad  # [B, T], [B, T, d] (padding rows zeroed)
        a, logits_grad = st_lin.a, st_lin.g  # [B, T', d], [B, T', V]
        acc = accumulation_dtype(e)
        inner = torch.bmm(e, a.transpose(1, 2)).to(acc)  # [B, T, T']: <e_t, a_s>
        rows = x.unsqueeze(-1).expand(-1, -1, a.shape[1])  # [B, T, T']
        picked = torch.gather(logits_grad.transpose(1, 2), 1, rows).to(acc)  # l_s[x_t]
        cross = sum_pairs(inner * picked)
        # the cross term can cancel the two norms: the guard on the whole, with S of both
        bound = st_emb.bound + position_bound(a, logits_grad, acc)
        length = e.shape[-1] + e.shape[1] + a.shape[1]
        total = guard_norm_sq(n_emb + n_lin + 2 * cross, bound, e.dtype, length)
        return total, TieState(st_emb, st_lin)

    def clipped_grads(self, values, state: TieState, c):
        (emb,), lin = self._split(values, lambda v: v.site)
        grads = emb.site.rule.clipped_grads([emb], state.embedding, c)
        for name, g in lin[0].site.rule.clipped_grads(lin, state.linear, c).items():
            grads[name] = grads[name] + g if name in grads else g
        return grads


register_tie_handler(EmbeddingLinearTie())
