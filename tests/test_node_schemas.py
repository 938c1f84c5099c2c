"""What the node definitions tell a user before anything runs: every input and every output explains itself."""

import pytest

from tests import comfy_host

comfy_host.require_comfyui()
pytestmark = pytest.mark.host

NODE_CLASSES = comfy_host.load_pack()


@pytest.mark.parametrize("node_id", sorted(NODE_CLASSES))
def test_every_input_and_output_has_a_tooltip(node_id):
    schema = NODE_CLASSES[node_id].define_schema()
    sockets = [("input", i.id, i.tooltip) for i in schema.inputs]
    sockets += [("output", o.display_name or o.io_type, o.tooltip) for o in schema.outputs]
    assert [(kind, name) for kind, name, tooltip in sockets if not (tooltip and tooltip.strip())] == []


@pytest.mark.parametrize("node_id", sorted(NODE_CLASSES))
def test_search_finds_every_node_by_glm_and_zhipu(node_id):
    from comfy_api.latest import io

    if "search_aliases" not in getattr(io.Schema, "__dataclass_fields__", {}):
        pytest.skip(f"ComfyUI {comfy_host.comfyui_version()} has no search aliases in its V3 schema")
    aliases = set(NODE_CLASSES[node_id].define_schema().search_aliases)
    assert {"glm", "zhipu", "智谱"} <= aliases
    own = aliases - set(comfy_host.import_pack_module("nodes.common").PACK_SEARCH_ALIASES)
    assert own  # the node's own names too, e.g. "ar tokens" for Generate Visual Tokens


def string_inputs(node_id: str) -> dict[str, dict]:
    """The node's text inputs as /object_info serves them to the front end: {name: options}."""
    info = NODE_CLASSES[node_id].GET_NODE_INFO_V1()["input"]
    return {name: spec[1] for group in info.values() for name, spec in group.items() if spec[0] == "STRING"}


@pytest.mark.parametrize("node_id, name", [("GLMImageGenerateTokens", "prompt"), ("GLMImageEncode", "override")])
def test_text_for_the_model_is_declared_without_dynamic_prompts(node_id, name):
    """The front end rewrites a widget's text before queueing only when its input says dynamicPrompts: true (it
    strips //... and /*...*/ and picks one branch of every {a|b}); poster text must reach the AR and the glyph encoder
    as typed (the browser check: tests/test_browser_prompt.py)."""
    assert string_inputs(node_id)[name]["dynamicPrompts"] is False


def test_no_text_input_of_the_pack_asks_for_dynamic_prompts():
    asking = [
        (node_id, name)
        for node_id in NODE_CLASSES
        for name, o in string_inputs(node_id).items()
        if o.get("dynamicPrompts")
    ]
    assert asking == []
