"""The few exception types the core raises; messages say what was found, what was expected and what to do."""


class GlmImageError(Exception):
    """Base class for every error raised by glm_image_core."""


class ModelFilesError(GlmImageError):
    """A model folder or file is missing, truncated, of the wrong component or inconsistent with its config."""


class InvalidInputError(GlmImageError, ValueError):
    """A size, prompt, token grid or image that the model cannot take."""


class GenerationCancelled(GlmImageError):
    """A progress callback asked to stop a long loop (AR decoding)."""
