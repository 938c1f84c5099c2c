"""The pack's requirements coexist with other packs: lower bounds only (ComfyUI-Manager's downgrade guard reads only
a requirement's first operator, so `transformers>=5,<6` would let it pull a later transformers 6 back to 5.x), the
same in requirements.txt (what the Manager and comfy-cli install) and pyproject.toml (what pip installs), and the
transformers bound the same one the pack's version check names."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement

from glm_image_core.dependencies import TRANSFORMERS_NEEDED

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
CAPPING = {"<", "<=", "==", "===", "~="}  # operators that exclude later releases
# A cap is allowed only with a known break: package -> where the break is documented and the test that shows it.
KNOWN_BREAKS: dict[str, str] = {}
LEFT_TO_COMFYUI = {"torch"}  # in pyproject.toml only: ComfyUI brings its own build (see requirements.txt's comment)


def requirements_txt() -> dict[str, Requirement]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    found = [Requirement(line.split("#")[0]) for line in lines if line.split("#")[0].strip()]
    return {r.name.lower(): r for r in found}


def pyproject_dependencies() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {r.name.lower(): r for r in map(Requirement, project["dependencies"])}


def caps(requirements: dict[str, Requirement]) -> list[str]:
    return [
        f"{name}{r.specifier}"
        for name, r in requirements.items()
        if name not in KNOWN_BREAKS and any(s.operator in CAPPING for s in r.specifier)
    ]


def test_requirements_txt_has_no_undocumented_cap():
    assert caps(requirements_txt()) == []


def test_pyproject_dependencies_have_no_undocumented_cap():
    assert caps(pyproject_dependencies()) == []


def test_requirements_txt_lists_pyproject_dependencies_less_torch():
    expected = {name: str(r) for name, r in pyproject_dependencies().items() if name not in LEFT_TO_COMFYUI}
    assert {name: str(r) for name, r in requirements_txt().items()} == expected


def test_torch_left_to_comfyui_is_explained_in_requirements_txt():
    comments = " ".join(line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("#"))
    assert all(name in comments for name in LEFT_TO_COMFYUI)


@pytest.mark.parametrize("source", [requirements_txt, pyproject_dependencies])
def test_transformers_bound_is_the_one_the_version_check_names(source):
    assert str(source()["transformers"].specifier) == f">={TRANSFORMERS_NEEDED}"
