"""One step of device work replayed as a CUDA graph, with the care a shared process needs: warm-up before capture,
nothing in flight when capture starts, an eager fallback on any capture error (warned once), the graph released
when its user is done. Used by the fast AR decoder for its per-token step."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch


class StepGraph:
    """Replays ``step`` (work on device tensors only) as one CUDA graph. The first two calls run it eagerly on a side
    stream (warm-up: cuBLAS workspaces, lazy inits) as real steps; the third captures it, and it and every later call
    replay it. If the capture fails, for any reason, the step keeps running eagerly (same results, slower). The user
    calls ``release`` when done (the fast AR decoder: at the end of each generation)."""

    WARMUP = 2

    def __init__(self, step: Callable[[], None], device: torch.device):
        self.step, self.device = step, torch.device(device)
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager = False
        self.side = torch.cuda.Stream(device=self.device)  # on the model's GPU, which need not be the current one

    def __call__(self) -> None:
        self.calls += 1
        # Graphs, capture streams and the current stream belong to the current device: make it the model's (cuda:1
        # for an AR on a second GPU) for each step, whatever the host's current device is.
        with torch.cuda.device(self.device):
            if self.graph is None and not self.eager and self.calls > self.WARMUP:
                self.graph = self._capture()
                self.eager = self.graph is None
            if self.graph is not None:
                self.graph.replay()
            elif self.eager:
                self.step()
            else:
                current = torch.cuda.current_stream(self.device)
                self.side.wait_stream(current)
                with torch.cuda.stream(self.side):
                    self.step()
                current.wait_stream(self.side)

    def release(self) -> None:
        if self.graph is not None:
            self.graph.reset()
            self.graph = None

    def _capture(self) -> torch.cuda.CUDAGraph | None:
        """Record one step (recording runs nothing: the state is unchanged until the first replay)."""
        # Nothing in flight when capture starts, as ComfyUI does before its own graphs: allocator hooks (comfy-aimdo's
        # dynamic VRAM) and other streams must not see work of this step half recorded.
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.step()
        except Exception as e:  # depends on the CUDA setup and allocator; the eager step computes the same
            _warn_once(f"GLM-Image AR: CUDA graph capture failed ({type(e).__name__}: {e}); decoding without a graph.")
            return None
        return graph


@functools.cache
def _warn_once(message: str) -> None:
    logging.warning(message)
