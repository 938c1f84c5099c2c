"""Visual token files (glm_image_core.tokens): what Save Visual Tokens writes loads back unchanged, and every file
that breaks one of the format's rules is refused with an InvalidInputError that names the file and the rule, never
with another exception and never with a tensor that could reach a model (ids outside the VQ codebook would index past
the DiT's embedding table).

`mutated_token_files` writes the fuzz corpus (seeded, the same files every run); the host test of Load Visual Tokens
(test_nodes_tokens.py) feeds the same files through the node.
"""

import json
import random
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import glm_image_core.tokens as tokens_module
from glm_image_core.ar import sample_seeds
from glm_image_core.errors import InvalidInputError
from glm_image_core.tokens import Reference, VisualTokens, read_tokens, write_tokens

SIZE = 512
CELLS, GRID, PREVIEW = (SIZE // 16) ** 2, (SIZE // 32) ** 2, 16 * 16  # prior, target and preview ids of 512x512
REFUSED = "is not a valid GLM-Image tokens file"


def valid_tokens(references: int = 0, grids: int = 1, seed: int = 0) -> VisualTokens:
    """Tokens as the AR makes them: the target grid, its x2 upsampling as prior ids, a preview (text-to-image)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 16384, (grids, SIZE // 32, SIZE // 32), generator=g)
    prior = target.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(grids, -1)
    preview = torch.randint(0, 16384, (grids, 0 if references else PREVIEW), generator=g)
    refs = [
        Reference(torch.rand(1, 64, 96, 3, generator=g), torch.randint(0, 16384, (1, 24), generator=g))
        for _ in range(references)
    ]
    return VisualTokens(prior, target.reshape(grids, -1), preview, SIZE, SIZE, 'a sign "OPEN"', 7, refs)


def as_file_contents(tokens: VisualTokens) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the metadata object write_tokens stores, to mutate."""
    tensors = {
        "prior_token_ids": tokens.prior_token_ids,
        "target_ids": tokens.target_ids,
        "preview_ids": tokens.preview_ids,
    }
    for i, ref in enumerate(tokens.references):
        tensors[f"reference.{i}.pixels"] = ref.pixels
        tensors[f"reference.{i}.prior_token_ids"] = ref.prior_token_ids
    info = {
        "prompt": tokens.prompt,
        "height": tokens.height,
        "width": tokens.width,
        "seed": tokens.seed,
        "sample_seeds": tokens.generator_seeds(),
        "references": len(tokens.references),
        "format": "glm_image_tokens/2",
    }
    return tensors, info


# --- the fuzz corpus ------------------------------------------------------------------------------------------------

ID_KEYS = ["prior_token_ids", "target_ids", "preview_ids", "reference.0.prior_token_ids"]
BAD_IDS = [16384, 16385, 99999, 2**31 - 1, 2**40, -1, -16384, -(2**40)]
BAD_METADATA_TEXT = [
    "",
    "{",
    '{"height": 512',
    "[" * 100_000 + "]" * 100_000,
    '{"a": ' * 50_000 + "1" + "}" * 50_000,
    "null",
    "42",
    '"text"',
    "[]",
    "NaN",
    r'"\ud800"',
    '{"height": ' + "9" * 5000 + "}",
    "\x00\x01\x02",
]
BAD_VALUES = {
    "height": [500, 511, 0, -512, 4096, 512.0, "512", True, None, float("inf"), [512], 10**30],
    "width": [520, 32, 2**63, "wide", 1e3, False],
    "seed": [-1, 2**64, 1.5, "7", None, [7]],
    "references": [-1, 2, 3, 10**12, 0.0, "0", None],  # the bases have 0 and 1
    "prompt": [None, 5, ["a"], {"text": "a"}],
    "format": ["glm_image_tokens/3", "glm_image_tokens/1", "", None, 1, "pt"],  # a /1 file has no sample_seeds
    "sample_seeds": [[], [7] * 5, [-1, 7], [2**64, 7], "7", None, [1.5, 7], [True, 7], {"0": 7}],  # grids: 1 or 2
}


def _shape_mutations(tensors: dict[str, torch.Tensor], rng: random.Random) -> list[tuple[str, dict]]:
    key = rng.choice(sorted(tensors))
    t = tensors[key]
    flat = t.reshape(-1)
    out = [
        ("one_column_more", {**tensors, key: torch.cat([t, torch.zeros((*t.shape[:-1], 1), dtype=t.dtype)], -1)}),
        ("flattened", {**tensors, key: flat}),
        ("extra_axis", {**tensors, key: t[None]}),
    ]
    if t.ndim == 2 and t.shape[1] > 1:
        out.append(("one_column_less", {**tensors, key: t[:, :-1].contiguous()}))
        out.append(("transposed", {**tensors, key: t.t().contiguous()}))
    if t.shape[0] > 0:
        out.append(("no_grid", {**tensors, key: t[:0].contiguous()}))
    return out


def mutated_token_files(folder: Path, count: int = 240, seed: int = 0) -> list[Path]:
    """`count` broken .glm_tokens files in `folder`, from the valid text-to-image and edit files: ids out of range
    or negative, float ids and integer pixels, wrong shapes, missing and extra tensors, broken and hostile metadata,
    truncated files, a pickle and other files under the name."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    bases = [as_file_contents(valid_tokens()), as_file_contents(valid_tokens(references=1, grids=2, seed=1))]
    valid_bytes = []
    for i, (tensors, info) in enumerate(bases):
        path = folder / f"valid_{i}.bin"
        save_file(tensors, path, metadata={"glm_image_tokens": json.dumps(info)})
        valid_bytes.append(path.read_bytes())
        path.unlink()
    files = []

    def write(kind: str, tensors=None, info=None, raw: bytes | None = None, metadata=None):
        path = folder / f"fuzz_{len(files):03d}_{kind}.glm_tokens"
        if raw is not None:
            path.write_bytes(raw)
        else:
            text = metadata if metadata is not None else json.dumps(info)
            save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"glm_image_tokens": text})
        files.append(path)

    while len(files) < count:
        tensors, info = rng.choice(bases)
        kind = rng.randrange(11)
        if kind == 0:  # an id outside the codebook, anywhere in any id tensor
            key = rng.choice([k for k in ID_KEYS if k in tensors and tensors[k].numel()])
            changed = tensors[key].clone().reshape(-1)
            changed[rng.randrange(changed.numel())] = rng.choice(BAD_IDS)
            write(f"id_{key}", {**tensors, key: changed.reshape(tensors[key].shape)}, info)
        elif kind == 1:  # floats where ids belong, integers where pixels belong
            key = rng.choice(sorted(tensors))
            dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16, torch.float64])
            if "pixels" in key:
                dtype = rng.choice([torch.int64, torch.uint8, torch.int32])
            write(f"dtype_{key}", {**tensors, key: tensors[key].to(dtype)}, info)
        elif kind == 2:
            name, changed = rng.choice(_shape_mutations(tensors, rng))
            write(f"shape_{name}", changed, info)
        elif kind == 3:  # a tensor missing, or one too many
            if rng.random() < 0.5:
                key = rng.choice(sorted(tensors))
                write("missing", {k: v for k, v in tensors.items() if k != key}, info)
            else:
                extra = rng.choice(["extra", "reference.9.pixels", "prior_token_ids ", "__metadata__x"])
                write("extra", {**tensors, extra: torch.zeros(1, 4, dtype=torch.int64)}, info)
        elif kind == 4:  # metadata that is not the expected JSON object
            write("metadata_text", tensors, metadata=rng.choice(BAD_METADATA_TEXT))
        elif kind == 5:  # one value of the wrong type or range
            key = rng.choice(sorted(BAD_VALUES))
            write(f"value_{key}", tensors, {**info, key: rng.choice(BAD_VALUES[key])})
        elif kind == 6:  # a key missing or one too many
            if rng.random() < 0.5:
                key = rng.choice(sorted(info))
                write("metadata_missing", tensors, {k: v for k, v in info.items() if k != key})
            else:
                write("metadata_extra", tensors, {**info, rng.choice(["path", "__class__", "x" * 300]): "/etc/passwd"})
        elif kind == 7:  # truncated
            data = rng.choice(valid_bytes)
            write("truncated", raw=data[: rng.randrange(len(data))])
        elif kind == 8:  # a header that claims the impossible
            data = rng.choice(valid_bytes)
            length = rng.choice([0, 1, 2**40, 2**63, len(data)])
            write("header_length", raw=struct.pack("<Q", length) + data[8:])
        elif kind == 9:  # no metadata, or the tokens under another metadata key
            save_or_other = rng.random() < 0.5
            path = folder / f"fuzz_{len(files):03d}_no_metadata.glm_tokens"
            save_file(
                {k: v.contiguous() for k, v in tensors.items()},
                path,
                metadata={"other": "x"} if save_or_other else None,
            )
            files.append(path)
        else:  # something else under the name: a pickle, an image, text, nothing
            path = folder / f"fuzz_{len(files):03d}_other.glm_tokens"
            choice = rng.randrange(4)
            if choice == 0:
                torch.save(dict(tensors), path)  # a pickle renamed
            else:
                path.write_bytes([b"\x89PNG\r\n\x1a\n" + bytes(64), b"hello, tokens", b""][choice - 1])
            files.append(path)
    return files


# --- tests ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("references", [0, 1])
def test_written_tokens_read_back_unchanged(tmp_path, references):
    tokens = valid_tokens(references=references, grids=2)

    loaded = read_tokens(write_tokens(tokens, tmp_path / "t.glm_tokens"))

    for name in ("prior_token_ids", "target_ids", "preview_ids"):
        assert torch.equal(getattr(loaded, name), getattr(tokens, name)) and getattr(loaded, name).dtype == torch.int64
    assert (loaded.height, loaded.width, loaded.prompt, loaded.seed) == (SIZE, SIZE, 'a sign "OPEN"', 7)
    assert [
        torch.equal(a.pixels, b.pixels) and torch.equal(a.prior_token_ids, b.prior_token_ids)
        for a, b in zip(loaded.references, tokens.references)
    ] == [True] * references


def test_each_grid_reads_back_with_the_seed_it_was_sampled_with(tmp_path):
    tokens = valid_tokens(grids=3)
    tokens.sample_seeds = [7, 123, 2**64 - 1]

    assert read_tokens(write_tokens(tokens, tmp_path / "t.glm_tokens")).sample_seeds == [7, 123, 2**64 - 1]


def test_tokens_without_their_sample_seeds_are_written_with_the_documented_rule(tmp_path):
    tokens = valid_tokens(grids=3)  # seed 7, sample_seeds None

    assert read_tokens(write_tokens(tokens, tmp_path / "t.glm_tokens")).sample_seeds == sample_seeds(7, 3)


def test_a_file_of_the_first_format_reads_back_with_seed_plus_i(tmp_path):
    """Files written before the sample seeds were hashed: their grid i was sampled with seed + i."""
    tensors, info = as_file_contents(valid_tokens(grids=3))
    del info["sample_seeds"]
    save_file(
        tensors,
        tmp_path / "old.glm_tokens",
        metadata={"glm_image_tokens": json.dumps({**info, "format": "glm_image_tokens/1"})},
    )

    assert read_tokens(tmp_path / "old.glm_tokens").sample_seeds == [7, 8, 9]


def test_sample_seeds_that_do_not_match_the_grids_are_refused(tmp_path):
    tensors, info = as_file_contents(valid_tokens(grids=2))
    save_file(
        tensors, tmp_path / "short.glm_tokens", metadata={"glm_image_tokens": json.dumps({**info, "sample_seeds": [7]})}
    )

    with pytest.raises(InvalidInputError, match="lists 1 sample_seeds for its 2 grids"):
        read_tokens(tmp_path / "short.glm_tokens")


def test_every_mutated_file_is_refused_with_a_message_naming_it(tmp_path):
    files = mutated_token_files(tmp_path)
    assert len(files) >= 200
    rules = set()
    for path in files:
        with pytest.raises(InvalidInputError) as refused:
            read_tokens(path)
        message = str(refused.value)
        assert message.startswith(f"{path.name} {REFUSED}: "), message
        rules.add(re.sub(r"\d+|'[^']*'", "_", message.split(": ", 1)[1]))
    assert len(rules) >= 30, rules  # the corpus reaches many different rules, not one early check


def test_an_id_outside_the_codebook_is_refused_naming_the_tensor_and_the_range(tmp_path):
    tensors, info = as_file_contents(valid_tokens())
    tensors["prior_token_ids"] = tensors["prior_token_ids"].clone()
    tensors["prior_token_ids"][0, 5] = 99999
    save_file(tensors, tmp_path / "big.glm_tokens", metadata={"glm_image_tokens": json.dumps(info)})

    with pytest.raises(InvalidInputError, match=r"prior_token_ids holds ids from \d+ to 99999; .* 0\.\.16383"):
        read_tokens(tmp_path / "big.glm_tokens")


def test_a_shape_that_does_not_fit_the_size_is_refused_before_a_tensor_is_read(tmp_path, monkeypatch):
    tensors, info = as_file_contents(valid_tokens())
    save_file(tensors, tmp_path / "wide.glm_tokens", metadata={"glm_image_tokens": json.dumps({**info, "width": 768})})
    read = []

    class RecordingSafeOpen:
        def __init__(self, *args, **kwargs):
            self.file = safe_open(*args, **kwargs)

        def __enter__(self):
            self.opened = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def get_tensor(self, key):
            read.append(key)
            return self.opened.get_tensor(key)

        def __getattr__(self, name):
            return getattr(self.opened, name)

    monkeypatch.setattr(tokens_module, "safe_open", RecordingSafeOpen)

    with pytest.raises(
        InvalidInputError, match=r"prior_token_ids has shape \[1, 1024\]; a 768x512 file needs \[N, 1536\]"
    ):
        read_tokens(tmp_path / "wide.glm_tokens")
    assert read == []
