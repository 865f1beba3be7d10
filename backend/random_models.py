"""Random-weight Stable Diffusion models of the real architectures, for tests and benchmarks.

`build(family, scale)` makes the components of an SD 1.x, SD 2.x or SDXL model (tiny, or at the
real size), and `save_original` / `save_diffusers` write them in the formats users download.
`rrdbnet_state` / `compact_state` give (shrunk) Real-ESRGAN weights, and `save_face_restorers`
writes GFPGAN v1.4 and CodeFormer files with their real layouts, as their releases ship them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from backend import ldm_layout, model_detection
from backend.checkpoints import text_config, text_encoder_class

TINY_UNET = {
    "sd1": dict(
        block_out_channels=[32, 64],
        layers_per_block=1,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=32,
        sample_size=8,
    ),
    "sd2": dict(
        block_out_channels=[32, 64],
        layers_per_block=1,
        attention_head_dim=[1, 1],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=32,
        sample_size=8,
    ),
    "sdxl": dict(
        block_out_channels=[32, 64],
        layers_per_block=1,
        attention_head_dim=[1, 1],
        transformer_layers_per_block=[1, 2],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        cross_attention_dim=64,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
        sample_size=8,
    ),
}
TINY_VAE = dict(
    block_out_channels=[32, 64],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    layers_per_block=1,
    sample_size=32,
)
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=1, projection_dim=32)


def configs(family: str, tiny: bool = True) -> dict:
    config = model_detection.family_config(family)
    if tiny:
        config["unet"].update(TINY_UNET[family])
        config["vae"].update(TINY_VAE)
        for encoder in config["text_encoders"]:
            encoder.update(TINY_TEXT)
    return config


def build(family: str, tiny: bool = True, seed: int = 0, in_channels: int = 4) -> dict:
    """Components with random weights: {'config', 'unet', 'vae', 'text_encoders'}."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    config = configs(family, tiny)
    config["unet"]["in_channels"] = in_channels
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(config["unet"]).eval()
    vae = AutoencoderKL.from_config(config["vae"]).eval()
    encoders = [text_encoder_class(c)(text_config(c)).eval() for c in config["text_encoders"]]
    with torch.no_grad():
        # Random init leaves some layers at zero (zero-initialised outputs); perturb every tensor so
        # each weight influences the result and a wrong key mapping cannot go unnoticed.
        for module in [unet, vae, *encoders]:
            for param in module.parameters():
                param.add_(torch.randn_like(param) * 0.02)
    return {"config": config, "unet": unet, "vae": vae, "text_encoders": encoders}


