"""The op table: which rule gives each op's batch location, and ``transfer``."""

from __future__ import annotations

import operator

import torch

from fx_bk._torch_internals import is_op_overload, normalize_call

from .contractions import (
    addmm_spec,
    baddbmm_spec,
    einsum_like,
    einsum_spec,
    linear_spec,
    matmul_spec,
)
from .elementwise import arange, creation, pointwise
from .lattice import PROBE, Loss, Mixed, Sample, Shared, UnknownForm, arg_values, mixed
from .layers import batch_first, batch_norm, embedding, leading_batch
from .layout import (
    cat,
    expand,
    getitem,
    index,
    index_dim,
    permute,
    repeat,
    reshape,
    split,
    unsqueeze,
)
from .losses import loss_op, on_loss
from .reductions import along, reduction

aten = torch.ops.aten


def transfer(node, loc, ctx):
    """The location of ``node``'s value, ``PROBE`` when the op is not in this table."""
    target = node.target
    if target is operator.getitem:
        return getitem(node, {}, loc, ctx)
    inputs = [loc(a) for a in node.all_input_nodes]
    first_mixed = next((v for v in inputs if isinstance(v, Mixed)), None)
    if first_mixed is not None:
        return first_mixed
    batchy = any(isinstance(v, Shared) and v.batchy for v in inputs)
    if not isinstance(node.meta.get("val"), (torch.Tensor, tuple, list)):  # a size, a number
        loss = next((v for v in inputs if isinstance(v, Loss)), None)
        return loss if loss is not None else Shared(batchy or ctx.batch_valued(node))
    if not is_op_overload(target):  # a Python callable computing tensors: never assumed
        if any(isinstance(v, Loss) for v in inputs):
            return mixed(node, "uses the loss in a call fx_bk cannot follow")
        return PROBE if any(isinstance(v, Sample) for v in inputs) else Shared(batchy)
    args = normalize_call(target, node.args, node.kwargs)
    if not args and (node.args or node.kwargs):
        return PROBE
    if any(isinstance(v, Loss) for v in inputs):
        return on_loss(node, args, loc, ctx)
    rule = RULES.get(target) or RULES.get(target.overloadpacket)
    if rule is None:
        if torch.Tag.pointwise in target.tags:
            return pointwise(node, args, loc, ctx)
        if not any(isinstance(v, Sample) for v in inputs):  # no sample data reaches it
            return Shared(batchy or any(ctx.batch_valued(v) for v in arg_values(args)))
        return PROBE
    try:
        return rule(node, args, loc, ctx)
    except UnknownForm:
        return PROBE


_ELEMENTWISE = ["clone", "contiguous", "alias", "detach", "to", "_to_copy", "dropout",
             "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "lift_fresh_copy",
             "type_as", "masked_fill", "fill", "gelu", "silu", "relu",
             "hardtanh", "leaky_relu", "elu", "softplus", "mish", "hardswish", "hardsigmoid",
             "sigmoid", "tanh", "logit", "clamp", "clamp_min", "clamp_max", "__and__", "__or__",
             "__xor__", "where", "rsub", "copy", "lerp", "addcmul", "addcdiv", "bitwise_not"]
_CREATION = ["ones", "zeros", "full", "empty", "scalar_tensor", "new_ones", "new_zeros",
             "new_full", "new_empty", "ones_like", "zeros_like", "full_like", "empty_like",
             "rand_like", "randn_like", "randint_like", "tensor", "lift_fresh", "empty_strided",
             "new_empty_strided", "eye", "sym_size", "sym_numel", "sym_stride"]
RULES: dict = {}
for _name in _ELEMENTWISE:
    RULES[getattr(aten, _name)] = pointwise
RULES[aten.native_dropout] = lambda n, a, loc, c: [loc(a["input"])] * 2
for _name in _CREATION:
    RULES[getattr(aten, _name)] = creation
RULES[aten.arange] = arange
for _name in ("sum", "mean", "amax", "amin", "prod", "logsumexp", "any", "all", "argmax",
              "argmin", "count_nonzero", "norm", "linalg_vector_norm", "nansum"):
    RULES[getattr(aten, _name)] = reduction()
for _name in ("var", "std"):
    RULES[getattr(aten, _name)] = reduction()
RULES[aten.var_mean] = lambda n, a, loc, c: [reduction()(n, a, loc, c)] * 2
RULES[aten.max.dim] = RULES[aten.min.dim] = lambda n, a, loc, c: [reduction()(n, a, loc, c)] * 2
for _name in ("_softmax", "softmax", "_log_softmax", "log_softmax", "cumsum", "cumprod",
              "logcumsumexp"):
    RULES[getattr(aten, _name)] = along()
RULES[aten.diff] = RULES[aten.glu] = along(default=-1)
RULES[aten.sort] = along(multi=True, default=-1)
RULES[aten.topk] = along(multi=True, default=-1)
RULES[aten.flip] = along("dims")
RULES[aten.roll] = along("dims")
RULES[aten.cat] = RULES[aten.stack] = cat
for _name in ("view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze",
              "view_as", "reshape_as"):
    RULES[getattr(aten, _name)] = reshape
RULES[aten.permute] = RULES[aten.transpose] = RULES[aten.t] = permute
RULES[aten.select] = RULES[aten.slice] = RULES[aten.narrow] = index_dim
RULES[aten.unsqueeze] = unsqueeze
RULES[aten.expand] = RULES[aten.expand_as] = expand
RULES[aten.repeat] = repeat
RULES[aten.split] = RULES[aten.split_with_sizes] = RULES[aten.chunk] = split
RULES[aten.unbind] = split
for _packet, _spec in ((aten.matmul, matmul_spec), (aten.mm, matmul_spec),
                       (aten.bmm, matmul_spec), (aten.linear, linear_spec),
                       (aten.addmm, addmm_spec), (aten.baddbmm, baddbmm_spec),
                       (aten.einsum, einsum_spec)):
    RULES[_packet] = einsum_like(_spec)
for _name in ("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d",
              "conv_transpose2d", "conv_transpose3d", "_convolution"):
    RULES[getattr(aten, _name)] = batch_first("input", "weight", "bias")
RULES[aten.group_norm] = batch_first("input", "weight", "bias")
RULES[aten.instance_norm] = batch_first("input", "weight", "bias", "running_mean",
                                        "running_var")
RULES[aten.prelu] = batch_first("input", "weight")
RULES[aten.batch_norm] = batch_norm
RULES[aten.layer_norm] = RULES[aten.rms_norm] = leading_batch
RULES[aten.scaled_dot_product_attention] = leading_batch
RULES[aten.embedding] = embedding
RULES[aten.index.Tensor] = index
for _name in ("cross_entropy_loss", "nll_loss", "nll_loss_nd", "nll_loss2d", "mse_loss",
              "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy",
              "binary_cross_entropy_with_logits", "kl_div", "soft_margin_loss"):
    RULES[getattr(aten, _name)] = loss_op
