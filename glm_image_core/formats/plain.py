"""Plain weights: every tensor a number in a floating dtype (bf16 as published, fp16, fp32, or an unscaled fp8 file,
cast to the dtype the model computes in). Everything it answers is ``WeightFormat``'s default."""

from __future__ import annotations

from .base import WeightFormat


class PlainFormat(WeightFormat):
    name = "plain"
    label = "full-precision weights (bf16, fp16, fp32; unscaled fp8 is cast)"
