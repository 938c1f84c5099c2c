"""LoRA in the core: low-rank updates of linear layers applied unmerged, and the DiT's LoRA files.

An update ``strength * scaling * B @ A`` (A: down, [rank, in]; B: up, [out, rank]; scaling = alpha / rank) is applied
as PEFT computes it, beside the layer: its output gains ``(x @ A.T) @ B.T`` in float32 (``ProjectionUpdate``: two thin
matmuls, several LoRAs stacked along the rank). Nothing is merged into the weights, so every weight format takes a
LoRA alike (nothing is rounded back into stored weights or requantised, however small the update), and a loaded model
(which ComfyUI caches and shares) is never changed: the AR's fast decoder multiplies with the update beside each
projection (``updated``), other code gets it from forward hooks for the time of a run (``hooked``). The AR's adapters
are read by ``ar_lora``; the ComfyUI nodes apply DiT LoRAs with ComfyUI's own LoRA code (nodes/lora_nodes.py).

DiT LoRA files: our module names are diffusers' (`transformer_blocks.0.attn1.to_q`, ...), so a LoRA trained with
diffusers or PEFT names its layers as we do, behind the prefix its trainer wrote: `transformer.` (diffusers'
save_lora_weights), `base_model.model.` (PEFT's save_pretrained) or none (get_peft_model_state_dict). Each layer's
tensors are `<layer>.lora_A.weight` (down), `<layer>.lora_B.weight` (up) and optionally `<layer>.alpha` (alpha = rank
when absent); ComfyUI's (`diffusion_model.<layer>`) and kohya's (`lora_unet_<layer, _ for .>`, `lora_down`/`lora_up`)
names are read too.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from . import formats
from .errors import InvalidInputError
from .file_checks import Header, LoraTensors, check_lora_alpha_values, check_lora_fits, check_lora_pairs, read_header

PUBLISHED = Path(__file__).parent / "published"
DIFFUSERS_LORA_PREFIXES = ("transformer.", "base_model.model.", "")
DOWN_SUFFIXES, UP_SUFFIXES, ALPHA_SUFFIX = (
    (".lora_A.weight", ".lora_down.weight"),
    (".lora_B.weight", ".lora_up.weight"),
    ".alpha",
)


@dataclass(frozen=True)
class LayerLora:
    down: torch.Tensor  # A [rank, in]
    up: torch.Tensor  # B [out, rank]
    scaling: float  # alpha / rank, or alpha / sqrt(rank)

    def delta(self) -> torch.Tensor:
        """scaling * B @ A in float32, [out, in] (what merging would add; for tests and measurements)."""
        return (self.up.float() @ self.down.float()) * self.scaling


@dataclass(frozen=True)
class Lora:
    """One LoRA file at one strength, as a LoRA node adds it to a model."""

    layers: dict[str, LayerLora]  # module name in the model -> its update
    strength: float
    source: str


def diffusers_lora_names(weight_keys: Iterable[str]) -> dict[str, str]:
    """{LoRA layer name: model weight key} for each ``<module>.weight`` of the DiT's state dict, under every prefix
    diffusers-based trainers write."""
    names = {}
    for key in weight_keys:
        if key.endswith(".weight"):
            module = key[: -len(".weight")]
            for prefix in DIFFUSERS_LORA_PREFIXES:
                names[prefix + module] = key
    return names


def lora_layer_of(key: str, known: Mapping[str, str] | set[str]) -> str | None:
    """The known layer name a LoRA tensor key belongs to (``a.b.lora_A.weight``, ``a_b.lora_down.weight``,
    ``a.b.alpha``, ``a.b_lora.up.weight`` ...), or None."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:end])
        for candidate in (name, name.removesuffix("_lora")):
            if candidate in known:
                return candidate
    return None


def unmatched_lora_keys(lora_keys: Iterable[str], known: Mapping[str, str] | set[str]) -> list[str]:
    """The LoRA tensor keys that belong to no known layer (a LoRA for another model, or other key names)."""
    return [key for key in lora_keys if lora_layer_of(key, known) is None]


def dit_layer_names(model: torch.nn.Module) -> dict[str, str]:
    """{every name a DiT LoRA file gives a linear layer of ``model`` (the core DiT): the layer}: diffusers/PEFT's
    (behind their prefixes), ComfyUI's (``diffusion_model.<name>``) and kohya's (``lora_unet_<name with _>``)."""
    names = {}
    for layer, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or formats.of_layer(module) is not formats.PLAIN:
            for prefix in (*DIFFUSERS_LORA_PREFIXES, "diffusion_model."):
                names[prefix + layer] = layer
            names["lora_unet_" + layer.replace(".", "_")] = layer
    return names


