"""Reading a flow family's checkpoint: its transformer (bare, or under ComfyUI's, Forge's and Stability's
`model.diffusion_model.` prefix), and its VAE and text encoders from the same file when it is an all-in-one
file, else from `models/VAE` and `models/text_encoder` (`backend.families.parts`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from backend import checkpoints, clip_tokenizer, fp8_storage, model_detection, t5_tokenizer, text_encoder_files
from backend.families.parts import VAE_PREFIXES, Parts

TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


@dataclass
class FileParts:
    """One checkpoint file's tensors by part."""

    path: Path
    transformer: dict  # the transformer's tensors, prefix removed
    diffusers: bool  # the transformer is in diffusers' layout
    rest: dict  # the other tensors of an all-in-one file, as named there (empty for a transformer-only file)

    @classmethod
    def read(cls, path: Path, strip: Callable[[dict], dict], is_diffusers: Callable) -> FileParts:
        state = checkpoints.read_state_dict(path)
        transformer = strip(state)
        rest = {k: v for k, v in state.items() if not k.startswith(TRANSFORMER_PREFIXES)} if len(transformer) < len(
            state) else {}
        return cls(Path(path), transformer, is_diffusers(transformer.keys()), rest)

    @property
    def transformer_shapes(self) -> dict:
        return {key: tuple(value.shape) for key, value in self.transformer.items()}

    def _rest_shapes(self) -> dict:
        return {key: tuple(value.shape) for key, value in self.rest.items()}

    def _stripped(self, prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in self.rest.items() if k.startswith(prefix)}

    def text_encoder(self, role: str, label: str, wanted_by: str, parts: Parts, dtype: torch.dtype,
                     optional: bool = False, with_projection: bool | None = None):
        """The text encoder for `role`, from this file or from `parts`; None when `optional` and found nowhere.
        `with_projection`: False loads CLIP without its text projection (FLUX.1 takes CLIP-L's pooled output)."""
        embedded = text_encoder_files.embedded_encoders(self._rest_shapes())
        if role in embedded:
            weights = self._stripped(embedded[role])
            return text_encoder_files.load_encoder(weights, role, self.path.name, dtype, with_projection=with_projection)
        if optional and not parts.has_text_encoder(role):
            return None
        path = parts.text_encoder(role, label, wanted_by)
        return text_encoder_files.load_encoder_file(path, dtype, role, with_projection=with_projection)[1]

    def vae(self, family: str, latent_channels: int, label: str, wanted_by: str, parts: Parts, dtype: torch.dtype):
        """The VAE, from this file (`vae.` or `first_stage_model.`) or from `parts`."""
        for prefix in VAE_PREFIXES:
            weights = self._stripped(prefix)
            if "decoder.conv_in.weight" in weights:
                shapes = {key: tuple(value.shape) for key, value in weights.items()}
                config = model_detection.vae_config_from_shapes(shapes, family)
                return checkpoints.build_vae(config, weights, self.path.name, dtype)
        return checkpoints.load_vae_file(parts.vae(latent_channels, label, wanted_by), family, dtype)


def read_transformer(path: Path, layout, class_name: str, dtype: torch.dtype, keep_fp8: bool = False):
    """(the file's parts, the transformer's config, the transformer) of a checkpoint whose transformer is in
    `layout`'s original key layout (`flux_layout`, `sd3_layout`) or in diffusers'."""
    files = FileParts.read(path, layout.strip_prefix, layout.is_diffusers_layout)
    files.transformer = fp8_storage.unscaled(files.transformer, dtype)  # ComfyUI's scaled fp8 files
    if files.diffusers:
        config = layout.transformer_config_from_diffusers(files.transformer_shapes)
        weights = files.transformer
    else:
        config = layout.transformer_config(files.transformer_shapes)
        weights = layout.to_diffusers(files.transformer, config)
    transformer = build_transformer(class_name, config, weights, Path(path).name, dtype, keep_fp8)
    files.transformer = None  # the converted views live on in the model
    return files, config, transformer


def build_transformer(class_name: str, config: dict, weights: dict, name: str, dtype: torch.dtype,
                      keep_fp8: bool = False):
    """A diffusers transformer of `class_name` built without allocating, given the file's tensors in `dtype`;
    with `keep_fp8`, a file's fp8 matrices stay fp8 (fp8 storage: no full-precision copy on the way)."""
    import diffusers

    from backend.fp8_storage import FP8

    cls = getattr(diffusers, class_name)
    model = checkpoints.empty_module(lambda: cls.from_config(config))
    keep = (lambda key, tensor: tensor.dtype == FP8 and tensor.dim() == 2) if keep_fp8 else None
    return checkpoints.adopt(model, weights, "transformer", name, dtype, keep)


def tokenizers(kinds: tuple[str, ...], cache_dir: Path, parts: Parts) -> list:
    """Tokenizers in encoder order: "clip" (CLIP-L's, padded with its end token), "clip_g" (OpenCLIP bigG's,
    padded with 0 as SD 3 uses it), "t5" (T5 v1.1's; fetched once from the package index when allowed)."""
    made = []
    for kind in kinds:
        if kind == "t5":
            made.append(t5_tokenizer.load_t5_tokenizer(cache_dir, allow_fetch=parts.allow_downloads))
        else:
            pad = clip_tokenizer.PAD_END_OF_TEXT if kind == "clip" else "!"
            made.append(clip_tokenizer.load_clip_tokenizer(str(cache_dir), pad))
    return made
