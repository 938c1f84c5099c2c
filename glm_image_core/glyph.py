"""Glyph text encoding (docs/how-it-works.md, step 4): quoted spans of the prompt -> Glyph-ByT5 (T5 encoder) embeddings.

Reproduces diffusers' ``GlmImagePipeline.get_glyph_texts`` and ``_get_glyph_embeds`` exactly, odd parts included,
so the DiT sees the same text stream it was trained with. The one deliberate difference is the batch form:
``encode_glyphs_batch`` right-pads and returns a boolean key mask, because the reference's float mask masks nothing
(diffusers issue 13587).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .errors import InvalidInputError

# The four quote styles, in the reference's order: all '...' spans first, then “...”, then "...", then 「...」.
# The order matters: the spans are encoded one after another and their embeddings joined in this order.
GLYPH_QUOTE_PATTERNS = (
    re.compile(r"'([^']*)'"),
    re.compile(r"\u201c([^\u201c\u201d]*)\u201d"),
    re.compile(r'"([^"]*)"'),
    re.compile(r"「([^「」]*)」"),
)

GLYPH_MAX_LENGTH = 2048  # bytes (ByT5 tokens) per span, end-of-sequence token included, as in the reference


def extract_glyph_texts(prompt: str) -> list[str]:
    """The text inside quotes, grouped by quote style (see ``GLYPH_QUOTE_PATTERNS``), not by position in the prompt.

    ``'Hello' and “World”`` -> ``["Hello", "World"]``; empty quotes give an empty span ``""``; no quotes -> ``[]``.
    """
    return [span for pattern in GLYPH_QUOTE_PATTERNS for span in pattern.findall(prompt)]


def tokenize_glyph_texts(
    texts: Sequence[str], tokenizer, max_length: int = GLYPH_MAX_LENGTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """ByT5 token ids of each span, padded into one batch: ``(input_ids, attention_mask)``, both int64 ``[N, L]``.

    No spans -> one empty span ``[""]`` (just the end-of-sequence token). Each span is tokenised on its own and
    truncated to ``max_length``; shorter rows are right-padded with the pad id and mask 0.
    """
    texts = list(texts) or [""]
    rows = tokenizer(texts, max_length=max_length, truncation=True).input_ids
    pad_id = tokenizer.pad_token_id
    # The reference prepends one pad token to EVERY span when the NUMBER OF SPANS is even: it computes
    # `(len(input_ids) + 1) % 2` on the list of spans, not on each span's length (probably meant per span, to make
    # lengths even). The prefix is a real position (mask 1) and its encoder output is kept; reproduced as is.
    prefix = [pad_id] * ((len(rows) + 1) % 2)
    rows = [prefix + row for row in rows]
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], dtype=torch.long)
    attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], dtype=torch.long)
    return input_ids, attention_mask


def glyph_texts_for(prompt_or_texts: str | Sequence[str]) -> list[str]:
    """The spans to encode: extracted from a prompt string, or taken as given (the "glyph text override")."""
    if isinstance(prompt_or_texts, str):
        return extract_glyph_texts(prompt_or_texts)
    return [str(text) for text in prompt_or_texts]


GLYPH_BATCH_TOKENS = 2048  # padded tokens (spans x the longest of them) per encoder call, or one longer span


def length_batches(lengths: Sequence[int], budget: int = GLYPH_BATCH_TOKENS) -> list[list[int]]:
    """Spans grouped for the encoder: indices into ``lengths``, each group padded to its longest span.

    Spans go longest first into a group while the group's padded size (spans x its longest) stays within ``budget``
    (a span longer than the budget goes alone). So the padding and the encoder's activations are bounded by those of
    one span of ``budget`` tokens, however many spans there are, instead of growing with spans x the longest span.
    Within a group the spans keep the prompt's order (when every span fits one group, it is the reference's batch).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return [sorted(group) for group in groups]


