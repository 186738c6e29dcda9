"""Linear: ``s = a W^T + b``, ``a: [B, *, d]``, ``W: [p, d]``, ``s, g: [B, *, p]``.

All leading non-batch dims fold into T positions: ``a: [B, T, d]``, ``g: [B, T, p]``.

* T = 1:        ``||G_i||^2 = ||a_i||^2 ||g_i||^2``   (G_i = g_i^T a_i is rank one)
* ghost:        ``||G_i||^2 = sum(a_i a_i^T * g_i g_i^T)``, by ``fx_bk::ghost_norm`` over block
                pairs k <= l of the symmetric Gram matrices: cost ~T^2 (d + p) / 2,
                memory B T block (``fx_bk/kernels/ghost_norm.py``; Triton on CUDA)
* instantiate:  ``G_i = g_i^T a_i``, ``||G_i||^2 = sum G_i^2``  cost T p d,   memory B p d
* clipped:      ``sum_i c_i G_i = (c g)^T a = g^T (c a)`` (one GEMM, the smaller of ``a`` and ``g``
                scaled: for an LM head ``a`` has d columns, ``g`` V; the opaque op
                ``fx_bk::clipped_gemm``, ``fx_bk/kernels/clipped_gemm.py``, in the graph at
                T = 1; ``einsum(c, G)`` when instantiated). Under autocast too the GEMM reads
                the float32 copies the norms read (NOTE [clipped GEMM dtype])
* bias:         ``b_i = sum_t g_it``,  clipped ``c @ b``.

The strategy is chosen per site from its static shapes by the time model of
``fx_bk/cost_model.py`` (multiply-adds, plus a calibrated charge per instantiated gradient
element); ``site.cost`` reports the chosen strategy's multiply-adds. The
same weight used at several sites (a module called twice) is one per-sample gradient: the sites'
positions are concatenated along T, which gives the exact norm including the cross terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fx_bk.cost_model import gemm_plan, positions
from fx_bk.kernels.clipped_gemm import clipped_gemm
from fx_bk.kernels.ghost_norm import gemm_norm_by_length, ghost_norm
from fx_bk.site import SiteValues, Strategy, is_dynamic

from .base import (
    Rule,
    accumulation_dtype,
    register_rule,
    scale_smaller,
    weighted_sum,
)
from .pool import instantiated_norm, instantiated_sum

aten = torch.ops.aten


@dataclass
class LinearState:
    """What a Linear bundle's clipped sum needs (also read by the tie handler)."""

    a: torch.Tensor  # [B, T, d] activations, every site's positions concatenated
    g: torch.Tensor  # [B, T, p] output gradients
    per_sample_weight: torch.Tensor | None = None  # [B, p, d] when instantiated
    bias: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B, p]


def batch_first(t: torch.Tensor, value: SiteValues) -> torch.Tensor:
    """A site tensor (batch-first: ``site_values`` unfolded any other layout) as
    ``[B, T, last]``."""
    return t.reshape(value.batch, -1, t.shape[-1])


# NOTE [clipped GEMM dtype]: under autocast a ghost site's clipped sum is not AMP's bf16
# weight-gradient GEMM. Its norm is computed from the float32 values of ``a`` and ``g``, but a
# bf16 GEMM would read ``c g`` rounded to bf16 and round the sum to bf16: with positions whose
# terms ``g_t a_t^T`` nearly cancel, the rounding errors (2^-9 of each term) are not small
# against ``G_i``, and one sample's clipped contribution measured 4.2 R (T = 2; ``a`` near 1.7,
# ``g`` near 500, ``||G_i|| = 1.03``; tests/test_mixed_precision.py). In float32 the same
# construction needs terms 2^15 times larger. Instantiated per-sample gradients may come from
# narrower operands (convolutions do): their norm and their sum read the same widened values.


