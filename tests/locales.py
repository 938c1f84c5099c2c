"""The node texts of the pack in the layout of ComfyUI's front-end locale files (`locales/<lang>/nodeDefs.json`):
{node_id: {display_name, description, inputs: {input_id: {name, tooltip}}, outputs: {"0": {name, tooltip}}}}.
Outputs are keyed by their index, inputs by their id, as the front end looks them up.

locales/en/nodeDefs.json is these texts as the schemas say them (the English UI shows the file, not the schema, so
the two must not drift; tests/test_locales.py compares them). After changing a name or tooltip, rewrite it with
  COMFYUI_PATH=/opt/ComfyUI python -m tests.locales
and translate the change in every other locales/<lang>/nodeDefs.json.
"""

import json
from pathlib import Path

LOCALES = Path(__file__).resolve().parents[1] / "locales"


def node_defs(node_classes: dict[str, type]) -> dict:
    """The English texts of every node, from its V3 schema."""
    defs = {}
    for node_id in sorted(node_classes):
        schema = node_classes[node_id].define_schema()
        defs[node_id] = {
            "display_name": schema.display_name,
            "description": schema.description,
            "inputs": {i.id: {"name": i.display_name or i.id, "tooltip": i.tooltip} for i in schema.inputs},
            "outputs": {
                str(k): {"name": o.display_name or o.io_type, "tooltip": o.tooltip}
                for k, o in enumerate(schema.outputs)
            },
        }
    return defs


def read(lang: str, name: str) -> dict:
    return json.loads((LOCALES / lang / name).read_text(encoding="utf-8"))


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    from tests import comfy_host

    comfy_host._import_comfyui()
    write_json(LOCALES / "en" / "nodeDefs.json", node_defs(comfy_host.load_pack()))
    print(f"wrote {LOCALES / 'en' / 'nodeDefs.json'}")
