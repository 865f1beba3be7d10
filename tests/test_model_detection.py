"""Family detection and config derivation from tensor shapes alone."""

import pytest
import torch
from accelerate import init_empty_weights

from backend import ldm_layout, model_detection, random_models
from backend.checkpoints import text_config, text_encoder_class
from backend.model_detection import CheckpointFormatError


def full_size_shapes(family: str) -> dict[str, tuple[int, ...]]:
    """The key -> shape map of a real-size checkpoint, built on the meta device (no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    config = random_models.configs(family, tiny=False)
    with init_empty_weights():
        model = {
            "config": config,
            "unet": UNet2DConditionModel.from_config(config["unet"]),
            "vae": AutoencoderKL.from_config(config["vae"]),
            "text_encoders": [text_encoder_class(c)(text_config(c)) for c in config["text_encoders"]],
        }
    sd = ldm_layout.unet_to_ldm(model["unet"].state_dict(), config["unet"]["layers_per_block"])
    sd.update(ldm_layout.vae_to_ldm(model["vae"].state_dict()))
    encoders = [e.state_dict() for e in model["text_encoders"]]
    if family == "sd1":
        sd.update(ldm_layout.clip_to_ldm(encoders[0], model_detection.SD1_CLIP_PREFIX))
    elif family == "sd2":
        sd.update(ldm_layout.open_clip_to_ldm(encoders[0], model_detection.SD2_OPENCLIP_PREFIX, 22))
    else:
        sd.update(ldm_layout.clip_to_ldm(encoders[0], model_detection.SDXL_CLIP_PREFIX))
        sd.update(ldm_layout.open_clip_to_ldm(encoders[1], model_detection.SDXL_OPENCLIP_PREFIX))
    return {k: tuple(v.shape) for k, v in sd.items()}


UNET_KEYS = ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "cross_attention_dim",
             "attention_head_dim", "in_channels", "out_channels")


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_key_sets_give_the_shipped_configs(family):
    shapes = full_size_shapes(family)
    spec = model_detection.detect(shapes)
    shipped = model_detection.family_config(family)
    assert spec.family == family
    for key in UNET_KEYS:
        assert spec.unet[key] == shipped["unet"][key], key
    for key in ("block_out_channels", "layers_per_block", "latent_channels"):
        assert spec.vae[key] == shipped["vae"][key]
    for got, expected in zip(spec.text_encoders, shipped["text_encoders"]):
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
            assert got[key] == expected[key], key


def test_sd15_key_set_has_the_real_layout():
    shapes = full_size_shapes("sd1")
    # A few keys and shapes exactly as in v1-5-pruned-emaonly.safetensors
    assert shapes["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert shapes["model.diffusion_model.output_blocks.11.0.skip_connection.weight"] == (320, 640, 1, 1)
    assert shapes["model.diffusion_model.middle_block.1.proj_in.weight"] == (1280, 1280, 1, 1)
    assert shapes["first_stage_model.decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert shapes["first_stage_model.encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] == (49408, 768)
    assert len([k for k in shapes if k.startswith("model.diffusion_model.")]) == 686


def test_sd2_v_prediction_is_left_to_the_probe_and_sdxl_markers_are_read():
    assert model_detection.detect(full_size_shapes("sd2")).prediction_type is None
    shapes = full_size_shapes("sdxl")
    assert model_detection.detect(shapes).prediction_type == "epsilon"
    shapes.update({"v_pred": (), "ztsnr": ()})
    spec = model_detection.detect(shapes)
    assert spec.prediction_type == "v_prediction"
    assert spec.scheduler["rescale_betas_zero_snr"] is True


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "models/Lora"),
        ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)}, "models/VAE"),
        ({"emb_params": (2, 768)}, "models/embeddings"),
        ({"conv_first.weight": (64, 3, 3, 3)}, "no Stable Diffusion UNet"),
    ],
)
def test_files_that_are_not_checkpoints_are_named(keys, message):
    with pytest.raises(CheckpointFormatError, match=message):
        model_detection.detect(keys)


@pytest.mark.parametrize("keys, family", [
    ({"double_blocks.0.img_attn.qkv.weight": (9216, 3072), "guidance_in.in_layer.weight": (3072, 256)}, "FLUX.1"),
    ({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (96, 32),  # ComfyUI's all-in-one, tiny
      "vae.decoder.conv_in.weight": (8, 4, 3, 3)}, "FLUX.1"),
    ({"transformer_blocks.0.attn.add_k_proj.weight": (24, 24),  # diffusers' FLUX has these too
      "single_transformer_blocks.0.proj_out.weight": (24, 120)}, "FLUX.1"),
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536),
      "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)},
     "Stable Diffusion 3"),
    ({"transformer_blocks.0.attn.add_k_proj.weight": (64, 64), "pos_embed.proj.weight": (64, 16, 2, 2)},
     "Stable Diffusion 3"),
])
def test_flux_and_sd3_files_are_named_from_their_block_names_whatever_their_size(keys, family):
    from backend import families

    assert model_detection.transformer_family(keys) == family
    with pytest.raises(CheckpointFormatError, match=f"it is a {family} model, not an SD 1.x"):
        model_detection.detect(keys)  # the UNet families' reader refuses it; its own family claims it
    assert families.identify(keys).label == {"FLUX.1": "FLUX.1", "Stable Diffusion 3": "SD 3"}[family]
    assert model_detection.transformer_family(full_size_shapes("sdxl")) is None


def test_unet_without_text_encoder_is_explained():
    shapes = {k: v for k, v in full_size_shapes("sd1").items() if k.startswith("model.diffusion_model.")}
    with pytest.raises(CheckpointFormatError, match="no text encoder .*SD 1.x"):
        model_detection.detect(shapes)


def test_tiny_configs_round_trip(tiny_models):
    for family in ("sd1", "sd2", "sdxl"):
        sd = random_models.original_state_dict(tiny_models[family])
        spec = model_detection.detect({k: tuple(v.shape) for k, v in sd.items()})
        built = tiny_models[family]["config"]["unet"]
        for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                    "cross_attention_dim"):
            assert spec.unet[key] == built[key], (family, key)
        if family == "sdxl":
            assert spec.unet["transformer_layers_per_block"] == [1, 2]
            assert spec.unet["addition_time_embed_dim"] == 8
    assert torch.is_tensor(sd["model.diffusion_model.out.2.weight"])


def test_instruct_pix2pix_is_refused_with_a_reason():
    shapes = full_size_shapes("sd1")
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 8, 3, 3)
    with pytest.raises(CheckpointFormatError, match="instruct-pix2pix"):
        model_detection.detect(shapes)