class AnyDitLayerName:
    """Every name a DiT LoRA file may give a layer of a GLM-Image DiT of any size, without the model (when a prompt
    is queued): the names ``dit_layer_names`` and ComfyUI's key map give the layers with a weight, for any block
    number. Used as the ``known`` set of ``lora_layer_of``."""

    def __init__(self):
        from .dit import GlmImageTransformer2DModel

        config = json.loads((PUBLISHED / "transformer__config.json").read_text(encoding="utf-8"))
        with torch.device("meta"):  # the layer names depend on no size but the block count
            model = GlmImageTransformer2DModel(**{**{k: v for k, v in config.items() if k[0] != "_"}, "num_layers": 1})
        modules = {key.removesuffix(".weight") for key in model.state_dict() if key.endswith(".weight")}
        names = [prefix + m for m in modules for prefix in (*DIFFUSERS_LORA_PREFIXES, "diffusion_model.")]
        names += ["lora_unet_" + m.replace(".", "_") for m in modules]
        patterns = (
            re.escape(n)
            .replace(r"transformer_blocks\.0\.", r"transformer_blocks\.\d+\.")
            .replace(r"transformer_blocks_0_", r"transformer_blocks_\d+_")
            for n in names
        )
        self.pattern = re.compile("|".join(sorted(patterns)))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.pattern.fullmatch(name) is not None


DIT_LORA_REMEDY = (
    "Download the LoRA again, or save it again from its trainer (diffusers' save_lora_weights or PEFT's "
    "save_pretrained, in safetensors)."
)


def lora_parts(keys: Iterable[str], known: Mapping[str, str] | Container[str]) -> tuple[dict[str, LoraTensors], list]:
    """({layer name as the file gives it: its A, B, alpha and other adapter keys}, the keys that name no known
    layer)."""
    parts: dict[str, LoraTensors] = {}
    unmatched = []
    for key in keys:
        name = lora_layer_of(key, known)
        if name is None:
            unmatched.append(key)
            continue
        kind = (
            "down"
            if key.endswith(DOWN_SUFFIXES)
            else "up"
            if key.endswith(UP_SUFFIXES)
            else "alpha"
            if key.endswith(ALPHA_SUFFIX)
            else "other"
        )
        part = parts.setdefault(name, LoraTensors())
        if getattr(part, kind) is None:
            setattr(part, kind, key)
    return parts, unmatched


def check_dit_lora(
    source: str,
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, str],
    known: Mapping[str, str] | Container[str],
    features: Callable[[str], tuple[int, int] | None] | None = None,
) -> tuple[dict[str, LoraTensors], list[str]]:
    """The checks of a DiT LoRA's tensors (``file_checks``): some key names a layer of the DiT (else it is for
    another model), every layer's A and B complete, of one rank, floating, alpha a scalar; with ``features`` (a
    layer name as the file gives it -> the (out, in) of the model's layer, or None where it has none), each pair fits
    its layer. Returns (the parts by layer name, the keys for no layer of the DiT: for another model)."""
    parts, unmatched = lora_parts(shapes, known)
    if not parts:
        raise InvalidInputError(
            f"{source} matches no layer of the GLM-Image DiT ({len(shapes)} keys, e.g. {', '.join(unmatched[:3])}): it "
            "is for another model. GLM-Image LoRAs name layers as diffusers does (transformer.transformer_blocks.0."
            "attn1.to_q.lora_A.weight) or as ComfyUI does (lora_unet_transformer_blocks_0_attn1_to_q.lora_down.weight)."
        )
    check_lora_pairs(source, Header(dict(shapes), dict(dtypes), {}), parts, DIT_LORA_REMEDY)
    if features is not None:
        pairs, sizes = {}, {}
        for name, keys in parts.items():
            size = features(name) if keys.down is not None else None
            if size is not None:
                pairs[name], sizes[name] = (shapes[keys.down], shapes[keys.up]), size
        check_lora_fits(source, pairs, sizes, "The LoRA was trained for another model or another size of GLM-Image.")
    return parts, unmatched


