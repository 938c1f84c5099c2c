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
