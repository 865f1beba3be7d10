"""The one frozen `Settings` object: paths, device, precision, cache sizes and generation defaults.

`app.py` builds it from the command line; nothing reads flags or environment anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

# A1111's folder names, so an existing install's models folder can be reused as it is.
MODEL_FOLDERS = {
    "checkpoints": "Stable-diffusion",
    "vae": "VAE",
    "lora": "Lora",
    "esrgan": "ESRGAN",
    "realesrgan": "RealESRGAN",
    "swinir": "SwinIR",
    "gfpgan": "GFPGAN",
    "codeformer": "Codeformer",
    "embeddings": "embeddings",
    "controlnet": "ControlNet",  # A1111's sd-webui-controlnet and Forge read ControlNets from here
    "annotators": "annotators",  # ControlNet preprocessor models (depth_anything_v2/ ...)
    "clip_vision": "clip_vision",  # Forge's (and ComfyUI's) folder of CLIP image encoders for IP-Adapters
    "text_encoder": "text_encoder",  # Forge's folder of FLUX.1 / SD 3.5 text encoders (clip_l, clip_g, t5xxl)
}

PRECISIONS = ("auto", "full", "half", "bf16")


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(default_factory=Path.cwd)
    ckpt_dir: Path | None = None
    vae_dir: Path | None = None
    lora_dir: Path | None = None
    embeddings_dir: Path | None = None
    controlnet_dir: Path | None = None
    clip_vision_dir: Path | None = None
    text_encoder_dir: Path | None = None
    text_encoders: tuple[str, ...] = ()  # picks in models/text_encoder (--text-encoder); () : each role's only file
    outputs_dir: Path | None = None
    wildcards_dir: Path | None = None
    device: str = "auto"
    precision: str = "auto"
    no_half: bool = False
    no_half_vae: bool = False
    medvram: bool = False
    lowvram: bool = False
    threads: int | None = None
    torch_compile: bool = False  # --compile: torch.compile the UNet / transformer (the option, for this run)
    channels_last: bool = False  # --channels-last
    checkpoint_cache_size: int = 1
    lora_cache_mb: int = 1024  # parsed LoRA files kept in memory, least recently used dropped first
    default_checkpoint: str | None = None
    # Standard face restoration and upscaler weights missing on first use are downloaded from their
    # release URLs (A1111 does this); the command line turns it on unless --no-download.
    allow_downloads: bool = False
    # Past one device (backend/cluster): N generation replicas on Ray Serve (0: this process generates),
    # on a local Ray instance or on the cluster at `ray_address` ("auto", "ray://host:10001", "host:6379")
    workers: int = 0
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.checkpoint_cache_size < 1:
            raise ValueError("checkpoint_cache_size must be at least 1")
        if self.workers < 0:
            raise ValueError("workers must be 0 (no cluster) or more")

    @property
    def clustered(self) -> bool:
        """Generation runs on Ray Serve replicas, not in this process."""
        return bool(self.workers or self.ray_address)

    @property
    def models_dir(self) -> Path:
        return Path(self.data_dir) / "models"

    def model_dir(self, kind: str) -> Path:
        override = {
            "checkpoints": self.ckpt_dir,
            "vae": self.vae_dir,
            "lora": self.lora_dir,
            "embeddings": self.embeddings_dir,
            "controlnet": self.controlnet_dir,
            "clip_vision": self.clip_vision_dir,
            "text_encoder": self.text_encoder_dir,
        }.get(kind)
        return Path(override) if override else self.models_dir / MODEL_FOLDERS[kind]

    @property
    def output_root(self) -> Path:
        return Path(self.outputs_dir) if self.outputs_dir else Path(self.data_dir) / "outputs"

    @property
    def styles_file(self) -> Path:
        return Path(self.data_dir) / "styles.csv"  # A1111's place and format

    @property
    def wildcards_folder(self) -> Path:
        return Path(self.wildcards_dir) if self.wildcards_dir else Path(self.data_dir) / "wildcards"

    @property
    def cache_dir(self) -> Path:
        return Path(self.data_dir) / "cache"

    def with_changes(self, **changes) -> Settings:
        return replace(self, **changes)
