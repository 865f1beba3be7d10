"""Prompt text -> text-encoder embeddings, the way A1111 builds them.

- The text is read with A1111's attention syntax (`backend.prompt_parser`); every token carries the
  weight of the fragment it came from.
- Tokens go into 75-token chunks, each wrapped in BOS/EOS to 77 and encoded separately, then
  concatenated. `BREAK` ends a chunk; a chunk that fills up moves the text after its last comma to the
  next chunk when that comma lies within the last 20 tokens.
- Emphasis: "Original" scales each chunk's embeddings by the weights, then restores the chunk's mean
  (A1111's default); "No norm" only scales; "Ignore" parses the brackets but drops the weights; "None"
  does not parse brackets at all.
- Textual inversion: an embedding's name is replaced by its vectors (placeholder tokens whose input
  embeddings are swapped for the vectors), never split across two chunks.
- Prompt editing and alternation become a schedule: each distinct text is encoded once, and the
  denoising loop picks the embedding in force at each step. `AND` gives several weighted subprompts.
- Lengths, as in A1111: the texts of one schedule are padded with empty chunks to the longest of them;
  subprompts and the negative prompt keep their own lengths (`stack_contexts`, `pad_cond_uncond`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from backend import prompt_parser
from backend.embeddings import NO_EMBEDDINGS, EmbeddingSet, EncoderVocabulary

CHUNK_TOKENS = 75
COMMA_BACKTRACK = 20
EMBEDDING_PLACEHOLDER = 0  # the token id under an embedding's vectors, as in A1111

@dataclass
class PromptEmbedding:
    """Embeddings of one prompt: `context` (chunks*77, dim) and SDXL's `pooled` (dim) or None."""

    context: torch.Tensor
    pooled: torch.Tensor | None

    @property
    def chunks(self) -> int:
        return self.context.shape[0] // (CHUNK_TOKENS + 2)


@dataclass
class Chunk:
    """77 token ids (BOS, up to 75 tokens, EOS, padding), one weight per position, and the embedding
    vectors to put at given positions."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, torch.Tensor]] = field(default_factory=list)


def fragments(text: str, emphasis: str) -> list[tuple[str, float]]:
    if emphasis == "None":
        return [(text, 1.0)]
    parsed = prompt_parser.parse_prompt_attention(text)
    if emphasis == "Ignore":
        return [(t, w if (t, w) == ("BREAK", -1) else 1.0) for t, w in parsed]
    return parsed


def chunk_prompt(tokenizer, text: str, emphasis: str = "Original",
                 vocabulary: EncoderVocabulary = NO_EMBEDDINGS) -> tuple[list[Chunk], int]:
    """(chunks wrapped to 77 tokens, A1111's token count: 75 per closed chunk plus the last one's)."""
    parsed = fragments(text, emphasis)
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    chunks: list[Chunk] = []
    current = Chunk()
    last_comma = -1
    count = 0

    def close(final: bool = False) -> None:
        nonlocal current, last_comma, count
        count += len(current.tokens) if final else CHUNK_TOKENS
        padding = CHUNK_TOKENS - len(current.tokens)
        tokens = [tokenizer.bos_token_id, *current.tokens, *[tokenizer.eos_token_id] * max(0, padding),
                  tokenizer.eos_token_id]
        if tokenizer.pad_token_id != tokenizer.eos_token_id:  # pad after the first EOS (OpenCLIP: 0)
            first_eos = tokens.index(tokenizer.eos_token_id)
            tokens[first_eos + 1 :] = [tokenizer.pad_token_id] * (len(tokens) - first_eos - 1)
        fixes = [(position + 1, vectors) for position, vectors in current.fixes]  # after BOS
        chunks.append(Chunk(tokens, [1.0, *current.weights, *[1.0] * max(0, padding), 1.0], fixes))
        current, last_comma = Chunk(), -1

    def add_embedding(vectors: torch.Tensor, weight: float) -> None:
        vectors = vectors[:CHUNK_TOKENS]
        if len(current.tokens) + len(vectors) > CHUNK_TOKENS:  # never split an embedding
            close()
        current.fixes.append((len(current.tokens), vectors))
        current.tokens.extend([EMBEDDING_PLACEHOLDER] * len(vectors))
        current.weights.extend([weight] * len(vectors))

    for fragment, weight in parsed:
        if (fragment, weight) == ("BREAK", -1):
            close()
            continue
        for piece, vectors, _ in vocabulary.split(fragment):
            if vectors is not None:
                add_embedding(vectors, weight)
                continue
            for token in tokenizer(piece, add_special_tokens=False, truncation=False).input_ids:
                if token == comma:
                    last_comma = len(current.tokens)
                elif (len(current.tokens) == CHUNK_TOKENS and last_comma != -1
                      and len(current.tokens) - last_comma <= COMMA_BACKTRACK):
                    # The chunk is full and a comma is near its end: carry the words after it over.
                    cut = last_comma + 1
                    carried = Chunk(current.tokens[cut:], current.weights[cut:],
                                    [(p - cut, v) for p, v in current.fixes if p >= cut])
                    current = Chunk(current.tokens[:cut], current.weights[:cut],
                                    [(p, v) for p, v in current.fixes if p < cut])
                    close()
                    current = carried
                if len(current.tokens) == CHUNK_TOKENS:
                    close()
                current.tokens.append(token)
                current.weights.append(weight)
    if current.tokens or not chunks:
        close(final=True)
    return chunks, count


def count_tokens(tokenizer, text: str, vocabulary: EncoderVocabulary = NO_EMBEDDINGS) -> int:
    """A1111's token counter: for the longest text the prompt's schedule produces."""
    texts = [t for _, t in prompt_parser.prompt_schedules(text, 1000)] or [text]
    return max(chunk_prompt(tokenizer, t, vocabulary=vocabulary)[1] for t in texts)


def _vocabularies(model, embeddings: EmbeddingSet | None) -> list[EncoderVocabulary]:
    if embeddings is None or not embeddings.per_encoder:
        return [NO_EMBEDDINGS] * len(model.tokenizers)
    return embeddings.per_encoder


def _run_encoder(encoder, tokens: torch.Tensor, fixes: list[tuple[int, torch.Tensor]]):
    """The encoder's forward pass, with embedding vectors swapped in for their placeholder tokens."""
    if not fixes:
        return encoder(tokens, output_hidden_states=True)

    def swap(module, args, output):
        output = output.clone()
        for position, vectors in fixes:
            output[0, position : position + len(vectors)] = vectors.to(output)
        return output

    handle = encoder.get_input_embeddings().register_forward_hook(swap)
    try:
        return encoder(tokens, output_hidden_states=True)
    finally:
        handle.remove()