@register_rule(aten.linear.default)
class LinearRule(Rule):
    name = "linear"
    transposed_weight = False  # W: [p, d]; the matmul rule's W is [d, p]
    folds_batch = True
    param_args = ("weight", "bias")
    strategies = ("rank-one (T=1), ghost or instantiated, by the cost model per site (per "
                  "call when T varies); bias instantiated")
    tensor_args = ("input",)

    def can_merge(self, sites) -> bool:
        weights = {s.params.get("weight") for s in sites}
        return len(weights) == 1

    def plan(self, sites) -> None:
        p, d = sites[0].shapes["out"][-1], sites[0].shapes["input"][-1]
        t = sum(positions(s.shapes["input"]) for s in sites)
        threshold = 0
        if "weight" not in sites[0].params:
            strategy, cost = Strategy.BIAS_ONLY, t * p
        else:
            dynamic = any(is_dynamic(s.shapes["input"][1:-1]) for s in sites)
            strategy, cost, threshold = gemm_plan(t, d, p, dynamic=dynamic)
        for s in sites:
            s.strategy, s.cost, s.max_ghost_positions = strategy, cost, threshold

    @staticmethod
    def _flat(values: list[SiteValues]):
        """Concatenate every site's positions: a [B, T, d], g [B, T, p] (also from [B*T, d])."""
        a = [batch_first(v.tensors["input"], v) for v in values]
        g = [batch_first(v.grad, v) for v in values]
        if len(values) == 1:
            return a[0], g[0]
        return torch.cat(a, 1), torch.cat(g, 1)

    def norm_sq(self, values):
        a, g = self._flat(values)
        strategy = values[0].site.strategy
        acc = accumulation_dtype(g)
        state = LinearState(a, g, bias=self._bias_grads(values))
        if strategy == Strategy.RANK_ONE:
            # one site, one position: a bias's gradient is g itself, so the squared norm is
            # (||a||^2 + 1) ||g||^2, one reduction of g (a second one, for the bias alone, made
            # Inductor's code generation for the benchmark MLP's backward 0.2 s longer)
            a_sq = a.to(acc).pow(2).sum((1, 2))
            return (a_sq + 1 if state.bias else a_sq) * g.to(acc).pow(2).sum((1, 2)), state
        norm = torch.zeros((), dtype=acc, device=g.device)  # BIAS_ONLY: the bias terms alone
        if strategy == Strategy.GHOST:
            norm = ghost_norm(a.detach(), g.detach()).to(acc)
        elif strategy == Strategy.INSTANTIATE:
            state.per_sample_weight = self._per_sample_weight(a, g)  # [B, p, d]
            norm = instantiated_norm(state.per_sample_weight)
        elif strategy == Strategy.BY_LENGTH:
            threshold = values[0].site.max_ghost_positions  # ghost or instantiated, per call
            norm = gemm_norm_by_length(a.detach(), g.detach(), threshold).to(acc)
        for bg in state.bias.values():
            norm = norm + instantiated_norm(bg)
        return norm, state

    @staticmethod
    def _bias_grads(values) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for v in values:
            name = v.site.params.get("bias")
            if name is None:
                continue
            b = batch_first(v.grad, v).sum(1)  # [B, p]
            out[name] = out[name] + b if name in out else b
        return out

    def clipped_grads(self, values, state: LinearState, c):
        # at one position per sample (rank-one) the bias gradient is g itself: its norm is the
        # weight norm's factor already and its sum fuses into g's kernel; pooled, it would be
        # copied (fx_bk/rules/pool.py)
        rank_one = values[0].site.strategy == Strategy.RANK_ONE
        bias_sum = weighted_sum if rank_one else instantiated_sum
        grads = {name: bias_sum(c, b) for name, b in state.bias.items()}
        weight = values[0].site.params.get("weight")
        if weight is None:
            return grads
        if state.per_sample_weight is not None:
            grads[weight] = instantiated_sum(c, state.per_sample_weight)
        else:  # float32 at least, under autocast too (NOTE [clipped GEMM dtype])
            if rank_one:
                w = self._clipped_rows(state.a, state.g, c)
            else:  # (c g)^T a = g^T (c a)
                w = clipped_gemm(state.a, state.g, c, self.transposed_weight)
            grads[weight] = w
        return grads

    def _clipped_rows(self, a, g, c):
        """The clipped GEMM of a site with one position per sample (``a: [B, 1, d]``), in the
        graph: Inductor fuses the scaling into the kernel that produces ``g`` (the opaque
        ``fx_bk::clipped_gemm`` measured 1.01-1.16x the step time on the benchmark MLP)."""
        a, g = scale_smaller(a, g, c)  # (c g)^T a = g^T (c a)
        a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])  # [B, d], [B, p]
        return a.t() @ g if self.transposed_weight else g.t() @ a

    def _per_sample_weight(self, a, g):
        """``G_i = g_i^T a_i``: [B, p, d] (or ``a_i^T g_i``: [B, d, p] for ``x @ W``)."""
        if self.transposed_weight:
            return torch.bmm(a.transpose(1, 2), g)
        return torch.bmm(g.transpose(1, 2), a)

    def per_sample_grads(self, value):
        a, g = self._flat([value])
        out = dict(self._bias_grads([value]))
        if "weight" in value.site.params:
            out[value.site.params["weight"]] = self._per_sample_weight(a, g)
        return out


@register_rule(aten.addmm.default, aten.mm.default, aten.matmul.default)
class MatmulRule(LinearRule):
    """A bare parameter as the right operand: ``x @ W``, ``mm(x, W)``, ``addmm(b, x, W)``
    (Hugging Face ``Conv1D``), ``W: [d, p]``: the Linear formulas with ``G_i = a_i^T g_i``."""

    name = "matmul"
    transposed_weight = True
    strategies = "as linear, for `x @ W` with the parameter on the right (HF Conv1D)"
    _ROLES = {
        aten.addmm.default: {"input": "bias", "mat1": "input", "mat2": "weight"},
        aten.mm.default: {"mat2": "weight"},
        aten.matmul.default: {"other": "weight"},
    }

    def roles(self, op):
        return self._ROLES[op]

    def validate(self, site):
        if len(site.shapes.get("weight", (0, 0))) != 2:
            return "only a 2-D parameter on the right of a matmul is supported"
        if site.const_args.get("beta", 1) != 1 or site.const_args.get("alpha", 1) != 1:
            return "addmm with beta or alpha other than 1 is not supported"
        return None
