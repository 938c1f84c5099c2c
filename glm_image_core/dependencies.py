"""What the pack needs from its environment: a recent transformers 5 for the AR model, checked without loading it.

The AR model (GlmImageForConditionalGeneration) and its processor exist from transformers 5.0.0, but only 5.18.0 and
later work as the pack uses them (measured: 5.0 builds other token grids for a size, 5.5 to 5.17 fail on reference
images; 5.18.0 passes the AR, pipeline and loading tests). Other custom node packs often pin transformers 4, so an environment may hold
it; then only the AR stage cannot work, and the user needs one message that says what was found, what is needed and
the exact command for this Python.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys

from .errors import InvalidInputError

# The oldest release that works (see above; .ci/newest-deps tests the newest); requirements.txt and pyproject agree.
TRANSFORMERS_NEEDED = "5.18.0"
# What pip upgrades together with transformers 5 (its own requirements), named so the user is not surprised.
TRANSFORMERS_BRINGS = ("huggingface_hub", "tokenizers", "safetensors")


def installed_version(package: str) -> str | None:
    """The version of an installed distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def has_glm_image() -> bool:
    """Whether the importable transformers has the GlmImage model (found by its module spec: nothing is loaded)."""
    try:
        return importlib.util.find_spec("transformers.models.glm_image") is not None
    except (ImportError, ValueError):  # no transformers, or one without transformers.models
        return False


def pip_command(requirement: str) -> str:
    """The pip command for the Python running now (ComfyUI's, in the pack): `<python> -m pip install "<req>"`."""
    python = f'"{sys.executable}"' if " " in sys.executable else sys.executable
    return f'{python} -m pip install "{requirement}"'


def transformers_problem() -> str | None:
    """None when transformers has GlmImage and is TRANSFORMERS_NEEDED or later; else the message for the user: found
    and needed version, the command, and what else the upgrade changes."""
    try:
        import transformers

        found = transformers.__version__
    except ImportError:
        found = None
    if found is not None and has_glm_image():
        from packaging.version import Version  # a transformers requirement

        if Version(found) >= Version(TRANSFORMERS_NEEDED):
            return None
    brings = ", ".join(f"{name} (now {installed_version(name) or 'absent'})" for name in TRANSFORMERS_BRINGS)
    return (
        f"GLM-Image needs transformers {TRANSFORMERS_NEEDED} or newer for its AR model (GlmImage); this Python has "
        f"{'no transformers' if found is None else f'transformers {found}'}. The AR model (Load GLM-Image AR Model) "
        "cannot load until transformers is upgraded; the other stages work. Upgrade it with this Python (ComfyUI's), "
        f"then restart ComfyUI: {pip_command(f'transformers>={TRANSFORMERS_NEEDED}')}. pip then also upgrades what "
        f"transformers 5 requires: {brings}; a custom node pack that pins transformers 4 or huggingface_hub below 1.0 "
        "may ask for them back."
    )


def glm_image_classes(*names: str) -> tuple:
    """transformers' GlmImage classes by name (e.g. "GlmImageProcessor"); InvalidInputError with the upgrade message
    when this transformers lacks them (instead of transformers 4's bare "cannot import name")."""
    problem = transformers_problem()
    if problem is not None:
        raise InvalidInputError(problem)
    import transformers

    return tuple(getattr(transformers, name) for name in names)