def check_dit_lora_file(path: str | Path) -> None:
    """``check_dit_lora`` of a LoRA file from its header (no tensor data, when a prompt is queued), the header
    checked first (``file_checks.read_header``)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        raise InvalidInputError(f"{path.name} is not a .safetensors file; LoRAs load from safetensors files only.")
    header = read_header(path, DIT_LORA_REMEDY, InvalidInputError)
    check_dit_lora(path.name, header.shapes, header.dtypes, AnyDitLayerName())


def read_dit_lora(path: str | Path, model: torch.nn.Module) -> dict[str, LayerLora]:
    """{layer of ``model`` (the core DiT): its update} from a LoRA file in diffusers/PEFT, ComfyUI or kohya key names,
    checked (``check_dit_lora``) before a tensor is read, and fitted to ``model``'s layers. Keys for no layer of the
    DiT (another model's, such as a text encoder's) are counted in a warning."""
    path, known = Path(path), dit_layer_names(model)
    check_dit_lora_file(path)
    header = read_header(path, DIT_LORA_REMEDY, InvalidInputError)

    def features(name: str):
        module = model.get_submodule(known[name])
        return module.out_features, module.in_features

    parts, unmatched = check_dit_lora(path.name, header.shapes, header.dtypes, known, features)
    if unmatched:
        logging.warning(
            "GLM-Image LoRA: %d keys of %s match no layer of the DiT and are ignored: %s",
            len(unmatched),
            path.name,
            unmatched[:10],
        )
    other_kinds = [keys.other for keys in parts.values() if keys.other]
    if other_kinds:
        logging.warning(
            "GLM-Image LoRA: %d layers of %s are not LoRA pairs (LoHa, LoKr, DoRA, ...: ComfyUI's LoRA node reads "
            "them, this loader does not) and are ignored: %s",
            len(other_kinds),
            path.name,
            other_kinds[:10],
        )
    layers = {}
    with safe_open(path, framework="pt", device="cpu") as f:
        for name, keys in parts.items():
            if keys.down is None:
                continue  # another adapter kind (LoHa, LoKr, ...): ComfyUI reads those, the core does not
            down, up = f.get_tensor(keys.down), f.get_tensor(keys.up)
            alpha = f.get_tensor(keys.alpha).item() if keys.alpha else down.shape[0]
            check_lora_alpha_values(path.name, {keys.alpha: alpha} if keys.alpha else {})
            layers[known[name]] = LayerLora(down, up, alpha / down.shape[0])
    return layers


@dataclass(frozen=True)
class ProjectionUpdate:
    """The low-rank update of one projection for a run: x -> (x @ down.T) @ up.T, in float32, on the projection's
    device; several adapters stacked along the rank, each one's strength * scaling folded into its part of ``up``."""

    down: torch.Tensor  # [R, in] float32
    up: torch.Tensor  # [out, R] float32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x.float(), self.down), self.up).to(x.dtype)

    @property
    def nbytes(self) -> int:
        return self.down.nbytes + self.up.nbytes


def projection_updates(loras: Sequence[Lora], device) -> dict[str, ProjectionUpdate]:
    """{module name: its update} of every adapter with a strength other than 0, on ``device``."""
    parts: dict[str, list[tuple[LayerLora, float]]] = {}
    for lora in loras:
        if lora.strength != 0:
            for module, layer in lora.layers.items():
                parts.setdefault(module, []).append((layer, lora.strength))
    return {
        module: ProjectionUpdate(
            torch.cat([layer.down for layer, _ in stacked]).to(device, torch.float32),
            torch.cat([layer.up.float() * (strength * layer.scaling) for layer, strength in stacked], dim=1).to(device),
        )
        for module, stacked in parts.items()
    }


def joined(updates: Sequence[ProjectionUpdate | None], out_features: Sequence[int]) -> ProjectionUpdate | None:
    """One update for projections joined side by side (the fast decoder's k and v): their ``down`` s stacked, their
    ``up`` s along the diagonal (a projection without an update adds zero rows)."""
    present = [u for u in updates if u is not None]
    if not present:
        return None
    down = torch.cat([u.down for u in present])
    up = down.new_zeros(sum(out_features), down.shape[0])
    row = column = 0
    for update, out in zip(updates, out_features):
        if update is not None:
            up[row : row + out, column : column + update.down.shape[0]] = update.up
            column += update.down.shape[0]
        row += out
    return ProjectionUpdate(down, up)


class Updated:
    """A projection (``formats.Projection``: x -> x @ W.T) with its low-rank update beside it."""

    def __init__(self, projection, update: ProjectionUpdate):
        self.projection, self.update = projection, update

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x) + self.update(x)


def updated(projection, update: ProjectionUpdate | None):
    return projection if update is None else Updated(projection, update)


@contextmanager
def hooked(model, updates: dict[str, ProjectionUpdate]) -> Iterator[None]:
    """The updates added to their modules' outputs by forward hooks while the block runs (the AR's transformers loop,
    the core DiT); the hooks are gone afterwards."""
    handles = [
        model.get_submodule(module).register_forward_hook(lambda _, args, out, update=update: out + update(args[0]))
        for module, update in updates.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def update_bytes(loras: Sequence[Lora]) -> int:
    """Device bytes of the updates of ``loras`` (float32 ``down`` and ``up``), for memory estimates."""
    return sum(
        (layer.down.numel() + layer.up.numel()) * 4
        for lora in loras
        if lora.strength != 0
        for layer in lora.layers.values()
    )