def original_state_dict(model: dict, sd2_extra_layer: bool = True) -> dict[str, torch.Tensor]:
    """The single-file (LDM layout) state dict of built components."""
    family = model["config"]["family"]
    unet_config = model["config"]["unet"]
    sd = ldm_layout.unet_to_ldm(model["unet"].state_dict(), unet_config["layers_per_block"])
    sd.update(ldm_layout.vae_to_ldm(model["vae"].state_dict()))
    encoders = [e.state_dict() for e in model["text_encoders"]]
    if family == "sd1":
        sd.update(ldm_layout.clip_to_ldm(encoders[0], model_detection.SD1_CLIP_PREFIX))
    elif family == "sd2":
        # Real SD 2.x files carry the final text layer that conditioning skips; write one too.
        last = model["text_encoders"][0].config.num_hidden_layers - 1 if sd2_extra_layer else None
        sd.update(ldm_layout.open_clip_to_ldm(encoders[0], model_detection.SD2_OPENCLIP_PREFIX, last))
    else:
        sd.update(ldm_layout.clip_to_ldm(encoders[0], model_detection.SDXL_CLIP_PREFIX))
        sd.update(ldm_layout.open_clip_to_ldm(encoders[1], model_detection.SDXL_OPENCLIP_PREFIX))
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def save_original(model: dict, path: Path, dtype=None) -> Path:
    """Write a `.safetensors` or `.ckpt` (`{"state_dict": ...}`) in the original layout."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = original_state_dict(model)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, path)
    else:
        torch.save({"state_dict": sd, "global_step": 470000}, path)
    return path


def save_diffusers(model: dict, folder: Path) -> Path:
    """Write a diffusers folder (model_index.json, scheduler, unet, vae, text encoders; no tokenizer)."""
    from diffusers import DDIMScheduler

    folder = Path(folder)
    family = model["config"]["family"]
    model["unet"].save_pretrained(folder / "unet")
    model["vae"].save_pretrained(folder / "vae")
    DDIMScheduler.from_config(model["config"]["scheduler"]).save_pretrained(folder / "scheduler")
    names = ["text_encoder", "text_encoder_2"]
    index = {
        "_class_name": "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    for name, encoder in zip(names, model["text_encoders"]):
        encoder.save_pretrained(folder / name)
        index[name] = ["transformers", type(encoder).__name__]
        index[name.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


# -- upscalers and face restorers ----------------------------------------------------------------
def rrdbnet_state(features: int = 8, blocks: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """RealESRGAN_x4plus's key layout (conv_first, body.N.rdbM.convK, conv_up1/2, conv_hr, conv_last),
    shrunk: 8 features, one block (the grow channels stay 32, as in the architecture)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}

    def conv(name: str, out_channels: int, in_channels: int) -> None:
        scale = 0.5 / (in_channels * 9) ** 0.5
        state[f"{name}.weight"] = torch.randn(out_channels, in_channels, 3, 3, generator=generator) * scale
        state[f"{name}.bias"] = torch.randn(out_channels, generator=generator) * 0.01

    conv("conv_first", features, 3)
    for block in range(blocks):
        for rdb in (1, 2, 3):
            for index in range(1, 6):
                conv(f"body.{block}.rdb{rdb}.conv{index}", 32 if index < 5 else features, features + (index - 1) * 32)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        conv(name, features, features)
    conv("conv_last", 3, features)
    return state


def compact_state(features: int = 8, convs: int = 2, scale: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    """realesr-general-x4v3's SRVGGNetCompact layout: body.0 conv, PReLUs between convs, last conv to
    3 x scale^2 channels (pixel shuffle)."""
    generator = torch.Generator().manual_seed(seed)
    state = {"body.0.weight": torch.randn(features, 3, 3, 3, generator=generator) * 0.2,
             "body.0.bias": torch.zeros(features), "body.1.weight": torch.full((features,), 0.25)}
    index = 2
    for _ in range(convs):
        state[f"body.{index}.weight"] = torch.randn(features, features, 3, 3, generator=generator) * 0.1
        state[f"body.{index}.bias"] = torch.zeros(features)
        state[f"body.{index + 1}.weight"] = torch.full((features,), 0.25)
        index += 2
    state[f"body.{index}.weight"] = torch.randn(3 * scale * scale, features, 3, 3, generator=generator) * 0.1
    state[f"body.{index}.bias"] = torch.zeros(3 * scale * scale)
    return state


def save_face_restorers(gfpgan_dir: Path, codeformer_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """`GFPGANv1.4.pth` (the full GFPGANv1Clean, 86M parameters: spandrel reads only that size) and
    `codeformer-v0.1.0.pth` (CodeFormer with one transformer layer instead of nine), both as
    `{"params_ema": state}` like the released files, with random weights."""
    from spandrel.architectures.GFPGAN import GFPGAN
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

    torch.manual_seed(seed)
    gfpgan = GFPGAN(out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None,
                    fix_decoder=False, num_mlp=8, input_is_latent=True, different_w=True, narrow=1, sft_half=True)
    codeformer = CodeFormer(dim_embd=512, n_head=8, n_layers=1, codebook_size=1024, latent_size=256,
                            connect_list=["32", "64", "128", "256"], fix_modules=["quantize", "generator"])
    paths = Path(gfpgan_dir) / "GFPGANv1.4.pth", Path(codeformer_dir) / "codeformer-v0.1.0.pth"
    for model, path in zip((gfpgan, codeformer), paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"params_ema": model.state_dict()}, path)
    return paths
