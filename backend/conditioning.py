"""Prompt text -> text-encoder embeddings: 75-token chunks wrapped in BOS/EOS, clip skip, SDXL pooling.

Each chunk is encoded separately and the chunks are concatenated, as A1111 does, so prompts are
not cut at 77 tokens. Positive and negative embeddings are padded to the same number of chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK_TOKENS = 75


@dataclass
class PromptEmbedding:
    """Embeddings of one prompt: `context` (chunks*77, dim) and SDXL's `pooled` (dim) or None."""

    context: torch.Tensor
    pooled: torch.Tensor | None

    @property
    def chunks(self) -> int:
        return self.context.shape[0] // (CHUNK_TOKENS + 2)


def tokenize_chunks(tokenizer, text: str) -> list[list[int]]:
    """Token ids of `text` in chunks of at most 75, without BOS/EOS; an empty prompt is one empty chunk."""
    ids = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
    return [ids[i : i + CHUNK_TOKENS] for i in range(0, len(ids), CHUNK_TOKENS)] or [[]]


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, truncation=False).input_ids)


def _wrap(tokenizer, chunk: list[int]) -> list[int]:
    pad = tokenizer.pad_token_id
    ids = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
    return ids + [pad] * (CHUNK_TOKENS + 2 - len(ids))


def _encode_chunk(model, ids_per_encoder: list[list[int]], clip_skip: int):
    """One 77-token chunk through every text encoder -> (context, pooled)."""
    hidden, pooled = [], None
    sdxl = model.family == "sdxl"
    for encoder, ids in zip(model.text_encoders, ids_per_encoder):
        tokens = torch.tensor([ids], device=model.device)
        out = encoder(tokens, output_hidden_states=True)
        if sdxl:
            # SDXL conditions on the penultimate layer of both encoders, without the final norm.
            hidden.append(out.hidden_states[-(clip_skip + 1)])
            if hasattr(out, "text_embeds"):
                pooled = out.text_embeds[0]
        else:
            state = out.hidden_states[-clip_skip]
            hidden.append(encoder.final_layer_norm(state) if clip_skip > 1 else out.last_hidden_state)
    return torch.cat(hidden, dim=-1)[0], pooled


@torch.no_grad()
def encode_prompt(model, text: str, clip_skip: int = 1, min_chunks: int = 1) -> PromptEmbedding:
    chunked = [tokenize_chunks(tokenizer, text) for tokenizer in model.tokenizers]
    count = max(min_chunks, *(len(c) for c in chunked))
    contexts, pooled = [], None
    with model.use(*model.text_encoders):
        for index in range(count):
            ids = [
                _wrap(tokenizer, chunks[index] if index < len(chunks) else [])
                for tokenizer, chunks in zip(model.tokenizers, chunked)
            ]
            context, chunk_pooled = _encode_chunk(model, ids, clip_skip)
            contexts.append(context)
            if index == 0:
                pooled = chunk_pooled  # A1111 pools from the first chunk
    return PromptEmbedding(torch.cat(contexts), pooled)


def encode_pair(model, prompt: str, negative: str, clip_skip: int = 1) -> tuple[PromptEmbedding, PromptEmbedding]:
    """Positive and negative embeddings with the same number of chunks."""
    chunks = max(
        max(len(tokenize_chunks(t, prompt)), len(tokenize_chunks(t, negative))) for t in model.tokenizers
    )
    return (
        encode_prompt(model, prompt, clip_skip, chunks),
        encode_prompt(model, negative, clip_skip, chunks),
    )
