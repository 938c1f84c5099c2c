"""The conds GLM-Image adds to ComfyUI's: glyph embeddings of any length batched by padding and a mask, and the
reference keys/values of an edit shared by the batch."""

from __future__ import annotations

import comfy.conds

from ..glm_image_core.dit import ReferenceKV, text_groups_for_lengths
from ..glm_image_core.glyph import pad_glyphs


class GlyphCond(comfy.conds.CONDRegular):
    """Glyph embeddings [1, T, C]. Conds of any length batch together: zero padding plus a mask (long, so that
    ComfyUI moves it without casting it to the model dtype), and the padding layout (text groups) worked out from
    the conds' shapes on the host, so the DiT never reads the mask back from the device."""

    def can_concat(self, other):
        return self.cond.shape[2] == other.cond.shape[2] and self.cond.device == other.cond.device

    def concat(self, others):
        conds = [self.cond] + [o.cond for o in others]
        embeds, mask = pad_glyphs(conds)
        lengths = [c.shape[1] for c in conds for _ in range(c.shape[0])]
        return [embeds, mask.long(), text_groups_for_lengths(lengths)]


class ReferenceKVCond:
    """Reference keys/values for the conditional branch; shared by every sample of the batch."""

    def __init__(self, kv: ReferenceKV):
        self.cond = kv

    def process_cond(self, batch_size, **kwargs):
        return self

    def can_concat(self, other):
        return other.cond is self.cond

    def concat(self, others):
        return self.cond

    def size(self):
        """[B_ref, L_ref]: the reference tokens every conditional attention also reads (see GlmImageModel's memory)."""
        k = self.cond.layers[0][0]  # [B_ref, heads, L_ref, head_dim]
        return [k.shape[0], k.shape[2]]