def span_lengths(prompt_or_texts: str | Sequence[str], tokenizer, max_length: int = GLYPH_MAX_LENGTH) -> list[int]:
    """Tokens of each span ``encode_glyphs`` encodes for this prompt or override (pad prefix included)."""
    return tokenize_glyph_texts(glyph_texts_for(prompt_or_texts), tokenizer, max_length)[1].sum(dim=1).tolist()


@torch.no_grad()
def encode_glyphs(
    prompt_or_texts: str | Sequence[str], text_encoder, tokenizer, max_length: int = GLYPH_MAX_LENGTH
) -> torch.Tensor:
    """Glyph embeddings of one prompt: ``[1, T, d_model]`` in the encoder's dtype, on its device.

    Args:
        prompt_or_texts: a prompt (its quoted spans are extracted) or a list of glyph strings used as is
            (an override; an empty list encodes ``""`` like a prompt without quotes).
        text_encoder: a ``transformers.T5EncoderModel`` (the Glyph-ByT5 encoder).
        tokenizer: a ``transformers.ByT5Tokenizer``.

    Only the non-pad positions are kept and joined span after span, so ``T`` is the total token count (plus the
    reference's pad prefix, see ``tokenize_glyph_texts``). The reference encodes every span in one batch padded to
    the longest; here spans of similar length are encoded together (``length_batches``): with the attention mask,
    a span's embedding does not depend on its padding, so the result is the reference's (to float rounding; the
    same bits when all spans fit one batch) at a bounded cost in memory.
    """
    input_ids, attention_mask = tokenize_glyph_texts(glyph_texts_for(prompt_or_texts), tokenizer, max_length)
    lengths = attention_mask.sum(dim=1).tolist()  # each span's tokens, pad prefix included
    device = text_encoder.device
    rows: list[torch.Tensor | None] = [None] * len(lengths)
    for group in length_batches(lengths):
        width = max(lengths[i] for i in group)
        ids, mask = input_ids[group, :width].to(device), attention_mask[group, :width].to(device)
        hidden = text_encoder(ids, attention_mask=mask).last_hidden_state  # [n, width, C]
        real = hidden[mask.bool()]  # [sum of the group's lengths, C]: the padding freed with `hidden`
        for i, row in zip(group, real.split([lengths[i] for i in group])):
            rows[i] = row
    return torch.cat(rows).unsqueeze(0)  # [1, T, C]


def pad_glyphs(glyphs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad [B_i, T_i, C] glyph batches to one [sum B_i, max T, C] tensor and its bool mask (True = real).
    Padded positions are masked out of attention, never filled by repeating tokens (that would change joint
    self-attention); right-padded rows let the DiT attend without a mask (see dit.padded_text_groups)."""
    length = max(g.shape[1] for g in glyphs)
    padded = torch.cat([F.pad(g, (0, 0, 0, length - g.shape[1])) for g in glyphs])
    mask = torch.cat([torch.arange(length, device=g.device)[None].expand(g.shape[0], -1) < g.shape[1] for g in glyphs])
    return padded, mask


def encode_glyphs_batch(
    prompts_or_texts: Sequence[str | Sequence[str]], text_encoder, tokenizer, max_length: int = GLYPH_MAX_LENGTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """Glyph embeddings of several prompts, padded to one length: ``(embeds [B, Tmax, C], mask [B, Tmax])``.

    Each item is a prompt string or an override list of glyph strings (see ``encode_glyphs``). Rows are
    right-padded with zeros (``pad_glyphs``); the reference left-pads and adds a float "mask" that masks nothing
    (diffusers issue 13587). Text tokens carry no position embedding, so with a real mask the side does not matter.
    """
    if isinstance(prompts_or_texts, str):
        prompts_or_texts = [prompts_or_texts]
    if len(prompts_or_texts) == 0:
        raise InvalidInputError('encode_glyphs_batch got no prompts; pass a list with at least one prompt (or "").')
    return pad_glyphs([encode_glyphs(item, text_encoder, tokenizer, max_length) for item in prompts_or_texts])