def _encode_chunk(model, chunk_per_encoder: list[Chunk], clip_skip: int, emphasis: str):
    """One 77-token chunk through every text encoder -> (context, pooled)."""
    hidden, pooled = [], None
    for encoder, chunk in zip(model.text_encoders, chunk_per_encoder):
        tokens = torch.tensor([chunk.tokens], device=model.device)
        z, encoder_pooled = model.engine.clip_output(encoder, _run_encoder(encoder, tokens, chunk.fixes), clip_skip)
        pooled = encoder_pooled if encoder_pooled is not None else pooled
        if emphasis in ("Original", "No norm") and any(w != 1.0 for w in chunk.weights):
            weights = torch.tensor(chunk.weights, device=z.device, dtype=z.dtype)[None, :, None]
            if emphasis == "Original":
                mean = z.mean()
                z = z * weights
                z = z * (mean / z.mean())
            else:
                z = z * weights
        hidden.append(z)
    return torch.cat(hidden, dim=-1)[0], pooled


def chunk_count(model, text: str, emphasis: str = "Original", embeddings: EmbeddingSet | None = None) -> int:
    if model.engine.encodes_prompts:  # a fixed length (T5's)
        return 1
    return max(len(chunk_prompt(tokenizer, text, emphasis, vocabulary)[0])
               for tokenizer, vocabulary in zip(model.tokenizers, _vocabularies(model, embeddings)))


@torch.no_grad()
def encode_prompt(model, text: str, clip_skip: int = 1, min_chunks: int = 1,
                  emphasis: str = "Original", embeddings: EmbeddingSet | None = None) -> PromptEmbedding:
    if model.engine.encodes_prompts:  # FLUX.1, SD 3.x: T5 and CLIP, their own way
        return model.engine.encode_prompt(model, text, emphasis)
    vocabularies = _vocabularies(model, embeddings)
    chunked = [chunk_prompt(tokenizer, text, emphasis, vocabulary)[0]
               for tokenizer, vocabulary in zip(model.tokenizers, vocabularies)]
    count = max(min_chunks, *(len(c) for c in chunked))
    empty = [chunk_prompt(tokenizer, "", emphasis)[0][0] for tokenizer in model.tokenizers]
    contexts, pooled = [], None
    with model.use(*model.text_encoders):
        for index in range(count):
            chunks = [c[index] if index < len(c) else e for c, e in zip(chunked, empty)]
            context, chunk_pooled = _encode_chunk(model, chunks, clip_skip, emphasis)
            contexts.append(context)
            if index == 0:
                pooled = chunk_pooled  # A1111 pools from the first chunk
    return PromptEmbedding(torch.cat(contexts), pooled)


