"""Load GLM-Image LoRA on every weight format of the DiT, through ComfyUI: bf16 (merged as ComfyUI merges), fp8 on
the fly, ComfyUI's scaled-fp8 and per-layer files (0.33), the 4-bit and SDNQ checkpoints (applied to the dequantised weight
in the forward, the stored bits unchanged). The reference, per format: the weights that format stands for,
dequantised to float32, plus strength * alpha / rank * B @ A for each LoRA, in the plain core DiT; compared is what
the LoRAs change in the output (with them, less without), so that how ComfyUI runs a format itself (fp8 inputs, the
order of its products) is not counted against the LoRA."""

import pytest
import torch

from tests import comfy_host

comfy_host.require_comfyui()
pytestmark = [pytest.mark.host, pytest.mark.vram]

import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.ops  # noqa: E402

from glm_image_core.loading import load_transformer, save_single_file  # noqa: E402
from tests.comfy_glm import sample  # noqa: E402
from tests.test_comfy_lora import ALPHA, RANK, peft_keys  # noqa: E402
from tests.test_comfy_weight_formats import load, velocity  # noqa: E402
from tests.test_scaled_fp8 import dit_inputs, relative_error  # noqa: E402

lora_nodes = comfy_host.import_pack_module("nodes.lora_nodes")
model_sampling = comfy_host.import_pack_module("nodes.model_sampling")
MIXED_OPS = hasattr(comfy.ops, "mixed_precision_ops")
STRENGTHS = (0.7, -0.4)  # two LoRAs stacked
# format: (the file written here or None, weight_dtype, whether this ComfyUI has it, the relative L2 allowed)
FORMATS = {
    "bf16": (None, "default", True, 1e-4),  # ~3e-6: ComfyUI computes in float32 on a CPU, as the reference does
    "fp8 on the fly": (None, "fp8_e4m3fn", True, 2e-2),  # its weights fp8, computed in bf16 on a CPU: 1.1%
    "scaled fp8": ("scaled_fp8", "default", True, 1e-2),  # 0.3.x scales the activations, not the weight: 0.5%
    "comfy_quant int8": ("int8_tensorwise", "default", MIXED_OPS, 1e-4),
    "comfy_quant fp8": ("float8_e4m3fn", "default", MIXED_OPS, 1e-4),
    "4-bit": ("4-bit", "default", True, 1e-4),
    "SDNQ": ("sdnq", "default", True, 1e-4),
}
PACKED = ("W4A16Linear", "SDNQLinear")  # layers that hold codes, not a weight
# With a LoRA, ComfyUI's int8 layer takes the dequantised weight (its W8A8 kernel takes no weight function), so
# there the whole output is compared; elsewhere what the LoRAs change, so that how ComfyUI runs a format without
# them (fp8 inputs, the order of its products) is not counted against the LoRA.
WHOLE_OUTPUT = ("comfy_quant int8",)


def dit_files(name, tiny_model_dir, autoround_model_dir, sdnq_model_dir, tmp_path):
    """(the DiT's files in this format, the float32 core DiT of the weights they stand for)."""
    written, weight_dtype, *_ = FORMATS[name]
    folder = tiny_model_dir / "transformer"
    if written is None:
        reference = load_transformer(folder, dtype=torch.float32)
        if weight_dtype == "fp8_e4m3fn":  # ComfyUI stores every Linear weight in fp8, unscaled
            for module in reference.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.data = module.weight.to(torch.float8_e4m3fn).float()
        return folder, reference
    if written in ("4-bit", "sdnq"):
        root = autoround_model_dir if written == "4-bit" else sdnq_model_dir
        return root / "transformer", load_transformer(root, dtype=torch.float32)
    options = {"scaled_fp8": True} if written == "scaled_fp8" else {"quant": written}
    path = save_single_file(folder, tmp_path / f"{written}.safetensors", **options)
    return path, load_transformer(path, dtype=torch.float32)


