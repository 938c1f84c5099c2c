"""What every benchmark script shares: the setup (full size on CUDA, or --tiny on the CPU), models with random
weights built straight on the device, timing, result rows and the markdown table.

Speed does not depend on weight values, so nothing is downloaded: full-size models are built from the published
configs (read from ``GLM_IMAGE_CONFIGS``: a GLM-Image download, or the project's shared reference configs, the
default) on the meta device, materialised on the GPU with
``to_empty`` and filled with random values there. ``--tiny`` builds the same code paths from the tiny model's
configs (``glm_image_core.tiny``) on the CPU, so CI keeps the scripts working.

Our models and the reference models share weight tensors where both exist (our DiT and VAE are loaded from the
diffusers models' state dicts with ``assign=True``; the AR model is transformers' own in both), so comparing them
costs no extra memory.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Where the published configs are read: a GLM-Image folder as downloaded (<component>/config.json), or by default the
# copies in the package (glm_image_core/published, <component>__config.json).
CONFIGS = Path(os.environ.get("GLM_IMAGE_CONFIGS", REPO / "glm_image_core" / "published"))
# The Glyph-ByT5 encoder's config is not among the reference configs: ByT5-small's shape (google/byt5-small) with
# GLM-Image's 384-entry byte vocabulary and d_model 1472 (= the DiT's text_embed_dim).
GLYPH_ENCODER_CONFIG = {
    "architectures": ["T5EncoderModel"],
    "d_ff": 3584,
    "d_kv": 64,
    "d_model": 1472,
    "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "model_type": "t5",
    "num_decoder_layers": 4,
    "num_heads": 6,
    "num_layers": 12,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "tokenizer_class": "ByT5Tokenizer",
    "vocab_size": 384,
}
PROMPT = 'A neon shop sign that reads "OPEN 24 HOURS" above a rainy street at night, photorealistic'
GiB = 2**30


# --- setup ---------------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """Where and at what size to measure. ``folder``: a tiny GLM-Image folder; its processor and tokenizers serve
    the full-size models too (they keep every published token id), its configs the tiny ones."""

    tiny: bool
    device: torch.device
    dtype: torch.dtype
    folder: Path
    repeats: int
    compile: bool = False
    comfyui: Path | None = None  # a ComfyUI checkout for the ComfyUI/fp8 rows, if importable
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @classmethod
    def create(
        cls, tiny: bool, repeats: int | None = None, compile: bool = False, comfyui: str | None = None, folder=None
    ):
        """``folder``: a tiny GLM-Image folder already written (``write_tiny_model(..., seed=0)``), else one is."""
        from glm_image_core.tiny import write_tiny_model

        if not tiny and not torch.cuda.is_available():
            raise SystemExit("The full-size benchmarks need a CUDA GPU; use --tiny on a CPU.")
        tmp = None
        if folder is None:
            tmp = tempfile.TemporaryDirectory(prefix="glm-bench-")
            folder = write_tiny_model(Path(tmp.name) / "GLM-Image", seed=0)
        device = torch.device("cpu" if tiny else "cuda")
        if tiny:
            torch.set_num_threads(1)  # tiny matrices: threads only add overhead (and CI has 2 cores)
        dtype = torch.float32 if tiny else torch.bfloat16
        path = Path(comfyui) if comfyui else None
        if repeats is None:
            repeats = 2 if tiny else 5
        return cls(tiny, device, dtype, Path(folder), repeats, compile, path, tmp)

    def config(self, component: str) -> dict:
        """The component's config: published (full size) or the tiny folder's."""
        if self.tiny:
            return json.loads((self.folder / component / "config.json").read_text())
        return published_config(component)

    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def published_config(component: str) -> dict:
    """A component's full-size config from CONFIGS (either layout), the glyph encoder's from GLYPH_ENCODER_CONFIG."""
    if component == "text_encoder":
        return dict(GLYPH_ENCODER_CONFIG)
    candidates = [
        CONFIGS / component / "config.json",
        CONFIGS / f"{component}__config.json",
        CONFIGS / f"{component}__config.RECONSTRUCTED.json",
    ]
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text())
    raise SystemExit(
        f"No published config for {component} in {CONFIGS}: set GLM_IMAGE_CONFIGS to a GLM-Image folder as downloaded "
        "(zai-org/GLM-Image), or unset it to use glm_image_core/published."
    )


def versions() -> str:
    import transformers

    parts = [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    try:
        import diffusers

        parts.append(f"diffusers {diffusers.__version__}")
    except ImportError:
        parts.append("diffusers not installed")
    return ", ".join(parts)


# --- random weights on the device ------------------------------------------------------------------------------------


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter in place, on its own device: matrices N(0, 1/fan_in), embeddings N(0, 1), 1-d norm scales
    1 + N(0, 0.1) and biases N(0, 0.05) (as ``glm_image_core.tiny`` does), so activations stay O(1)."""
    generator = torch.Generator(next(module.parameters()).device).manual_seed(seed)
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    for name, p in module.named_parameters():
        if p.ndim == 1:
            p.normal_(0.0, 0.05 if name.endswith("bias") else 0.1, generator=generator)
            if not name.endswith("bias"):
                p.add_(1.0)
        elif id(p) in embeddings:
            p.normal_(0.0, 1.0, generator=generator)
        else:
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=generator)
    return module


