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
from .privacy_engine import PrivacyEngine

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
