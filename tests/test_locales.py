"""The pack speaks every language it ships (locales/<lang>/, served by ComfyUI at /i18n): every node, input and output
of the live schemas has a name and a tooltip in each locale, so a new input cannot ship untranslated; English says
exactly what the schemas say; the panel's strings exist, with the same placeholders, in every locale."""

import re

import pytest

from tests import comfy_host, locales

comfy_host.require_comfyui()
pytestmark = pytest.mark.host

NODE_CLASSES = comfy_host.load_pack()
LANGS = sorted(p.name for p in locales.LOCALES.iterdir() if p.is_dir())
SCHEMA_DEFS = locales.node_defs(NODE_CLASSES)


def leaves(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"a.b.c": text} of a nested dict of strings."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_the_pack_ships_english_and_chinese():
    assert {"en", "zh"} <= set(LANGS)


def test_english_node_texts_are_those_of_the_schemas():
    """Regenerate with `python -m tests.locales` after changing a schema's text (then translate the change)."""
    assert locales.read("en", "nodeDefs.json") == SCHEMA_DEFS


@pytest.mark.parametrize("lang", LANGS)
def test_every_node_input_and_output_has_a_name_and_tooltip(lang):
    translated = leaves(locales.read(lang, "nodeDefs.json"))
    wanted = leaves(SCHEMA_DEFS)
    assert sorted(key for key in wanted if not (translated.get(key) or "").strip()) == []
    assert sorted(set(translated) - set(wanted)) == []  # nothing stale: entries of inputs that no longer exist


@pytest.mark.parametrize("lang", LANGS)
def test_every_category_is_translated(lang):
    categories = locales.read(lang, "main.json")["nodeCategories"]
    segments = {part for cls in NODE_CLASSES.values() for part in cls.define_schema().category.split("/")}
    assert sorted(segments - set(categories)) == []


@pytest.mark.parametrize("lang", LANGS)
def test_panel_strings_have_the_english_keys_and_placeholders(lang):
    english = leaves(locales.read("en", "main.json")["glmImage"])
    translated = leaves(locales.read(lang, "main.json")["glmImage"])
    assert set(translated) == set(english)
    placeholders = {key: set(re.findall(r"\{(\w+)\}", text)) for key, text in english.items()}
    assert {key: set(re.findall(r"\{(\w+)\}", text)) for key, text in translated.items()} == placeholders
