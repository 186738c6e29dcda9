"""Arithmetic floor per model: counted FLOPs of one fx_bk step over those of the non-private step.

Both are counted by ``FlopCounterMode`` (forward + loss + backward, eager, on copies of the same
model; the fx_bk module is called once to trace it, then counted): ``floor = bk / base``. The
counter sees matmul-like ops, convolutions (grouped weight gradients corrected here), attention
(CPU's flash SDPA through formulas added here) and ``fx_bk::ghost_norm`` (through the formula
registered next to it), not elementwise ops or reductions. Counted, not estimated from the
rules' costs: the GEMMs that take the place of the non-private weight-gradient GEMM
(instantiate's per-sample GEMMs, ghost / rank-one's clipped ``(C g)^T a``) are not counted on
top of it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import fx_bk
import fx_bk.kernels.ghost_norm  # noqa: F401 - registers the FlopCounterMode formula of the op
from benchmarks.bench_models import BenchModel


def flop_counter():
    """``FlopCounterMode`` with two gaps of torch 2.13's formulas filled: CPU's flash SDPA and its
    backward count as the CUDA kernels do (every T x T score, causal or not; without them
    attention counts 0 on CPU, in both steps, which raises the floor), and
    ``convolution_backward``'s weight gradient is divided by ``groups`` (upstream counts a
    grouped one as if every input channel met every output channel: ``groups`` times too
    much, as in a per-sample conv gradient with the batch folded into groups)."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten

    def sdpa(q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(q, k, v)

    def sdpa_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, q, k, v)

    def conv_backward(grad_out, x, w, bias, stride, padding, dilation, transposed,
                      output_padding, groups, output_mask, out_shape=None, **kwargs):
        def t(shape):  # swap the batch and channel dims
            return [shape[1], shape[0], *shape[2:]]

        flops = 0
        if output_mask[0]:  # grad_input: conv_transpose(grad_out, w), per group already
            flops += fc.conv_flop_count(grad_out, w, out_shape[0], not transposed)
        if output_mask[1]:  # grad_weight: conv(x^T, grad_out^T) (transposed: swapped)
            inp, wt = (grad_out, x) if transposed else (x, grad_out)
            flops += fc.conv_flop_count(t(inp), t(wt), t(out_shape[1])) // groups
        return flops

    mapping = {op: f for op, f in {aten._scaled_dot_product_flash_attention_for_cpu: sdpa,
                                   aten._scaled_dot_product_flash_attention_for_cpu_backward:
                                   sdpa_backward}.items() if op not in fc.flop_registry}
    mapping[aten.convolution_backward] = conv_backward
    return fc.FlopCounterMode(display=False, custom_mapping=mapping)


def step_flops(bm: BenchModel, model: nn.Module, x, y) -> int:
    """FLOPs of ``model``'s forward + loss + backward, eager (``flop_counter``: matmul-like ops,
    SDPA, convolutions and ``fx_bk::ghost_norm``; elementwise ops and reductions are free)."""
    with flop_counter() as counter:
        bm.per_sample_loss(model(x), y).mean().backward()
    return int(counter.get_total_flops())


def measure_floor(bm: BenchModel, base: nn.Module, x, y, max_grad_norm: float) -> dict:
    """Counted FLOPs of one fx_bk step over those of the non-private step, both eager on copies
    of ``base``: ``floor = bk_flops / base_flops``. The BK graphs are traced by a first call, the
    second is counted. ``rules``: the per-sample rules fx_bk chose (information only)."""
    base_f = step_flops(bm, copy.deepcopy(base), x, y)
    bk = fx_bk.transform(copy.deepcopy(base), max_grad_norm=max_grad_norm)
    bm.per_sample_loss(bk(x), y).mean().backward()  # builds the programs
    bk.zero_grad(set_to_none=True)
    bk_f = step_flops(bm, bk, x, y)
    return {"base_flops": base_f, "bk_flops": bk_f, "extra_flops": bk_f - base_f,
            "floor": bk_f / base_f, "rules": rule_detail(bk)}


def rule_detail(bk) -> list[dict]:
    """Sites per chosen rule/strategy and their summed ``site.cost`` (MACs per sample of the
    rule's estimate: the norm, and for instantiate the per-sample gradients)."""
    if bk is None or not bk.programs:
        return []
    detail: dict[str, dict] = {}
    for s in bk.programs[-1].prog.sites:
        d = detail.setdefault(f"{s.rule.name}/{s.strategy}", {"sites": 0, "macs_per_sample": 0})
        d["sites"] += 1
        d["macs_per_sample"] += int(s.cost)
    return [{"rule": k, **v} for k, v in sorted(detail.items())]
