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
