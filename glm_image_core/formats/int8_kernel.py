"""The int8 decode matmul as one compiled CUDA kernel, with the care a shared process needs: a failure costs one call
or one generation, never the process, and its reason is kept (``FUSED_KERNEL.unavailable``). The int8 format and
the layer that calls it are in ``formats.int8``; the kernel runs for decode steps (a few rows) on CUDA only."""

from __future__ import annotations

import functools
import logging

import torch

FUSED_MAX_ROWS = 16  # on CUDA, inputs of at most this many rows (decode: one per sample) take the fused kernel


def fused_int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, in] (M small) times int8 q [out, in]^T, in float32 with the float32 scale: written as a broadcast
    product and a sum over ``in``, which torch.compile turns into one reduction kernel that reads each int8 weight once
    (no bf16 copy of the matrix). Eager, it is the same math with an [M, out, in] intermediate (tests)."""
    return (x.float()[:, None, :] * q).sum(dim=-1).mul_(scale).to(x.dtype)


class FusedInt8Kernel:
    """``fused_int8_linear`` under torch.compile, built on first use. A failure costs one call, not the process:
    out of memory, that call runs eagerly and the kernel is kept; any other error (no Triton, a compile or capture
    error) is logged with its reason (``unavailable``) and the eager path serves until the next generation
    (``retry``), which tries the kernel again."""

    def __init__(self):
        self.compiled = None
        self.unavailable: str | None = None  # why the kernel is not used in this generation

    def retry(self) -> None:
        self.unavailable = None

    def __call__(self, x, q, scale) -> torch.Tensor | None:
        if self.unavailable is not None:
            return None
        try:
            if self.compiled is None:
                self.compiled = torch.compile(fused_int8_linear, dynamic=True, fullgraph=True)
            return self.compiled(x, q, scale)
        except torch.OutOfMemoryError:
            return None
        except Exception as e:  # torch.compile raises many types (BackendCompilerFailed, Unsupported, ...)
            self.unavailable = f"{type(e).__name__}: {e}"
            _warn_once(
                f"GLM-Image AR: the fused int8 matmul is not used ({self.unavailable}); dequantising per matrix."
            )
            return None


@functools.cache
def _warn_once(message: str) -> None:
    logging.warning(message)


FUSED_KERNEL = FusedInt8Kernel()
