"""GLM-Image for ComfyUI. ComfyUI imports this file; elsewhere (pytest, plain Python) it defines nothing, so the
host-independent core (glm_image_core) stays usable without ComfyUI."""

WEB_DIRECTORY = "./web"

try:
    import comfy  # noqa: F401  present only inside ComfyUI
except ImportError:
    pass
else:
    from .nodes import comfy_entrypoint  # noqa: F401
