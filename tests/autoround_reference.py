"""Quantise a tiny GLM-Image folder with the `auto-round` library itself (RTN, iters=0): the 4-bit reference files.

    python tests/autoround_reference.py <tiny GLM-Image root> <output folder> <group size>

The output, <output folder>/GLM-Image-int4-AutoRound, is a copy of the root whose transformer/ and
vision_language_encoder/ are what AutoRound writes for them, in its `auto_round:auto_gptq` packing: the DiT's
`transformer_blocks` quantised (as in Intel/GLM-Image-int4-AutoRound's transformer/config.json), and the AR's text
decoder layers (AutoRound's GLM-Image handler). Run in a subprocess: AutoRound configures logging and may start
worker processes.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

AR_FILES = ("config.json", "generation_config.json", "quantization_config.json")


def quantise(source: Path, out: Path, group_size: int) -> None:
    from auto_round import AutoRound

    settings = dict(scheme="W4A16", iters=0, group_size=group_size, disable_opt_rtn=True, disable_model_free=True)
    shutil.copytree(source, out)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        # the DiT: AutoRound's diffusion flow, which takes the whole pipeline folder
        AutoRound(str(source), to_quant_block_names="transformer_blocks", **settings).quantize_and_save(
            str(scratch / "pipeline"), format="auto_round:auto_gptq"
        )
        shutil.rmtree(out / "transformer")
        shutil.copytree(scratch / "pipeline" / "transformer", out / "transformer")
        # the AR: AutoRound's multimodal flow, which wants the processor files beside the model's
        ar_in = scratch / "ar_in"
        shutil.copytree(source / "vision_language_encoder", ar_in)
        for file in (source / "processor").iterdir():
            shutil.copy(file, ar_in)
        AutoRound(str(ar_in), **settings).quantize_and_save(str(scratch / "ar"), format="auto_round:auto_gptq")
        (written,) = [p for p in (scratch / "ar").iterdir() if p.is_dir()]  # AutoRound names it after the scheme
        shutil.rmtree(out / "vision_language_encoder")
        (out / "vision_language_encoder").mkdir()
        for file in written.iterdir():
            if file.name in AR_FILES or file.suffix == ".safetensors" or file.name.endswith(".index.json"):
                shutil.copy(file, out / "vision_language_encoder")


if __name__ == "__main__":
    quantise(Path(sys.argv[1]), Path(sys.argv[2]) / "GLM-Image-int4-AutoRound", int(sys.argv[3]))