# -- schedules -----------------------------------------------------------------------------------------
Schedule = list[tuple[int, PromptEmbedding]]  # (last step it applies to, embedding)


@dataclass
class Conditioning:
    """Everything the denoising loop needs from the prompts: the positive subprompts (`AND`) with their
    weights and schedules, and the negative prompt's schedule. The embeddings of one schedule have the
    same length; subprompts and the negative may differ, and then `empty` holds the embedding of ""
    (one chunk), what A1111's "Pad prompt/negative prompt" pads with."""

    positive: list[tuple[float, Schedule]]
    negative: Schedule
    texts: int  # distinct texts encoded
    empty: PromptEmbedding | None = None

    @staticmethod
    def at(schedule: Schedule, step: int) -> PromptEmbedding:
        """The embedding in force at `step` (0-based), as A1111 picks it: the first entry whose end
        step is at least `step`."""
        for end, embedding in schedule:
            if step <= end:
                return embedding
        return schedule[-1][1]

    @property
    def is_static(self) -> bool:
        return all(len(s) == 1 for _, s in self.positive) and len(self.negative) == 1

    def lengths_differ(self, step: int) -> bool:
        """Whether the conditional batch (the longest subprompt) and the negative prompt have different
        token lengths at `step`: A1111 then runs them apart, or pads them with `pad_cond_uncond`."""
        longest = max(Conditioning.at(schedule, step).chunks for _, schedule in self.positive)
        return longest != Conditioning.at(self.negative, step).chunks


def encode_for_generation(model, prompt: str, negative: str, steps: int, clip_skip: int = 1,
                          emphasis: str = "Original", embeddings: EmbeddingSet | None = None, *,
                          hires_steps: int | None = None, use_old_scheduling: bool = False) -> Conditioning:
    """Schedules for the positive subprompts and the negative prompt (of the hires pass with `hires_steps`;
    see `prompt_parser.prompt_schedules`). As A1111 encodes them, the texts of one schedule are padded to
    the longest of them with empty chunks, and each schedule keeps its own length; each distinct (text,
    length) is encoded once."""
    def schedule(text: str) -> list[tuple[int, str]]:
        return prompt_parser.prompt_schedules(text, steps, hires_steps, use_old_scheduling=use_old_scheduling)

    positive = [(weight, schedule(text)) for text, weight in prompt_parser.split_and(prompt)]
    negative_schedule = schedule(negative)
    counts: dict[str, int] = {}
    encoded: dict[tuple[str, int], PromptEmbedding] = {}

    def encode_schedule(schedule: list[tuple[int, str]]) -> Schedule:
        for _, text in schedule:
            if text not in counts:
                counts[text] = chunk_count(model, text, emphasis, embeddings)
        chunks = max(counts[text] for _, text in schedule)
        for _, text in schedule:
            if (text, chunks) not in encoded:
                encoded[text, chunks] = encode_prompt(model, text, clip_skip, chunks, emphasis, embeddings)
        return [(end, encoded[text, chunks]) for end, text in schedule]

    positive_encoded = [(weight, encode_schedule(schedule)) for weight, schedule in positive]
    negative_encoded = encode_schedule(negative_schedule)
    lengths = {chunks for _, chunks in encoded}
    empty = encode_prompt(model, "", clip_skip, 1, emphasis) if len(lengths) > 1 else None
    return Conditioning(positive_encoded, negative_encoded, texts=len(encoded), empty=empty)


def stack_contexts(embeddings: list[PromptEmbedding]) -> torch.Tensor:
    """The embeddings' contexts as one (count, tokens, dim) batch. A shorter one is padded with copies of
    its last vector, as A1111 stacks the `AND` subprompts of a batch."""
    tokens = max(e.context.shape[0] for e in embeddings)
    return torch.stack([
        torch.cat([e.context, e.context[-1:].expand(tokens - e.context.shape[0], -1)])
        if e.context.shape[0] < tokens else e.context
        for e in embeddings
    ])


def pad_cond_uncond(cond: torch.Tensor, uncond: torch.Tensor, empty: PromptEmbedding
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A1111's "Pad prompt/negative prompt": the shorter of two (batch, tokens, dim) contexts gets the
    empty prompt's 77 vectors appended, whole chunks at a time, until both have the same length."""
    chunks = (cond.shape[1] - uncond.shape[1]) // empty.context.shape[0]

    def padded(context: torch.Tensor, repeats: int) -> torch.Tensor:
        return torch.cat([context, empty.context[None].repeat(context.shape[0], repeats, 1).to(context)], dim=1)

    if chunks > 0:
        uncond = padded(uncond, chunks)
    elif chunks < 0:
        cond = padded(cond, -chunks)
    return cond, uncond
