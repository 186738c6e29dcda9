"""fx_bk: differentially private per-sample clipping (Book-Keeping) as a graph transformation.

    model = fx_bk.transform(model, max_grad_norm=1.0)   # loss_reduction="mean" by default
    model = torch.compile(model, fullgraph=True)        # optional
    loss = criterion(model(x), y); loss.backward()      # p.grad == sum_i C_i grad l_i
"""

from __future__ import annotations

from .api import transform
from .config import BKConfig
from .errors import ConfigError, FxBkError, Problem, UnsupportedModelError
from .explain import explain
from .losses import sequence_cross_entropy

__all__ = [
    "BKConfig",
    "ConfigError",
    "FxBkError",
    "PrivacyEngine",
    "Problem",
    "UnsupportedModelError",
    "explain",
    "sequence_cross_entropy",
    "transform",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``fx_bk.PrivacyEngine`` imports Opacus (the ``privacy`` extra) only when asked for."""
    if name == "PrivacyEngine":
        try:
            from .privacy_engine import PrivacyEngine
        except ImportError as e:
            raise ImportError(
                f"fx_bk.PrivacyEngine needs Opacus: pip install 'fx_bk[privacy]' ({e})"
            ) from e
        return PrivacyEngine
    raise AttributeError(f"module 'fx_bk' has no attribute {name!r}")