def _materialize(module: torch.nn.Module, setup: Setup) -> torch.nn.Module:
    """A model built on the meta device -> the setup's dtype and device, random weights (never a float32 copy)."""
    module = module.to(setup.dtype).to_empty(device=setup.device)
    return randomize_(module).eval()


def build_ar_model(setup: Setup):
    """transformers' GlmImageForConditionalGeneration (AR + vision encoder + VQ), random weights on the device."""
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration

    config = GlmImageConfig.from_dict(setup.config("vision_language_encoder"))
    with torch.device("meta"):
        model = GlmImageForConditionalGeneration(config)
    model = _materialize(model, setup)
    rotary = model.model.language_model.rotary_emb  # its buffers are computed, not weights: recompute after to_empty
    inv_freq, _ = rotary.compute_default_rope_parameters(rotary.config, setup.device)
    rotary.inv_freq = inv_freq.float()
    rotary.original_inv_freq = inv_freq.float().clone()
    from glm_image_core.defaults import TEMPERATURE, TOP_P

    model.generation_config.update(
        do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, top_k=16512, eos_token_id=16385
    )
    return model


def build_glyph_encoder(setup: Setup):
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        model = T5EncoderModel(T5Config.from_dict(setup.config("text_encoder")))
    return _materialize(model, setup)


def build_dit(setup: Setup, with_reference: bool = True):
    """(ours, diffusers' or None): our DiT holds the very tensors of the diffusers model when both are built."""
    from glm_image_core.dit import GlmImageTransformer2DModel

    config = {k: v for k, v in setup.config("transformer").items() if not k.startswith("_")}
    reference = None
    if with_reference and diffusers_available():
        from diffusers import GlmImageTransformer2DModel as DiffusersDiT

        with torch.device("meta"):
            reference = DiffusersDiT.from_config(config)
        reference = _materialize(reference, setup)
        state = reference.state_dict()
    ours = GlmImageTransformer2DModel(**config, dtype=setup.dtype, device="meta")
    if reference is None:
        return _materialize(ours, setup), None  # no buffers: to_empty loses nothing
    ours.load_state_dict(state, assign=True, strict=True)
    return ours.eval(), reference


def build_vae(setup: Setup, with_reference: bool = True):
    """(ours, diffusers' AutoencoderKL or None), sharing weights like ``build_dit``."""
    from glm_image_core.vae import AutoencoderKL

    config = {k: v for k, v in setup.config("vae").items() if not k.startswith("_")}
    reference = None
    if with_reference and diffusers_available():
        from diffusers import AutoencoderKL as DiffusersVAE

        with torch.device("meta"):
            reference = DiffusersVAE.from_config(config)
        reference = _materialize(reference, setup)
    if reference is None:  # small: built on the device (its latents_mean/std buffers come from the config)
        return randomize_(AutoencoderKL(**config, dtype=setup.dtype, device=setup.device)).eval(), None
    ours = AutoencoderKL(**config, dtype=setup.dtype, device="meta")
    ours.load_state_dict(reference.state_dict(), assign=True, strict=True)
    return ours.to(setup.device).eval(), reference  # .to(): the buffers were built on the CPU


def diffusers_available() -> bool:
    try:
        import diffusers
    except ImportError:
        return False
    diffusers.utils.logging.set_verbosity_error()  # its notes on casting random models are noise here
    return True


