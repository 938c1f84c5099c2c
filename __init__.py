"""GLM-Image for ComfyUI. ComfyUI imports this folder as a package (whatever the folder is called: ComfyUI-Manager
and `git clone` name it `glm-image-nodes`) and gets the nodes. Imported any other way (pytest collecting the repo,
plain Python, ComfyUI absent) it defines nothing but WEB_DIRECTORY, so the host-independent core (glm_image_core) and
the test suite work from a folder of any name."""

WEB_DIRECTORY = "./web"

try:
    import comfy  # noqa: F401  present only inside ComfyUI
except ImportError:
    comfy = None

# __package__ is empty when this file is imported as a lone module (pytest does so for the repo root when the folder
# name is not a Python identifier, e.g. glm-image-nodes); the relative import below needs the package ComfyUI makes.
if comfy is not None and __package__:
    from .nodes import comfy_entrypoint  # noqa: F401
