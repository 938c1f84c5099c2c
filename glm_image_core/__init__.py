"""GLM-Image in plain PyTorch: every stage of the reference pipeline, host-independent (no ComfyUI import here)."""
