"""`Parts`: the files a checkpoint may lack (FLUX.1's and SD 3.5's text encoders, FLUX's VAE), found among the
user's picks (Forge's "VAE / Text Encoder" choice, `--vae`, `--text-encoder`) or, without a pick, as the one
file in `models/text_encoder` or `models/VAE` that fits the role."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from backend import checkpoints
from backend.errors import ModelFileError
from backend.families.base import Shapes

VAE_PREFIXES = ("vae.", "first_stage_model.")


class MissingPartError(ModelFileError):
    """A checkpoint needs a file (text encoder, VAE) that no folder holds, or that is ambiguous."""


def vae_latent_channels(shapes: Shapes) -> int | None:
    """The latent channel count of a VAE file (original or diffusers layout, bare or prefixed), else None."""
    for prefix in ("", *VAE_PREFIXES):
        shape = shapes.get(prefix + "decoder.conv_in.weight")
        if shape is not None and len(shape) == 4:
            return shape[1]
    return None


@dataclass
class Parts:
    """Candidate files for the parts a checkpoint lacks. `chosen`: the user's picks, tried first."""

    text_encoder_dir: Path
    vae_dir: Path
    text_encoders: list[Path] = field(default_factory=list)
    vaes: list[Path] = field(default_factory=list)
    chosen: list[Path] = field(default_factory=list)
    allow_downloads: bool = False  # T5's tokenizer may be fetched from the package index on first use
    fp8_families: tuple[str, ...] = ()  # families whose linear weights will be stored in fp8 (FP8 weight)
    _shapes: dict[Path, dict] = field(default_factory=dict, repr=False)

    def shapes(self, path: Path) -> dict:
        if path not in self._shapes:
            try:
                self._shapes[path] = checkpoints.read_shapes(path) if path.suffix == ".safetensors" else {}
            except (OSError, ValueError, RuntimeError):
                self._shapes[path] = {}  # unreadable: fits no role
        return self._shapes[path]

    def text_encoder(self, role: str, label: str, wanted_by: str) -> Path:
        """The file for text encoder `role` ("clip_l", "clip_g", "t5xxl"); `label` names it for people."""
        from backend.text_encoder_files import encoder_role

        return self._find(lambda path: encoder_role(self.shapes(path), path.name) == role, self.text_encoders,
                          self.text_encoder_dir, label, wanted_by, "--text-encoder")

    def has_text_encoder(self, role: str) -> bool:
        """Whether a pick or the folder holds a text encoder for `role` (for optional ones: SD 3's T5)."""
        from backend.text_encoder_files import encoder_role

        return any(encoder_role(self.shapes(path), path.name) == role for path in [*self.chosen, *self.text_encoders])

    def vae(self, latent_channels: int, label: str, wanted_by: str) -> Path:
        """A VAE file with `latent_channels` latent channels."""
        return self._find(lambda path: vae_latent_channels(self.shapes(path)) == latent_channels, self.vaes,
                          self.vae_dir, label, wanted_by, "--vae")

    def _find(self, fits: Callable[[Path], bool], folder_files: list[Path], folder: Path, label: str,
              wanted_by: str, flag: str) -> Path:
        picked = [path for path in self.chosen if fits(path)]
        if picked:
            return picked[0]
        found = [path for path in folder_files if fits(path)]
        if len(found) == 1:
            return found[0]
        if not found:
            raise MissingPartError(f"{wanted_by} needs {label}, and {folder} holds none; put the file there "
                                   "(or use a checkpoint that includes it)")
        names = ", ".join(path.name for path in found)
        raise MissingPartError(f"{wanted_by} needs {label}, and {folder} holds several ({names}); pick one in the "
                               f"top bar's VAE / Text Encoder choice or with {flag} NAME")
