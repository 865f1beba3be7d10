"""Prompt text -> T5 and CLIP embeddings for the flow families (FLUX.1, SD 3.x), read with A1111's syntax.

T5 reads the whole prompt as one sequence up to the family's limit (FLUX.1 dev 512 tokens, schnell 256, SD 3.x
256), padded to it as the models were trained; attention weights scale each token's embedding and the mean is
restored (A1111's "Original" emphasis; "No norm" only scales). `BREAK` ends a chunk for CLIP, as in SD; T5
reads on across it. CLIP gives its first 77-token chunk (its pooled vector, and its hidden states for SD 3).
"""

from __future__ import annotations

import torch

from backend import conditioning
from backend.conditioning import Chunk

T5_END, T5_PAD = 1, 0  # T5 v1.1's </s> and <pad>


def t5_tokens(tokenizer, text: str, emphasis: str, max_length: int) -> tuple[list[int], list[float]]:
    """(ids padded to `max_length`, one weight per id): the prompt's fragments tokenized in order, cut to leave
    room for the end token."""
    ids, weights = [], []
    for fragment, weight in conditioning.fragments(text, emphasis):
        if (fragment, weight) == ("BREAK", -1):
            continue
        pieces = tokenizer(fragment, add_special_tokens=False, truncation=False).input_ids
        ids.extend(pieces)
        weights.extend([weight] * len(pieces))
    ids, weights = ids[: max_length - 1], weights[: max_length - 1]
    padding = max_length - len(ids) - 1
    return [*ids, T5_END, *[T5_PAD] * padding], [*weights, 1.0, *[1.0] * padding]


def t5_token_count(tokenizer, text: str) -> int:
    """Tokens T5 reads for a prompt, its end token included (what the UI's counter shows against the limit)."""
    pieces = [tokenizer(fragment, add_special_tokens=False, truncation=False).input_ids
              for fragment, weight in conditioning.fragments(text, "Original") if (fragment, weight) != ("BREAK", -1)]
    return sum(len(ids) for ids in pieces) + 1


def emphasized(z: torch.Tensor, weights: list[float], emphasis: str) -> torch.Tensor:
    """A1111's emphasis on one sequence of embeddings (tokens, dim)."""
    if emphasis not in ("Original", "No norm") or all(w == 1.0 for w in weights):
        return z
    scaled = z * torch.tensor(weights, device=z.device, dtype=z.dtype)[:, None]
    if emphasis == "No norm":
        return scaled
    return scaled * (z.mean() / scaled.mean())


@torch.no_grad()
def encode_t5(encoder, tokenizer, text: str, emphasis: str, max_length: int, device) -> torch.Tensor:
    """(max_length, d_model) T5 embeddings of a prompt."""
    ids, weights = t5_tokens(tokenizer, text, emphasis, max_length)
    z = encoder(torch.tensor([ids], device=device)).last_hidden_state[0]
    return emphasized(z, weights, emphasis)


def first_chunk(tokenizer, text: str, emphasis: str) -> Chunk:
    return conditioning.chunk_prompt(tokenizer, text, emphasis)[0][0]


@torch.no_grad()
def encode_clip(encoder, tokenizer, text: str, emphasis: str, device, layer: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states (77, dim), pooled (dim)) of the prompt's first CLIP chunk. `layer`: None for the final
    layer (after the final norm), -2 for the penultimate one (SD 3). The pooled vector is projected when the
    encoder has a projection (CLIP-G; CLIP-L as SD 3 uses it), else CLIP's pooled output (FLUX.1)."""
    chunk = first_chunk(tokenizer, text, emphasis)
    out = encoder(torch.tensor([chunk.tokens], device=device), output_hidden_states=True)
    hidden = out.last_hidden_state[0] if layer is None else out.hidden_states[layer][0]
    pooled = out.text_embeds[0] if hasattr(out, "text_embeds") else out.pooler_output[0]
    return emphasized(hidden, chunk.weights, emphasis), pooled
