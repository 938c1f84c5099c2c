"""What every weight format answers (``WeightFormat``), with the answers of plain weights as defaults: a format module
overrides only where its weights differ. The registry that holds one object per format is the package
(``glm_image_core.formats``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import ComponentFiles, load_tensors

# x [..., in] -> x @ W.T [..., out] in x's dtype, without the bias: what the fast AR decoder multiplies with.
Projection = Callable[[torch.Tensor], torch.Tensor]


class DenseProjection:
    """A weight [out, in] held as is (any floating dtype the activations share)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class WeightFormat:
    """One way of storing the weights of a model's linear layers, for the DiT and the AR model alike.

    ``components``: the folder names (published layout) of the components whose files may be in this format.
    ``layer_class``: the core layer that holds a weight in this format (None: torch's ``nn.Linear``).
    ``packed``: its layers hold the weight as codes (packed into integers, with scales and zero points) that no host
    can patch, cast or page as a weight: a LoRA reaches the weight through the layer, dequantised."""

    name = "plain"
    label = "full-precision weights"
    components: tuple[str, ...] = ("transformer", "vae", "text_encoder", "vision_language_encoder")
    layer_class: type[nn.Module] | None = None
    packed = False

    # --- files: recognised and checked from headers and configs alone (cheap enough for queue time) --------------

    def recognise(self, files: ComponentFiles) -> bool:
        """Whether ``files`` are in this format."""
        return False

    def check(self, files: ComponentFiles) -> None:
        """A ModelFilesError for what this format's files hold that the loaders cannot use (headers only)."""

    def extra_key(self, key: str, expected) -> bool:
        """Whether ``key`` is one this format stores beside a model's own tensors (``expected``): scales, markers."""
        return False

    def made_while_reading(self, files: ComponentFiles, expected) -> frozenset[str]:
        """Keys of the model (``expected``) that ``read`` computes rather than finds in the files."""
        return frozenset()

    def integer_keys(self, files: ComponentFiles) -> set[str]:
        """Keys this format stores as integer codes (every other tensor of a model is floating)."""
        return set()

    def check_read(self, files: ComponentFiles, state_dict: dict, expected: dict[str, tuple[int, ...]]) -> None:
        """A ModelFilesError for what only the read tensors show (``state_dict``, as ``read`` or ``read_as_stored``
        gave them) against the shapes of the model the config builds (``expected``)."""

    def rows_only(self, files: ComponentFiles) -> set[str]:
        """Weight keys stored packed along their inputs: only their rows can be checked against the model's shape."""
        return set()

    # --- a core model (glm_image_core's DiT, VAE; transformers' AR) --------------------------------------------------

    def build_layers(
        self, model: nn.Module, files: ComponentFiles, dtype: torch.dtype | None, layer_class=None
    ) -> None:
        """Replace, in a meta-device model, the linear layers this format stores by its own (empty) layers: of
        ``layer_class`` where given (a host's subclass of ``self.layer_class``)."""

    def read(self, files: ComponentFiles, dtype: torch.dtype | None, device="cpu") -> dict[str, torch.Tensor]:
        """The tensors a core model built with ``build_layers`` takes; floating weights it computes with in
        ``dtype`` (None: as stored)."""
        return load_tensors(files.weights, dtype, device)

    def cast(self, files: ComponentFiles, state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict:
        """Tensors of these files in the dtypes a model built with ``build_layers`` computes with: floating ones in
        ``dtype`` (None: as they are), the format's own tensors as it keeps them."""
        if dtype is None:
            return state_dict
        return {k: t.to(dtype) if t.is_floating_point() else t for k, t in state_dict.items()}

    def read_as_stored(self, files: ComponentFiles, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """The tensors for a host that builds its own layers for this format (ComfyUI's ops): quantised ones as
        stored; plain weights in ``dtype`` (None: as stored)."""
        return load_tensors(files.weights, dtype)

    # --- a built layer ---------------------------------------------------------------------------------------------

    def dequantise(self, layer: nn.Module, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """The weight [out, in] a layer of this format stands for, in ``dtype`` on ``device`` (None: the layer's)."""
        return layer.weight.to(device or layer.weight.device, dtype)

    def projection(self, layers: Sequence[nn.Module]) -> Projection:
        """What the fast AR decoder multiplies with: the layers' outputs side by side (several: the AR's k and v),
        without their biases, reading the weights as stored."""
        weights = [layer.weight for layer in layers]
        return DenseProjection(weights[0] if len(weights) == 1 else torch.cat(weights))

    def release_device_copies(self, layer: nn.Module) -> None:
        """Drop copies the layer made for itself on a device (a host lending it the device by swapping ``.data``
        never calls ``_apply``)."""

    # --- memory (glm_image_core.memory) ------------------------------------------------------------------------------

    def joined_bytes(self, out_features: int, in_features: int, dtype_bytes: int, group_size: int) -> int:
        """Bytes of ``projection``'s joined weight for layers of ``out_features`` outputs together."""
        return out_features * in_features * dtype_bytes

    def many_rows_matmul_bytes(self, in_features: int, out_features: int, rows: int, dtype_bytes: int) -> dict:
        """What a matmul of ``rows`` rows (a prefill) allocates beyond its output, buffer by buffer (bytes)."""
        return {}

    def first_step_bytes(self, in_features: int, out_features: int, group_size: int) -> dict:
        """What the first decode step allocates for itself, beyond the weights, buffer by buffer (bytes)."""
        return {}

    def device_copy_bytes(self, in_features: int, out_features: int, group_size: int) -> int:
        """Bytes a layer keeps on the device beyond its own tensors once it has run there."""
        return 0