# --- timing --------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs (device-synchronised)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def wall(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(seconds, result) of one synchronised call."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / GiB


def free_device_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- results -------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the results table. ``goal`` is an upper bound in ``unit`` (None: no goal)."""

    name: str
    unit: str
    ours: float | None = None
    reference: float | None = None
    goal: float | None = None
    note: str = ""

    def ratio(self) -> float | None:
        if self.ours is None or self.reference in (None, 0):
            return None
        return self.ours / self.reference

    def met(self) -> str:
        if self.goal is None or self.ours is None:
            return ""
        return "yes" if self.ours <= self.goal else "no"

    def as_dict(self) -> dict:
        return {**self.__dict__, "ratio": self.ratio(), "met": self.met()}


def failed_row(name: str, error: BaseException) -> Row:
    message = f"{type(error).__name__}: {error}".replace("\n", " ").replace("|", "/")
    return Row(name, "", note=f"FAILED: {message[:160]}")


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ok":
        return "ok" if value else "failed"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def markdown_table(rows: list[Row], setup: Setup, seconds: float) -> str:
    lines = [
        f"Device: **{setup.device_name()}**, {'tiny models (CI smoke run, not a measurement)' if setup.tiny else 'full-size GLM-Image, random bf16 weights'}; "
        f"{versions()}; whole run {seconds:.0f} s.",
        "",
        "| Measurement | Unit | Ours | Reference | Ours / ref. | Goal | Met | Notes |",
        "| --- | --- | ---: | ---: | ---: | ---: | :---: | --- |",
    ]
    for row in rows:
        ratio = row.ratio()
        goal = "" if row.goal is None else f"<= {row.goal:g}"
        met = "" if setup.tiny else row.met()  # tiny models say nothing about the goals
        lines.append(
            f"| {row.name} | {row.unit} | {_number(row.ours, row.unit)} | {_number(row.reference, row.unit)} | "
            f"{'' if ratio is None else f'{ratio:.2f}'} | {goal} | {met} | {row.note} |"
        )
    return "\n".join(lines) + "\n"


# --- 4-bit layers (W4A16) on full-size random weights -------------------------------------------------------------------


W4_GROUP_SIZE = 128  # Intel/GLM-Image-int4-AutoRound's


@torch.no_grad()
def w4a16_layer(linear: torch.nn.Linear):
    """A ``W4A16Linear`` holding ``linear`` rounded to symmetric 4 bits per group of 128 inputs (32 for the tiny
    models' narrower layers), packed as AutoRound/GPTQ pack it: what the 4-bit checks time and measure on the GPU,
    where quantising a full-size model with auto-round itself would take the whole session. Its packing is checked
    against auto-round's dequantisation in tests/test_benchmarks.py."""
    from glm_image_core.formats import w4a16

    out_features, in_features = linear.weight.shape
    group = W4_GROUP_SIZE if in_features % W4_GROUP_SIZE == 0 else 32
    w = linear.weight.float().t().reshape(in_features // group, group, out_features)
    scales = (w.abs().amax(dim=1) / 7).clamp(min=1e-8).half()  # [groups, out]
    codes = (w / scales.float()[:, None]).round().clamp(-8, 7).to(torch.int32) + 8
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=w.device)
    codes = codes.reshape(in_features // 8, 8, out_features) << shifts[None, :, None]
    layer = w4a16.W4A16Linear(in_features, out_features, linear.bias is not None, group, device="meta")
    layer.qweight = torch.nn.Parameter(codes.sum(dim=1, dtype=torch.int32), requires_grad=False)  # disjoint bits
    zeros = torch.full((in_features // group, out_features // 8), 0x77777777, dtype=torch.int32, device=w.device)
    layer.qzeros = torch.nn.Parameter(zeros, requires_grad=False)  # every zero point 8, stored as 7
    layer.scales = torch.nn.Parameter(scales, requires_grad=False)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer


def swap_w4a16_(model: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Module]:
    """Every ``nn.Linear`` under ``prefix`` replaced by its 4-bit layer; returns the replaced modules by name, for
    ``restore_modules_``."""
    replaced = {}
    for name, module in list(model.named_modules()):
        if name.startswith(prefix) and isinstance(module, torch.nn.Linear):
            replaced[name] = module
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, w4a16_layer(module))
    return replaced


def restore_modules_(model: torch.nn.Module, modules: dict[str, torch.nn.Module]) -> None:
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
