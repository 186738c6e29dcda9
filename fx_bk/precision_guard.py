"""fx_bk's norms and clipped sums need IEEE float32 GEMMs and convolutions.

A sample's clipped contribution is bounded by ``max_grad_norm`` only if the clipped sum rounds
as float32 does: its error is ``K u S_i`` with ``S_i = sum_t ||a_t|| ||g_t||`` (see
``fx_bk/kernels/rounding_bound.py``), small against ``||G_i||`` for float32's ``u = 2^-24``. Under
reduced float32 precision the same GEMMs round with TF32's ``u = 2^-11`` or bf16's ``2^-8``,
and the guard's bound, made for float32, no longer holds: a sample whose positions' terms partly
cancel (``S_i / ||G_i||`` of 30, below what the guard flags) may exceed R by ``K u S_i``, a
quarter of R under TF32 with the guard's ``K = 16``; the guard's cancelling test samples add
4.6 R through bf16 matmuls on a CPU (tests/test_precision_guard.py) and more than 1.2 R through
TF32 on an H200 (tests/test_cuda.py). Global settings select that precision for every float32
op of a backend, fx_bk's included:

* CUDA matmuls: ``torch.set_float32_matmul_precision("high")`` / ``"medium"``,
  ``torch.backends.cuda.matmul.allow_tf32 = True`` or ``fp32_precision = "tf32"`` (off by
  default);
* cuDNN convolutions: ``torch.backends.cudnn.allow_tf32`` (**on** by PyTorch's default);
* CPU (oneDNN): ``torch.set_float32_matmul_precision("medium")`` (bf16 on CPUs with bf16
  units), ``torch.backends.mkldnn.matmul`` / ``.conv`` ``fp32_precision = "bf16"`` / ``"tf32"``.

fx_bk cannot scope them to its own ops (an Inductor graph calls every GEMM with the global
setting), so a step under such a setting is refused, at every forward call, before any gradient
exists: ``fx_bk::step_token`` calls :func:`check` with the batch's device. Convolution settings
matter only to programs with convolution sites. bf16 *autocast* is unaffected: fx_bk runs its
norms and clipped sums in float32 outside autocast.
"""

from __future__ import annotations

import torch

from .errors import ReducedPrecisionError

_NEEDS: dict[int, dict[str, str]] = {}  # module key -> {"matmul" | "conv": first site using it}


def register(key: int, model_name: str, sites) -> None:
    """Record which op families the program of module ``key`` computes its norms and clipped
    sums with, and the first site of each (named in the error)."""
    needs = _NEEDS.setdefault(key, {})
    for site in sites:
        param = next(iter(site.params.values()), "?")
        where = (f"{model_name}: site {site.node} ({site.op}, rule {site.rule.name!r}, "
                 f"parameter {param!r})")
        needs.setdefault("matmul", where)  # every rule's norms or sums include GEMMs
        if _is_convolution(site):
            needs.setdefault("conv", where)


def forget(key: int) -> None:
    _NEEDS.pop(key, None)


def _is_convolution(site) -> bool:
    """Conv, conv_transpose and convolution rules, and any other rule's convolution op."""
    return "conv" in site.rule.name or "conv" in str(site.op)


def _resolve(*levels) -> str:
    """The first precision among ``levels`` that is set (``"none"``: inherit the next)."""
    for level in levels:
        value = getattr(level, "fp32_precision", None)
        if value not in (None, "none"):
            return str(value)
    return "ieee"


def _legacy_tf32(flag) -> bool:
    try:
        return bool(flag())
    except RuntimeError:  # a mix of the legacy and the fp32_precision APIs: the latter decides
        return False


def reduced_settings(device_type: str) -> dict[str, str]:
    """``{"matmul" | "conv": what selects a reduced precision}`` for float32 ops on
    ``device_type`` under the current global settings (empty: IEEE float32 throughout)."""
    b = torch.backends
    found: dict[str, str] = {}
    if device_type == "cuda":
        matmul = _resolve(getattr(b.cuda, "matmul", None), b.cuda, b)
        if matmul != "ieee" or _legacy_tf32(lambda: b.cuda.matmul.allow_tf32):
            found["matmul"] = (
                f"float32 CUDA matmuls run in TF32 (torch.backends.cuda.matmul.fp32_precision = "
                f"{matmul!r}, set by torch.set_float32_matmul_precision('high'/'medium') or "
                f"allow_tf32 = True); call torch.set_float32_matmul_precision('highest')")
        conv = _resolve(getattr(b.cudnn, "conv", None), b.cudnn, b)
        if conv != "ieee" or _legacy_tf32(lambda: b.cudnn.allow_tf32):
            found["conv"] = (
                "float32 cuDNN convolutions run in TF32 (torch.backends.cudnn.allow_tf32 is True, "
                "PyTorch's default on CUDA); set torch.backends.cudnn.allow_tf32 = False")
    elif device_type == "cpu" and hasattr(b, "mkldnn"):
        for family, ops, source in (
                ("matmul", "matmuls", ", e.g. from torch.set_float32_matmul_precision('high' / "
                 "'medium'); call torch.set_float32_matmul_precision('highest') or set it to "
                 "'ieee'"),
                ("conv", "convolutions", "; set it to 'ieee'")):
            value = _resolve(getattr(b.mkldnn, family, None), b.mkldnn, b)
            if value != "ieee":
                found[family] = (f"float32 CPU {ops} may run in {value} (torch.backends.mkldnn."
                                 f"{family}.fp32_precision = {value!r}{source})")
    return found


def check(key: int, device_type: str) -> None:
    """Raise :class:`ReducedPrecisionError` when module ``key``'s program would compute its
    norms or clipped sums with a reduced-precision float32 GEMM or convolution."""
    needs = _NEEDS.get(key)
    if not needs:
        return
    bad = {f: why for f, why in reduced_settings(device_type).items() if f in needs}
    if not bad:
        return
    family, why = next(iter(bad.items()))
    raise ReducedPrecisionError(
        f"fx_bk: {why}. {needs[family]} computes its per-sample norms and clipped gradient sum "
        f"with float32 {family} ops, and a sum rounded in reduced precision can let one sample "
        f"add more than max_grad_norm (a privacy bug). fx_bk refuses the step: set IEEE float32 "
        f"for {'these' if len(bad) > 1 else 'this'} ({', '.join(bad)}). For speed use "
        f"torch.autocast(dtype=torch.bfloat16) instead: fx_bk keeps its norms and clipped sums "
        f"in float32 under autocast")
