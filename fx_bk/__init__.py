"""fx_bk: differentially private per-sample clipping (Book-Keeping) as a graph transformation.

    model = fx_bk.transform(model, max_grad_norm=1.0)   # loss_reduction="mean" by default
    model = torch.compile(model, fullgraph=True)        # optional
    loss = criterion(model(x), y); loss.backward()      # p.grad == sum_i C_i grad l_i

``transform``, ``explain`` and ``PrivacyEngine`` are imported on first use: the graph passes
(``passes/``) sit between the rules and the runtime and import ``fx_bk``'s lower layers, so the
package's own ``__init__`` must not pull the runtime in eagerly.
"""

from __future__ import annotations

import importlib

from .config import BKConfig
from .errors import (
    ClipOnceError,
    ConfigError,
    FxBkError,
    NonFiniteSampleError,
    Problem,
    ReducedPrecisionError,
    UnsupportedModelError,
)
from .losses import sequence_cross_entropy
from .rules import Rule, register_rule
from .site import Site, SiteValues, Strategy

__all__ = [
    "AdaptiveClipping",
    "BKConfig",
    "ClipOnceError",
    "ConfigError",
    "FxBkError",
    "NonFiniteSampleError",
    "PrivacyEngine",
    "Problem",
    "ReducedPrecisionError",
    "Rule",
    "Site",
    "SiteValues",
    "Strategy",
    "UnsupportedModelError",
    "UserLevel",
    "checked_criterion",
    "explain",
    "register_rule",
    "sequence_cross_entropy",
    "transform",
]
__version__ = "0.1.0"

_LAZY = {"transform": ".api", "explain": ".explain", "BKModule": ".runtime",
         "PrivacyEngine": ".privacy_engine", "checked_criterion": ".criterion",
         "UserLevel": ".user_level", "AdaptiveClipping": ".adaptive_clipping"}


def __getattr__(name: str):
    """The runtime-level names, imported when first asked for. ``fx_bk.PrivacyEngine`` needs
    Opacus (the ``privacy`` extra)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'fx_bk' has no attribute {name!r}")
    try:
        module = importlib.import_module(_LAZY[name], __name__)
    except ImportError as e:
        if name != "PrivacyEngine":
            raise
        raise ImportError(
            f"fx_bk.PrivacyEngine needs Opacus: pip install 'fx_bk[privacy]' ({e})"
        ) from e
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_LAZY})
