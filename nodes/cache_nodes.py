"""EasyCache (GLM-Image): the stock EasyCache with its cache applied row by row.

The stock EasyCache node works on the GLM-Image MODEL (its DIFFUSION_MODEL wrapper sees every sampling call; the
reference-image pass is not one of them, so it is never cached). One flaw in ComfyUI 0.3.64's EasyCache matters here:
on a skipped step it adds every cond's cached difference to the whole batch, so when cond and uncond run as one batch
(GLM-Image's text-to-image CFG does) both rows get both differences. ComfyUI 0.33 slices the batch per cond; this
node does the same on any version, with the stock node's settings and wrappers.
"""

from __future__ import annotations

from comfy_api.latest import io
from comfy_extras import nodes_easycache

from .common import schema


class RowwiseEasyCacheHolder(nodes_easycache.EasyCacheHolder):
    """EasyCacheHolder whose skipped steps add each cond's cached difference to that cond's rows only."""

    def apply_cache_diff(self, x, uuids, *args, **kwargs):
        if args or kwargs:  # ComfyUI 0.33 (audio caches) already slices per cond
            return super().apply_cache_diff(x, uuids, *args, **kwargs)
        if self.first_cond_uuid in uuids:
            self.total_steps_skipped += 1
        rows = x.shape[0] // len(uuids)
        for i, uuid in enumerate(uuids):
            x[i * rows : (i + 1) * rows] += self.uuid_cache_diffs[uuid].to(x.device)
        return x

    def clone(self):
        twin = super().clone()
        twin.__class__ = RowwiseEasyCacheHolder
        return twin


class EasyCache(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        stock = nodes_easycache.EasyCacheNode.define_schema()
        return schema(
            node_id="GLMImageEasyCache",
            display_name="EasyCache (GLM-Image)",
            category="GLM-Image",
            search_aliases=["easycache", "cache", "缓存", "加速"],
            description="Skips DiT steps whose output is predictable from the previous ones (the stock EasyCache, with "
            "cond and uncond cached apart when they share a batch). The reference images' pass is never cached.",
            inputs=stock.inputs,
            outputs=stock.outputs,
        )

    @classmethod
    def execute(cls, model, reuse_threshold, start_percent, end_percent, verbose) -> io.NodeOutput:
        model = nodes_easycache.EasyCacheNode.execute(model, reuse_threshold, start_percent, end_percent, verbose)[0]
        holder = model.model_options["transformer_options"]["easycache"]
        holder.__class__ = RowwiseEasyCacheHolder  # the node's own fresh holder: same state, row-wise cache
        return io.NodeOutput(model)
