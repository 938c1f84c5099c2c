"""`python -m glm_image_core generate`: the smoke run a newcomer starts with, and its error path."""

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from glm_image_core.__main__ import main


def test_generate_writes_an_image_from_the_tiny_folder(tiny_model_dir, tmp_path):
    out = tmp_path / "out.png"
    args = ["generate", "--model", str(tiny_model_dir), "--prompt", 'A sign "Hi"', "--width", "512", "--height", "512"]
    assert main([*args, "--steps", "2", "--seed", "3", "-o", str(out)]) == 0
    assert Image.open(out).size == (512, 512)


def test_bad_size_is_a_clear_error_not_a_traceback(tiny_model_dir, tmp_path, capsys):
    args = ["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--width", "500", "--height", "512"]
    assert main([*args, "-o", str(tmp_path / "x.png")]) == 2
    assert "width 500 is not a multiple of 32" in capsys.readouterr().err


def test_export_ar_int8_writes_a_file_the_loader_reads(tiny_model_dir, tmp_path):
    from glm_image_core.loading import load_ar_model

    out = tmp_path / "GLM-Image.ar_int8.safetensors"
    assert main(["export-ar-int8", "--model", str(tiny_model_dir), "-o", str(out)]) == 0
    model = load_ar_model(out)
    assert model.model.language_model.layers[0].mlp.down_proj.weight.dtype == torch.int8


def test_export_ar_int8_of_a_folder_without_the_ar_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "x.ar_int8.safetensors"
    assert main(["export-ar-int8", "--model", str(tiny_model_dir / "vae"), "-o", str(out)]) == 2
    assert "not of the AR model" in capsys.readouterr().err and not out.exists()


def test_export_dit_writes_a_per_layer_file_the_loader_reads(tiny_model_dir, tmp_path):
    from glm_image_core.loading import load_transformer

    out = tmp_path / "dit_int8.safetensors"
    assert main(["export-dit", "--model", str(tiny_model_dir), "--quant", "int8_tensorwise", "-o", str(out)]) == 0
    with safe_open(out, "pt") as f:
        assert f.get_tensor("proj_out.weight").dtype == torch.int8 and "proj_out.comfy_quant" in f.keys()
    assert load_transformer(out).proj_out.weight.dtype == torch.bfloat16


def test_generate_takes_dit_and_ar_loras_with_their_strengths(tiny_model_dir, tmp_path):
    from glm_image_core.loading import load_ar_model, load_transformer
    from tests.test_ar_lora import ADAPTERS, make_adapter
    from tests.test_pipeline import dit_lora_file

    dit_lora_file(load_transformer(tiny_model_dir, dtype=torch.float32), tmp_path / "style.safetensors")
    make_adapter(
        load_ar_model(tiny_model_dir, dtype=torch.float32),
        tmp_path / "ar_style",
        **ADAPTERS["attention, a list, dropout"],
    )
    args = ["generate", "--model", str(tiny_model_dir), "--prompt", "A 'sign'", "--width", "512", "--height", "512"]
    args += ["--steps", "2", "--seed", "3"]
    plain, adapted = tmp_path / "plain.png", tmp_path / "adapted.png"
    assert main([*args, "-o", str(plain)]) == 0
    loras = ["--lora", f"{tmp_path / 'style.safetensors'}:0.5", "--ar-lora", str(tmp_path / "ar_style")]
    assert main([*args, *loras, "-o", str(adapted)]) == 0
    differ = np.abs(np.asarray(Image.open(plain), np.float32) - np.asarray(Image.open(adapted), np.float32)).max()
    assert differ > 10
