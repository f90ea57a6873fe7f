"""Tolerances set from the size of what is compared, not from what one machine printed.

fp32 sums of K terms taken in another order (chunked vs unchunked heads, other BLAS kernels,
other thread counts) differ by about ``sqrt(K) * eps`` of the summands' scale. The widest sum in
these tests is the 257,216-wide vocabulary: sqrt(257216) * 1.2e-7 = 6e-5 of the scale. The
default allows 16x that, so a real bug (a missing term, a wrong sign: errors of order 1 relative)
still fails while summation order on any CPU and thread count does not.
"""

from __future__ import annotations

import math

import torch

FP32_EPS = torch.finfo(torch.float32).eps
VOCAB_SUM_REL = 16 * math.sqrt(257_216) * FP32_EPS  # ~9.7e-4


def assert_close_to_scale(
    actual: torch.Tensor, expected: torch.Tensor, rel: float = VOCAB_SUM_REL, msg: str = ""
) -> None:
    """Every element of ``actual`` within ``rel`` x max|expected| of ``expected``."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    worst = float((actual - expected).abs().max()) if expected.numel() else 0.0
    allowed = rel * max(scale, 1e-12)
    assert worst <= allowed, f"{msg} max |diff| {worst:.3g} > {rel:.2g} x scale {scale:.3g} = {allowed:.3g}"
