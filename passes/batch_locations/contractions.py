"""Matrix products, written as einsums over their operands' dims."""

from __future__ import annotations

from dataclasses import replace

from .lattice import SHARED, Sample, Shared, UnknownForm, first_tensor, mixed


def einsum_like(spec):
    """Ops written as an einsum over their operands' dims (``spec(args, shapes)`` -> operand
    letter strings and the output's): a batch letter summed over, or two operands batched on
    different letters, mixes samples."""

    def rule(node, args, loc, ctx):
        operands, in_specs, out_spec = spec(args, ctx)
        letter = found = None
        iota = True
        for t, s in zip(operands, in_specs):
            lt = loc(t)
            if isinstance(lt, Shared):
                if lt.batchy:
                    return mixed(node, "multiplies samples' values with a value that depends on "
                                       "the batch size or positions")
                continue
            if not isinstance(lt, Sample):
                return lt
            here = s[lt.dim]
            if letter is not None and (here != letter or found.layout != lt.layout):
                return mixed(node, "multiplies values of different samples together")
            letter, found, iota = here, lt, iota and lt.iota
        if letter is None:
            return SHARED
        if letter not in out_spec:
            return mixed(node, "sums over the batch dimension (a contraction over samples)")
        return replace(found, dim=out_spec.index(letter), iota=iota)

    return rule


def letters(n: int, offset: int = 0) -> str:
    return "".join(chr(ord("A") + offset + i) for i in range(n))


def matmul_spec(args, ctx):
    a, b = first_tensor(args), args.get("other", args.get("mat2"))
    sa, sb = ctx.shape(a), ctx.shape(b)
    na, nb = len(sa), len(sb)
    if na == 1 and nb == 1:
        return [a, b], ["k", "k"], ""
    if na == 1:
        lead = letters(nb - 2)
        return [a, b], ["k", lead + "kn"], lead + "n"
    if nb == 1:
        lead = letters(na - 2)
        return [a, b], [lead + "mk", "k"], lead + "m"
    nl = max(na, nb) - 2
    lead = letters(nl)
    return [a, b], [lead[nl - (na - 2):] + "mk", lead[nl - (nb - 2):] + "kn"], lead + "mn"


def linear_spec(args, ctx):
    x, w, b = args["input"], args["weight"], args.get("bias")
    lead = letters(len(ctx.shape(x)) - 1)
    ops, specs = [x, w], [lead + "k", "nk"]
    if b is not None:
        ops.append(b)
        specs.append("n")
    return ops, specs, lead + "n"


def addmm_spec(args, ctx):
    bias, a, b = first_tensor(args), args["mat1"], args["mat2"]
    nb = len(ctx.shape(bias))
    return [bias, a, b], ["mn"[2 - nb:], "mk", "kn"], "mn"


def baddbmm_spec(args, ctx):
    bias, a, b = first_tensor(args), args["batch1"], args["batch2"]
    nb = len(ctx.shape(bias))
    return [bias, a, b], ["bmn"[3 - nb:], "bmk", "bkn"], "bmn"


def einsum_spec(args, ctx):
    eq = args["equation"].replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    ins = lhs.split(",")
    if "." in eq or not rhs:
        raise UnknownForm
    return list(args["tensors"]), ins, rhs
