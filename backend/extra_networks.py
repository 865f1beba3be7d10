"""Extra networks in prompts: `<lora:name:weight>` tags and textual inversion embeddings, per generation.

A1111's rules: a tag is `<kind:name[:arg...]>`; it is removed from the text before encoding; LoRAs
come from the first image of a batch (with wildcards, images of a batch may differ in text only);
`<lora:name:te:unet>` or `te=`/`unet=` give the text encoder and UNet strengths separately.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from backend.embeddings import Embedding, EmbeddingLibrary, EmbeddingSet
from backend.lora import Activation, LoraOverlay, Matched, match
from backend.lora_files import LoraError, LoraFile, LoraLibrary

logger = logging.getLogger(__name__)

TAG = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class NetworkTag:
    kind: str
    positional: tuple[str, ...]
    named: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        return self.positional[0]


def parse_tags(text: str) -> tuple[str, list[NetworkTag]]:
    """(text without its tags, the tags in order)."""
    tags = []
    for found in TAG.finditer(text):
        positional, named = [], []
        for arg in found.group(2).split(":"):
            key, equals, value = arg.partition("=")
            if equals and key.strip().isidentifier():
                named.append((key.strip(), value.strip()))
            else:
                positional.append(arg.strip())
        if positional:
            tags.append(NetworkTag(found.group(1).lower(), tuple(positional), tuple(named)))
    return TAG.sub("", text), tags


def lora_activation(tag: NetworkTag) -> Activation:
    """`<lora:name>`, `<lora:name:w>`, `<lora:name:te:unet>`, `<lora:name:w:unet=u>` (A1111's reading).

    LoraError when a strength is not a number, or not a finite one within +-`lora.MAX_STRENGTH`.
    """
    named = dict(tag.named)
    try:
        te = float(tag.positional[1]) if len(tag.positional) > 1 else 1.0
        te = float(named.get("te", te))
        unet = float(tag.positional[2]) if len(tag.positional) > 2 else te
        unet = float(named.get("unet", unet))
    except ValueError:
        raise LoraError(f"<lora:{':'.join(tag.positional)}>: strengths must be numbers, "
                        f"as in <lora:{tag.name}:0.8> or <lora:{tag.name}:1:0.5>") from None
    return Activation(tag.name, te, unet)


@dataclass
class _Active:
    lora: LoraFile
    matched: Matched
    activation: Activation


@dataclass
class NetworkSession:
    """One generation's extra networks on one model: strips tags, applies each batch's LoRAs over the
    base weights, knows the model's embeddings, and restores the weights when closed."""

    model: object
    loras: LoraLibrary
    embeddings: EmbeddingLibrary
    warnings: list[str]
    active: list[_Active] = field(default_factory=list)
    _matched: dict = field(default_factory=dict)
    _embedding_set: EmbeddingSet | None = None

    def __post_init__(self) -> None:
        self.overlay: LoraOverlay = self.model.lora_overlay

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            logger.warning(message)

    @property
    def embedding_set(self) -> EmbeddingSet:
        if self._embedding_set is None:
            self._embedding_set = self.embeddings.for_model(self.model)
        return self._embedding_set

    def strip(self, texts: tuple[str, str]) -> tuple[tuple[str, str], list[NetworkTag]]:
        """Texts without tags, and the tags of both (the negative prompt's apply too, as in A1111 1.6+)."""
        prompt, tags = parse_tags(texts[0])
        negative, negative_tags = parse_tags(texts[1])
        return (prompt, negative), tags + negative_tags

    def activate(self, tags: list[NetworkTag]) -> tuple:
        """Apply the LoRAs these tags ask for (and only them); a LoRA that cannot be used is skipped
        with a warning, but a strength that is not a usable number raises LoraError: the prompt needs
        fixing, as in A1111. Returns a key naming the applied set (for caching encodings)."""
        wanted: list[_Active] = []
        for tag in tags:
            if tag.kind != "lora":
                self.warn(f"extra network type '{tag.kind}' is not supported: <{tag.kind}:{tag.name}> ignored")
                continue
            activation = lora_activation(tag)
            try:
                lora = self.loras.load(activation.name)
                key = (id(lora), id(self.model))
                if key not in self._matched:
                    self._matched[key] = match(lora, self.model)
                wanted.append(_Active(lora, self._matched[key], activation))
            except LoraError as error:
                self.warn(f"{error}" if "skipped" in str(error) else f"{error}; generating without it")
        self.overlay.apply([(a.lora, a.matched, a.activation) for a in wanted])
        self.active = wanted
        return self.overlay.applied

    def lora_hashes(self) -> str | None:
        """A1111's `Lora hashes` value for the LoRAs now applied."""
        if not self.active:
            return None
        entries = dict.fromkeys(f"{a.lora.name}: {self.loras.short_hash(a.lora)}" for a in self.active)
        return ", ".join(entries)

    def used_embeddings(self, *texts: str) -> list[Embedding]:
        return self.embedding_set.used(*texts)

    def ti_hashes(self, *texts: str) -> str | None:
        used = self.used_embeddings(*texts)
        return ", ".join(f"{e.name}: {self.embeddings.short_hash(e)}" for e in used) or None

    def close(self) -> None:
        self.overlay.restore()
        self.active = []
