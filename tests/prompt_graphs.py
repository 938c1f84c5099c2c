"""Prompt graphs in ComfyUI's API format for the host tests, built from the example workflows' API twins in
tests/workflows/ (which tests/test_workflows.py keeps equal to example_workflows/): the graphs users run, at a CPU
test size. A change of a node's inputs is made in the twins, not in every test that queues a graph."""

from __future__ import annotations

import json
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parent / "workflows"


def example_prompt(stem: str, width: int, height: int, steps: int = 2, **inputs: dict) -> dict:
    """The API twin of the example ``stem``, fp32 on the CPU, at ``width`` x ``height`` with ``steps`` sampling steps;
    ``inputs`` updates the inputs of the nodes of a class (``KSampler={"seed": 1}``)."""
    graph = json.loads((WORKFLOWS / f"{stem}.json").read_text())
    missing = set(inputs) - {node["class_type"] for node in graph.values()}
    assert not missing, f"the {stem} example has no {sorted(missing)}"
    for node in graph.values():
        node_inputs = node["inputs"]
        match node["class_type"]:
            case "GLMImageARModelLoader":
                node_inputs.update(dtype="fp32", device="cpu")
            case "GLMImageGlyphEncoderLoader":
                node_inputs.update(dtype="fp32")
            case "GLMImageGenerateTokens" | "GLMImageModelSampling" | "GLMImageEmptyLatent":
                node_inputs.update(width=width, height=height)
            case "KSampler":
                node_inputs.update(steps=steps)
        node_inputs.update(inputs.get(node["class_type"], {}))
    return graph


def upstream(graph: dict, *outputs: str) -> dict:
    """The nodes of ``graph`` that the nodes ``outputs`` (ids) need: they and every node they link to, transitively."""
    needed, todo = set(), list(outputs)
    while todo:
        node = todo.pop()
        if node not in needed:
            needed.add(node)
            todo.extend(value[0] for value in graph[node]["inputs"].values() if isinstance(value, list))
    return {node: graph[node] for node in graph if node in needed}
