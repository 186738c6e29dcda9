"""Randomness for DP-SGD: PyTorch's generator, or a cryptographically secure source.

NOTE [secure mode]: DP's guarantee assumes the noise and the sampling are truly random to the
adversary. PyTorch's generators (Mersenne Twister on CPU, Philox on CUDA) are fast and
statistically good, but predictable: from enough output (or a guessed seed) the rest can be
computed, and the noise subtracted. ``SecureRandom`` draws instead from

* a fresh 256-bit key per draw from the operating system's CSPRNG (``os.urandom``:
  ``getrandom(2)`` on Linux, seeded from hardware entropy, the source Python's ``secrets`` uses),
* expanded by SHAKE-256 (FIPS 202's extendable-output function, in the standard library's
  ``hashlib``): with a secret uniformly random key its output is indistinguishable from random.

The expansion is what lets several processes draw the *same* noise without sending it: under
``torch.distributed`` rank 0 draws the key and broadcasts those 32 bytes (``share``), every rank
expands it, so the replicas never diverge and no seed exists that a user could pass or leak.
Throughput is that of SHAKE-256 (about 250 MB/s per core; 32 bytes per noise coordinate).

Gaussian noise is Box-Muller in float64 from 53-bit uniforms in (0, 1), with the mitigation of
the floating-point attacks on Gaussian noise (Jin et al. 2022, arXiv 2112.05307) that Opacus
uses, from Holohan and Braghin 2021 (arXiv 2107.10138, Section 5.1): each coordinate is the sum
of four independent standard normals, divided by 2 (variance 1), then scaled and rounded once
to the gradient's dtype.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable

import torch

KEY_BYTES = 32  # 256-bit keys


class TorchRandom:
    """PyTorch's generator (seeded or the default one): reproducible, not secure. The noise is
    drawn exactly as Opacus draws it without ``secure_mode``."""

    secure = False

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def normal(self, std: float, like: torch.Tensor) -> torch.Tensor:
        if std == 0:
            return torch.zeros(like.shape, device=like.device, dtype=like.dtype)
        return torch.normal(mean=0, std=std, size=like.shape, device=like.device,
                            generator=self.generator, dtype=like.dtype)

    def uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, dtype=torch.float64)


class SecureRandom:
    """The secure source of NOTE [secure mode]. ``share(key) -> key``: makes every process use
    rank 0's key (a broadcast); None in one process."""

    secure = True

    def __init__(self, share: Callable[[bytes], bytes] | None = None):
        self.share = share

    def _bytes(self, n: int) -> bytes:
        key = os.urandom(KEY_BYTES)
        if self.share is not None:
            key = self.share(key)
        return hashlib.shake_256(key).digest(n)

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` independent uniforms in the open interval (0, 1), float64, 53 random bits."""
        if n == 0:
            return torch.empty(0, dtype=torch.float64)
        words = torch.frombuffer(bytearray(self._bytes(8 * n)), dtype=torch.int64)
        top = torch.bitwise_right_shift(words, 11) & ((1 << 53) - 1)  # 53 bits, sign-free
        return (top.to(torch.float64) + 0.5) * 2.0 ** -53

    def standard_normal(self, n: int) -> torch.Tensor:
        """``n`` standard normals, each the sum of four Box-Muller normals divided by 2."""
        if n == 0:
            return torch.empty(0, dtype=torch.float64)
        u = self.uniform(4 * n).view(2, 2 * n)
        radius = torch.sqrt(-2.0 * torch.log(u[0]))
        angle = (2.0 * math.pi) * u[1]
        z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])  # 4n normals
        return z.view(4, n).sum(0) / 2

    def normal(self, std: float, like: torch.Tensor) -> torch.Tensor:
        if std == 0:
            return torch.zeros(like.shape, device=like.device, dtype=like.dtype)
        z = self.standard_normal(like.numel()).view(like.shape) * std
        return z.to(device=like.device, dtype=like.dtype)


def broadcast_key(device: torch.device) -> Callable[[bytes], bytes]:
    """``share`` for ``SecureRandom`` under ``torch.distributed``: every rank gets rank 0's key
    (a collective: all ranks must draw in the same order, as the DP optimizer's steps do)."""

    def share(key: bytes) -> bytes:
        t = torch.tensor(list(key), dtype=torch.uint8, device=device)
        torch.distributed.broadcast(t, src=0)
        return bytes(t.cpu().tolist())

    return share
