"""A stand-in for transformers 4.57 (what other custom node packs pin): the installed transformers, reporting version
4.57.6 and without GlmImage, so `from transformers import GlmImageForConditionalGeneration` fails with transformers
4's own "cannot import name". Everything else (T5, CLIP, ...) is the real module, so ComfyUI and the other GLM-Image
stages run on it. `install()` swaps it into sys.modules."""

from __future__ import annotations

import sys
import types

VERSION = "4.57.6"


class _Transformers4(types.ModuleType):
    def __init__(self, real: types.ModuleType):
        super().__init__("transformers", real.__doc__)
        self.__dict__.update(
            __version__=VERSION,
            __path__=real.__path__,
            __spec__=real.__spec__,
            __file__=real.__file__,
            __package__="transformers",
            _real=real,
        )

    def __getattr__(self, name: str):
        if name.startswith("GlmImage"):
            raise AttributeError(f"module 'transformers' has no attribute {name!r}")
        return getattr(self._real, name)


def install() -> types.ModuleType:
    """Replace transformers in sys.modules by the stand-in (and hide its glm_image models); return the stand-in."""
    import transformers

    real = getattr(transformers, "_real", transformers)
    standin = _Transformers4(real)
    sys.modules["transformers"] = standin
    sys.modules["transformers.models.glm_image"] = None  # import and find_spec then fail, as where it does not exist
    return standin