def random_lora(reference, seed):
    """A rank-4 pair (down [rank, in], up [out, rank]) for every Linear layer."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: (
            torch.randn(RANK, m.in_features, generator=g) * 0.1,
            torch.randn(m.out_features, RANK, generator=g) * 0.1,
        )
        for name, m in reference.named_modules()
        if isinstance(m, torch.nn.Linear) or type(m).__name__ in PACKED
    }


def with_updates(reference, loras):
    """The core DiT with every Linear weight plus sum(strength * alpha / rank * up @ down), in float32."""
    for name, module in list(reference.named_modules()):
        if name not in loras[0]:
            continue
        deltas = [s * ALPHA / RANK * (lora[name][1] @ lora[name][0]) for lora, s in zip(loras, STRENGTHS)]
        if type(module).__name__ in PACKED:  # the plain layer of its dequantised weight
            linear = torch.nn.Linear(module.in_features, module.out_features, module.bias is not None)
            linear.weight.data, linear.bias = module.dequantise(), module.bias
            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent), child, linear)
            module = linear
        module.weight.data = module.weight.float() + sum(deltas)
    return reference


@pytest.mark.parametrize("name", list(FORMATS))
def test_two_stacked_loras_equal_the_dequantised_weights_plus_their_updates(
    name, tiny_model_dir, autoround_model_dir, sdnq_model_dir, tmp_path
):
    if not FORMATS[name][2]:
        pytest.skip("this ComfyUI has no mixed-precision layers")
    files, reference = dit_files(name, tiny_model_dir, autoround_model_dir, sdnq_model_dir, tmp_path)
    options = None if FORMATS[name][1] != "default" else {"dtype": torch.float32}  # an option would override fp8
    patcher = load(files, FORMATS[name][1], model_options=options)
    stored = {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    unpatched = velocity(patcher)
    loras = [random_lora(reference, seed) for seed in (1, 2)]
    patched = patcher
    for lora, strength in zip(loras, STRENGTHS):
        patched = lora_nodes.apply_lora(patched, peft_keys(lora), strength, "style.safetensors")
    comfy.model_management.load_models_gpu([patched], force_full_load=True)
    with torch.no_grad():
        plain = reference(*dit_inputs())
        expected = with_updates(reference, loras)(*dit_inputs())
    got = velocity(patched)
    if name not in WHOLE_OUTPUT:
        got, expected = got - unpatched, expected - plain
    error = relative_error(got, expected)
    print(f"{name}: two LoRAs, within {error:.2g}")
    assert error <= FORMATS[name][3]

    comfy.model_management.unload_all_models()  # the input model: untouched, before and after the patched one ran
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    after = patcher.model.diffusion_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in stored.items() if not hasattr(v, "_layout_cls"))
    assert torch.equal(velocity(patcher), unpatched)


@pytest.mark.parametrize("name", ["4-bit", "SDNQ"])
def test_strength_zero_adds_nothing_on_packed_layers(
    name, tiny_model_dir, autoround_model_dir, sdnq_model_dir, tmp_path
):
    files, reference = dit_files(name, tiny_model_dir, autoround_model_dir, sdnq_model_dir, tmp_path)
    patcher = load(files, model_options={"dtype": torch.float32})
    expected = velocity(patcher)
    patched = lora_nodes.apply_lora(patcher, peft_keys(random_lora(reference, 1)), 0.0)
    comfy.model_management.load_models_gpu([patched], force_full_load=True)
    assert torch.equal(velocity(patched), expected)


@pytest.mark.parametrize("name", ["bf16", "fp8 on the fly", "4-bit", "SDNQ"])
def test_the_samplers_memory_estimate_counts_a_lora_applied_in_the_forward(
    name, tiny_model_dir, autoround_model_dir, sdnq_model_dir, tmp_path, monkeypatch
):
    """What KSampler's preparation asks of ComfyUI's memory management grows by three copies of the largest weight a
    LoRA patch gets in the forward (in the dtype it gets it: float32 in packed layers, the compute dtype in ComfyUI's
    weight functions), and not at all with a LoRA merged into bf16 weights; the estimate is the plain one again
    after."""
    files, reference = dit_files(name, tiny_model_dir, autoround_model_dir, sdnq_model_dir, tmp_path)
    options = None if FORMATS[name][1] != "default" else {"dtype": torch.float32}
    patcher = load(files, FORMATS[name][1], model_options=options)
    patcher.add_object_patch("model_sampling", model_sampling.model_sampling_for_size(64, 64))
    patched = lora_nodes.apply_lora(patcher, peft_keys(random_lora(reference, 1)), 0.7)
    asked = []
    load_models_gpu = comfy.model_management.load_models_gpu

    def recorded(models, memory_required=0, **kwargs):
        asked.append(memory_required)
        return load_models_gpu(models, memory_required=memory_required, **kwargs)

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", recorded)
    patched_weights = [0]  # the bytes of each weight a LoRA patch gets in the forward, in the dtype it gets it
    patch = comfy.model_patcher.LowVramPatch.__call__
    monkeypatch.setattr(
        comfy.model_patcher.LowVramPatch,
        "__call__",
        lambda self, weight: patched_weights.append(weight.nbytes) or patch(self, weight),
    )
    for model in (patcher, patched, patcher):
        sample(model, 64, 64, steps=1)
    assert asked[1] - asked[0] == lora_nodes.IN_FORWARD_COPIES * max(patched_weights)
    assert (max(patched_weights) == 0) == (name == "bf16")
    assert asked[2] == asked[0] and patched.model.in_forward_lora_bytes == 0
