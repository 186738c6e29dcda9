"""Any other op on a trainable parameter: per-sample gradients by ``vmap`` of the op's ``vjp``.

For an op ``s = op(x, p)`` whose batched tensors have the batch at dim 0 (only there) and whose
output is batch-first, sample ``i``'s gradient is the vjp of ``p -> op(x_i[None], p)`` applied
to ``g_i[None]`` (the sample-independence check has verified that the op treats samples
independently, so running it on one sample gives that sample's rows). ``torch.func.vmap`` runs
it for every sample at once inside the joint graph: ``[B, *p.shape]`` per parameter,
instantiated, so the fallback is only taken where that is small (``MAX_PER_SAMPLE_NUMEL``
elements per sample); larger uses get the unsupported-op error. Norm ``sum_p ||G_i,p||^2``,
clipped sum ``sum_i c_i G_i,p``. ``nn.PReLU`` takes this path; ``nn.Bilinear`` cannot (see
``_NOT_RETRACEABLE``).
"""

from __future__ import annotations

import torch

from fx_bk._torch_internals import is_op_overload, op_schema
from fx_bk.cost_model import plan_instantiated
from fx_bk.site import Site, Strategy, per_sample_numel

from .base import Rule, set_fallback_rule

MAX_PER_SAMPLE_NUMEL = 1 << 20  # 4 MiB of float32 per sample
# ops whose pre-dispatch node cannot be re-run under functionalization in torch 2.13 (an
# internal assert in the fake-tensor dispatch): they keep the unsupported-op error
_NOT_RETRACEABLE = {torch.ops.aten.bilinear.default}


class GenericVjpRule(Rule):
    name = "any other op (fallback)"
    strategies = (f"instantiated by vmap(vjp(op)); per-sample gradient at most "
                  f"{MAX_PER_SAMPLE_NUMEL:,} elements")
    fallback = True

    def takes_param(self, role: str) -> bool:
        return True  # any tensor argument may be a trainable parameter

    def needs_tensor(self, role: str, is_param: bool) -> bool:
        return True  # the op is re-run per sample: every tensor argument, parameters too

    def accepts(self, op) -> bool:
        """Functional aten ops with one tensor output."""
        if not is_op_overload(op) or op.namespace != "aten" or op in _NOT_RETRACEABLE:
            return False
        schema = op_schema(op)
        returns = [r.type for r in schema.returns]
        return (not schema.is_mutable and len(returns) == 1
                and isinstance(returns[0], torch.TensorType))

    def applies(self, site: Site) -> bool:
        """Only ops whose output carries the batch (a view or copy of a parameter does not:
        that use keeps the general unsupported-op error)."""
        out = site.shapes["out"]
        return "B" in out or any(isinstance(d, str) for d in out)

    def layout_problem(self, site: Site) -> str | None:
        """Batched tensors must have the batch at dim 0 only (parameters have no batch)."""
        for role, shape in site.shapes.items():
            if role != "out" and role not in site.tensor_args:
                continue
            batched = "B" in shape or any(isinstance(d, str) for d in shape)
            if batched and (shape[0] != "B" or any(isinstance(d, str) for d in shape[1:])):
                what = "output" if role == "out" else f"argument '{role}'"
                return (f"its {what} has shape {list(shape)} (B = batch size): the fallback "
                        f"rule needs the batch at dim 0 only")
        return None

    def validate(self, site: Site) -> str | None:
        for role, value in site.const_args.items():
            if isinstance(value, (list, tuple)) and any(
                    isinstance(v, torch.fx.Node) for v in value):
                return (f"its argument '{role}' is a list of tensors (the fallback takes single "
                        f"ones)")
        numel = sum(per_sample_numel(site.shapes[r]) for r in site.params)
        if numel > MAX_PER_SAMPLE_NUMEL:
            return (f"no dedicated rule, and the fallback would instantiate {numel:,} gradient "
                    f"elements per sample (limit {MAX_PER_SAMPLE_NUMEL:,})")
        return None

    def plan(self, sites):
        plan_instantiated(sites, Strategy.VMAP_VJP)

    def per_sample_grads(self, value):
        site, tensors = value.site, value.tensors
        roles = list(site.params)
        batched = [r for r in tensors if r not in roles and site.shapes[r][:1] == ("B",)]
        fixed = {r: t for r, t in tensors.items() if r not in roles and r not in batched}

        def per_sample(rows, g_row):
            def op_of_params(*params):
                kwargs = {**site.const_args, **fixed, **dict(zip(roles, params))}
                kwargs.update({r: t.unsqueeze(0) for r, t in zip(batched, rows)})
                return _call(site.op, kwargs)

            _, vjp = torch.func.vjp(op_of_params, *[tensors[r] for r in roles])
            return vjp(g_row.unsqueeze(0))

        grads = torch.func.vmap(per_sample)([tensors[r] for r in batched], value.grad)
        return {site.params[r]: g for r, g in zip(roles, grads)}


def _call(op, kwargs: dict):
    """Call ``op`` with the arguments of its schema, in order (``normalize_function`` names the
    ``self`` argument ``input``, as the Python functions do)."""
    args, kw = [], {}
    for a in op_schema(op).arguments:
        name = "input" if a.name == "self" and "self" not in kwargs else a.name
        if name not in kwargs:
            continue
        if a.kwarg_only:
            kw[a.name] = kwargs[name]
        else:
            args.append(kwargs[name])
    return op(*args, **kw)


GENERIC = set_fallback_rule(GenericVjpRule())
