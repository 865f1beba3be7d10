"""IP-Adapters and their CLIP image encoders: tiny random encoders (single file, h94's folder, open_clip) and
IP-Adapters (plain and plus, `.safetensors` and `.bin`, in h94's layout) read to the right config; the
decoupled cross-attention equals diffusers' own IP-Adapter; weight 0 and leaving the `with` block leave the
UNet exactly as it was; masks, several units and the negative prompt's tokens behave as sd-webui-controlnet's;
wrong bases, wrong encoders and damaged files are refused by name."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backend import clip_vision, ip_adapter, random_ip_adapters, random_models
from backend.clip_vision import ClipVisionFileError, ClipVisionLibrary, ClipVisionNotFoundError, preprocess
from backend.ip_adapter import IPAdapterBaseError, IPAdapterEncoderError, IPAdapterFileError, load_ip_adapter
from backend.ip_adapter_attention import applied, prepare_unit
from backend.settings import Settings

TINY = random_ip_adapters.TINY_CLIP_VISION
PLUS_WIDTH, PLAIN_WIDTH = TINY["hidden_size"], TINY["projection_dim"]


def _image(seed: int, size=(50, 70)) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def encoder_files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("clip_vision")
    model = random_ip_adapters.build_clip_vision(seed=0)
    other = random_ip_adapters.build_clip_vision(seed=1, hidden_size=48, projection_dim=24)
    return {"model": model,
            "single": random_ip_adapters.save_clip_vision(model, root / "clip_vision_tiny.safetensors"),
            "folder": random_ip_adapters.save_clip_vision_folder(model, root / "image_encoder"),
            "open_clip": random_ip_adapters.save_clip_vision(model, root / "open_clip_tiny.safetensors", "open_clip"),
            "other": random_ip_adapters.save_clip_vision(other, tmp_path_factory.mktemp("other") / "clip_wide.safetensors")}


@pytest.fixture(scope="module")
def encoder(encoder_files):
    return clip_vision.load_clip_vision(encoder_files["single"])


@pytest.fixture(scope="module")
def unets() -> dict:
    return {family: random_models.build(family, tiny=True, seed=seed)["unet"] for family, seed in
            (("sd1", 21), ("sdxl", 23))}


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory, unets) -> dict:
    root = tmp_path_factory.mktemp("ControlNet")
    files = {}
    for family, unet in unets.items():
        for kind, width in (("plain", PLAIN_WIDTH), ("plus", PLUS_WIDTH)):
            state = random_ip_adapters.ip_adapter_state(unet, kind, width, depth=4, seed=len(files))
            files[family, kind, "state"] = state
            for suffix in (".safetensors", ".bin"):
                name = f"ip-adapter{'-plus' if kind == 'plus' else ''}_{family}{suffix}"
                files[family, kind, suffix] = random_ip_adapters.save_ip_adapter(state, root / name)
    return files


def _inputs(family: str, unet, rows: int = 2, seed: int = 0) -> tuple[torch.Tensor, dict]:
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(rows, 4, 8, 8, generator=generator)
    kwargs = {"encoder_hidden_states": torch.randn(rows, 5, unet.config.cross_attention_dim, generator=generator)}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(rows, 32, generator=generator),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).expand(rows, -1)}
    return sample, kwargs


@torch.no_grad()
def _run(unet, sample, kwargs, patch=None, uncond_rows=None, fraction=0.0) -> torch.Tensor:
    extra = patch.unet_kwargs(sample, uncond_rows, fraction) if patch is not None else {}
    return unet(sample, 10, **kwargs, **extra).sample


# -- the image encoder --------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["single", "folder", "open_clip"])
def test_encoder_config_is_read_from_the_tensors_and_outputs_match(encoder_files, layout):
    info = clip_vision.inspect(encoder_files[layout])
    assert info.layout == ("open_clip" if layout == "open_clip" else "transformers")
    assert info.config == {**TINY, "num_channels": 3}
    loaded = clip_vision.load_clip_vision(encoder_files[layout])
    pixels = preprocess(_image(1), TINY["image_size"])
    with torch.no_grad():
        expected = encoder_files["model"](pixel_values=pixels, output_hidden_states=True)
    encoding = loaded.encode(_image(1))
    assert torch.equal(encoding.image_embeds, expected.image_embeds)
    assert torch.equal(encoding.hidden_states, expected.hidden_states[-2])


@pytest.mark.parametrize("hidden, patch, layers, projection, name, heads, activation", [
    (1024, 14, 24, 768, "ViT-L/14", 16, "quick_gelu"),  # openai/clip-vit-large-patch14
    (1280, 14, 32, 1024, "ViT-H/14", 16, "gelu"),  # h94's models/image_encoder, clip_vision_h
    (1664, 14, 48, 1280, "ViT-bigG/14", 16, "gelu"),  # h94's sdxl_models/image_encoder, clip_vision_g
])
def test_released_encoders_are_recognised_by_width(hidden, patch, layers, projection, name, heads, activation):
    prefix = "vision_model.encoder.layers"
    shapes = {"vision_model.embeddings.patch_embedding.weight": (hidden, 3, patch, patch),
              "vision_model.embeddings.position_embedding.weight": ((224 // patch) ** 2 + 1, hidden),
              "visual_projection.weight": (projection, hidden)}
    shapes.update({f"{prefix}.{i}.mlp.fc1.weight": (4 * hidden if hidden != 1664 else 8192, hidden) for i in range(layers)})
    config = clip_vision._derive_config(shapes, "clip.safetensors", None)
    assert (config["num_attention_heads"], config["hidden_act"], config["image_size"]) == (heads, activation, 224)
    assert (config["num_hidden_layers"], config["projection_dim"]) == (layers, projection)
    assert clip_vision.ClipVisionInfo(Path("clip.safetensors"), "transformers", config).name == name


@pytest.mark.parametrize("size", [224, 32])
def test_preprocessing_equals_clip_image_processor(size):
    from skimage import data
    from transformers import CLIPImageProcessor

    try:  # transformers 5: the PIL backend is its own class; transformers 4's CLIPImageProcessor is PIL
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as PilProcessor
    except ImportError:
        PilProcessor = CLIPImageProcessor
    photo = Image.fromarray(data.astronaut())
    images = [photo.crop((10, 0, 400, 300)), photo.crop((0, 0, 150, 333)), photo.convert("L").resize((100, 180)),
              Image.fromarray((np.random.default_rng(1).random((91, 91, 4)) * 255).astype(np.uint8), "RGBA")]
    options = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                   image_mean=list(clip_vision.CLIP_MEAN), image_std=list(clip_vision.CLIP_STD))
    level = 2.5 / 255 / min(clip_vision.CLIP_STD)  # torchvision's resize rounds uint8 pixels a little differently
    for image in images:
        mine = preprocess(image, size)
        assert mine.shape == (1, 3, size, size) and mine.dtype == torch.float32
        assert torch.equal(mine, PilProcessor(**options)(images=image, return_tensors="pt")["pixel_values"])
        torchvision = CLIPImageProcessor(**options)(images=image, return_tensors="pt")["pixel_values"]
        assert (mine - torchvision).abs().max() <= level


def test_unconditional_encoding_is_h94s(encoder, encoder_files):
    encoding = encoder.encode(_image(2))
    assert torch.equal(encoding.uncond_image_embeds, torch.zeros(1, PLAIN_WIDTH))
    zeros = torch.zeros(1, 3, TINY["image_size"], TINY["image_size"])
    with torch.no_grad():
        expected = encoder_files["model"](pixel_values=zeros, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(encoding.uncond_hidden_states, expected)


def test_library_lists_resolves_and_finds_the_encoder_an_adapter_needs(encoder_files, adapter_files, tmp_path):
    (tmp_path / "sub").mkdir()
    for key in ("single", "other"):
        (tmp_path / ("sub" if key == "other" else "") / encoder_files[key].name).write_bytes(encoder_files[key].read_bytes())
    folder = tmp_path / "image_encoder"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((encoder_files["folder"] / name).read_bytes())
    library = ClipVisionLibrary(tmp_path)
    assert library.names() == ["clip_vision_tiny", "image_encoder", "sub/clip_wide"]
    assert library.resolve("clip_wide.safetensors").relative == "sub/clip_wide"
    with pytest.raises(ClipVisionNotFoundError, match="clip_vision_h.*available: clip_vision_tiny, image_encoder"):
        library.resolve("clip_vision_h")
    plus = ip_adapter.inspect(adapter_files["sd1", "plus", ".safetensors"])
    assert ip_adapter.find_encoder(plus, library).name == "clip_vision_tiny"
    assert Settings(data_dir=tmp_path).model_dir("clip_vision") == tmp_path / "models" / "clip_vision"


# -- reading IP-Adapters ------------------------------------------------------------------------------
def test_adapter_files_are_identified_from_their_tensors(adapter_files):
    for family, context, layers in (("sd1", 32, 4), ("sdxl", 64, 8)):
        for kind, tokens, width in (("plain", 4, PLAIN_WIDTH), ("plus", 16, PLUS_WIDTH)):
            infos = [ip_adapter.inspect(adapter_files[family, kind, suffix]) for suffix in (".safetensors", ".bin")]
            for info in infos:
                assert (info.kind, info.tokens, info.context_dim, info.encoder_width) == (kind, tokens, context, width)
                assert len(info.layer_shapes) == layers and info.family is None  # tiny widths name no family
            assert infos[0].layer_shapes == infos[1].layer_shapes
            assert ip_adapter.is_ip_adapter(adapter_files[family, kind, ".bin"])


@pytest.mark.parametrize("name, kind, context, width, layers, family, encoder", [
    ("ip-adapter_sd15", "plain", 768, 1024, 16, "sd1", "ViT-H"),
    ("ip-adapter_sd15_light", "plain", 768, 1024, 16, "sd1", "ViT-H"),
    ("ip-adapter-plus_sd15", "plus", 768, 1280, 16, "sd1", "ViT-H"),
    ("ip-adapter-plus-face_sd15", "plus", 768, 1280, 16, "sd1", "ViT-H"),
    ("ip-adapter_sdxl", "plain", 2048, 1280, 70, "sdxl", "ViT-bigG"),
    ("ip-adapter_sdxl_vit-h", "plain", 2048, 1024, 70, "sdxl", "ViT-H"),
    ("ip-adapter-plus_sdxl_vit-h", "plus", 2048, 1280, 70, "sdxl", "ViT-H"),
])
def test_released_adapters_name_their_base_and_encoder(name, kind, context, width, layers, family, encoder):
    shapes = {f"ip_adapter.{2 * i + 1}.{part}.weight": (640, context) for i in range(layers)
              for part in ("to_k_ip", "to_v_ip")}
    if kind == "plain":
        shapes.update({"image_proj.proj.weight": (4 * context, width), "image_proj.norm.weight": (context,)})
    else:
        hidden = 768 if family == "sd1" else 1280
        shapes.update({"image_proj.latents": (1, 16, hidden), "image_proj.proj_in.weight": (hidden, width),
                       "image_proj.proj_out.weight": (context, hidden)})
    info = ip_adapter._identify(Path(f"{name}.safetensors"), shapes, "float16")
    assert (info.kind, info.family, info.encoder) == (kind, family, encoder)
    with pytest.raises(IPAdapterBaseError, match=f"{name}.safetensors is an IP-Adapter for .* but the loaded checkpoint"):
        ip_adapter.check_base(info, None, "sd2")


# -- applying them ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("kind", ["plain", "plus"])
def test_decoupled_attention_equals_diffusers_ip_adapter(unets, adapter_files, encoder, family, kind):
    unet = unets[family]
    reference = copy.deepcopy(unet)
    reference._load_ip_adapter_weights([adapter_files[family, kind, "state"]], low_cpu_mem_usage=False)
    for processor in reference.attn_processors.values():
        if hasattr(processor, "scale"):
            processor.scale = [0.7]
    encoding = encoder.encode(_image(3))
    pairs = (encoding.uncond_image_embeds, encoding.image_embeds) if kind == "plain" else \
        (encoding.uncond_hidden_states, encoding.hidden_states)
    sample, kwargs = _inputs(family, unet)
    with torch.no_grad():
        added = {**kwargs.get("added_cond_kwargs", {}), "image_embeds": [torch.cat(pairs)[:, None]]}
        expected = reference(sample, 10, **{**kwargs, "added_cond_kwargs": added}).sample
    adapter = load_ip_adapter(adapter_files[family, kind, ".safetensors"], unet, family)
    with applied(unet, [prepare_unit(adapter, encoding, weight=0.7)]) as patch:
        out = _run(unet, sample, kwargs, patch, uncond_rows=slice(0, 1))
    assert (out - _run(unet, sample, kwargs)).abs().mean() > 1e-2
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_weight_zero_and_outside_guidance_are_the_plain_unet(unets, adapter_files, encoder):
    unet = unets["sd1"]
    adapter = load_ip_adapter(adapter_files["sd1", "plain", ".safetensors"], unet, "sd1")
    sample, kwargs = _inputs("sd1", unet)
    before = _run(unet, sample, kwargs)
    units = [prepare_unit(adapter, encoder.encode(_image(4)), weight=0.0),
             prepare_unit(adapter, encoder.encode(_image(5)), guidance_start=0.5, guidance_end=1.0)]
    with applied(unet, units) as patch:
        assert torch.equal(_run(unet, sample, kwargs, patch, slice(0, 1), fraction=0.2), before)
        assert not torch.equal(_run(unet, sample, kwargs, patch, slice(0, 1), fraction=0.5), before)
        units[1].weight = 0.0  # a caller may switch a unit off between steps
        assert torch.equal(_run(unet, sample, kwargs, patch, slice(0, 1), fraction=0.5), before)


def test_safetensors_and_bin_give_identical_outputs(unets, adapter_files, encoder):
    unet, encoding = unets["sdxl"], encoder.encode(_image(6))
    sample, kwargs = _inputs("sdxl", unet)
    outputs = []
    for suffix in (".safetensors", ".bin"):
        adapter = load_ip_adapter(adapter_files["sdxl", "plus", suffix], unet, "sdxl")
        with applied(unet, [prepare_unit(adapter, encoding)]) as patch:
            outputs.append(_run(unet, sample, kwargs, patch))
    assert torch.equal(outputs[0], outputs[1])


def test_the_unet_is_unchanged_after_the_block(unets, adapter_files, encoder):
    unet = unets["sd1"]
    sample, kwargs = _inputs("sd1", unet)
    before, state = _run(unet, sample, kwargs), {k: v.clone() for k, v in unet.state_dict().items()}
    processors = dict(unet.attn_processors)
    adapter = load_ip_adapter(adapter_files["sd1", "plus", ".bin"], unet, "sd1")
    with pytest.raises(RuntimeError, match="interrupted"):
        with applied(unet, [prepare_unit(adapter, encoder.encode(_image(7)))]) as patch:
            assert not torch.equal(_run(unet, sample, kwargs, patch), before)
            raise RuntimeError("interrupted")
    assert torch.equal(_run(unet, sample, kwargs), before)
    assert all(processors[name] is p for name, p in unet.attn_processors.items())
    assert unet.encoder_hid_proj is None and unet.config.encoder_hid_dim_type is None
    assert unet.state_dict().keys() == state.keys() and all(torch.equal(state[k], v) for k, v in unet.state_dict().items())


def test_a_different_image_changes_the_output(unets, adapter_files, encoder):
    unet = unets["sd1"]
    adapter = load_ip_adapter(adapter_files["sd1", "plus", ".safetensors"], unet, "sd1")
    sample, kwargs = _inputs("sd1", unet)
    outputs = []
    for seed in (8, 9):
        with applied(unet, [prepare_unit(adapter, encoder.encode(_image(seed)))]) as patch:
            outputs.append(_run(unet, sample, kwargs, patch))
    assert (outputs[0] - outputs[1]).abs().mean() > 1e-3


def _first_cross_attention_output(unet, call) -> torch.Tensor:
    captured = []
    layer = ip_adapter.cross_attention_layers(unet)[0]
    handle = layer.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        call()
    finally:
        handle.remove()
    return captured[0]


@torch.no_grad()
def _image_additions(unet, call) -> list[torch.Tensor]:
    """Per cross-attention layer (while applied): what the adapters added to its output, i.e. its output less
    what the layer's own processor gives on the same input."""
    records = []
    hooks = [layer.register_forward_hook(lambda m, args, kwargs, out: records.append((m, args[0], kwargs, out)),
                                         with_kwargs=True) for layer in ip_adapter.cross_attention_layers(unet)]
    try:
        call()
    finally:
        for hook in hooks:
            hook.remove()
    return [out - m.processor.original(m, hidden, encoder_hidden_states=kwargs["encoder_hidden_states"])
            for m, hidden, kwargs, out in records]


def test_a_mask_confines_the_unit_to_its_area(unets, adapter_files, encoder):
    unet = unets["sd1"]
    adapter = load_ip_adapter(adapter_files["sd1", "plain", ".safetensors"], unet, "sd1")
    sample, kwargs = _inputs("sd1", unet)
    mask = torch.zeros(64, 64)
    mask[:, :32] = 1  # the left half, given at image size: resized to each layer's grid (8 x 8 and 4 x 4 here)
    with applied(unet, [prepare_unit(adapter, encoder.encode(_image(10)), mask=mask)]) as patch:
        additions = _image_additions(unet, lambda: _run(unet, sample, kwargs, patch))
    assert sorted({a.shape[1] for a in additions}) == [16, 64]
    for addition in additions:
        side = int(addition.shape[1] ** 0.5)
        grid = addition.reshape(addition.shape[0], side, side, -1)
        assert torch.equal(grid[:, :, side // 2 :], torch.zeros_like(grid[:, :, side // 2 :]))
        assert grid[:, :, : side // 2].abs().mean() > 1e-2
    with applied(unet, [prepare_unit(adapter, encoder.encode(_image(10)), mask=torch.zeros(64, 64))]) as patch:
        assert torch.equal(_run(unet, sample, kwargs, patch), _run(unet, sample, kwargs))


def test_several_units_add_up(unets, adapter_files, encoder):
    unet = unets["sdxl"]
    plain = load_ip_adapter(adapter_files["sdxl", "plain", ".safetensors"], unet, "sdxl")
    plus = load_ip_adapter(adapter_files["sdxl", "plus", ".safetensors"], unet, "sdxl")
    units = [prepare_unit(plain, encoder.encode(_image(11)), weight=0.6), prepare_unit(plus, encoder.encode(_image(12)))]
    sample, kwargs = _inputs("sdxl", unet)
    base = _first_cross_attention_output(unet, lambda: _run(unet, sample, kwargs))
    deltas = []
    for chosen in ([units[0]], [units[1]], units):
        with applied(unet, chosen) as patch:
            deltas.append(_first_cross_attention_output(unet, lambda: _run(unet, sample, kwargs, patch)) - base)
    assert deltas[0].abs().mean() > 1e-2 and deltas[1].abs().mean() > 1e-2
    torch.testing.assert_close(deltas[2], deltas[0] + deltas[1], atol=1e-5, rtol=1e-4)


def test_the_negative_prompts_rows_get_the_unconditional_tokens(unets, adapter_files, encoder):
    unet = unets["sd1"]
    adapter = load_ip_adapter(adapter_files["sd1", "plain", ".safetensors"], unet, "sd1")
    sample, kwargs = _inputs("sd1", unet, rows=1)
    doubled = sample.repeat(2, 1, 1, 1), {k: v.repeat(2, 1, 1) for k, v in kwargs.items()}
    with applied(unet, [prepare_unit(adapter, encoder.encode(_image(13)))]) as patch:
        both = _run(unet, *doubled, patch, uncond_rows=slice(0, 1))
        uncond = _run(unet, sample, kwargs, patch, uncond_rows=[0])
        cond = _run(unet, sample, kwargs, patch)
    plain = _run(unet, sample, kwargs)
    torch.testing.assert_close(both[:1], uncond, atol=1e-5, rtol=1e-4)  # batch sizes round differently
    torch.testing.assert_close(both[1:], cond, atol=1e-5, rtol=1e-4)
    assert (uncond - cond).abs().mean() > 1e-3 and (uncond - plain).abs().mean() > 1e-3  # tokens, not nothing


# -- refusals -----------------------------------------------------------------------------------------
def test_an_adapter_for_another_base_is_refused(unets, adapter_files):
    with pytest.raises(IPAdapterBaseError, match=r"ip-adapter_sd1.safetensors does not fit .* patches 4 cross-attention "
                                                  r"layers of 32-wide context; the UNet has 8 of 64.*SDXL"):
        load_ip_adapter(adapter_files["sd1", "plain", ".safetensors"], unets["sdxl"], "sdxl")
    with pytest.raises(IPAdapterBaseError, match="ip-adapter-plus_sdxl.bin does not fit"):
        load_ip_adapter(adapter_files["sdxl", "plus", ".bin"], unets["sd1"], "sd1")


def test_the_wrong_or_a_missing_encoder_is_refused_naming_both(encoder_files, adapter_files, tmp_path):
    adapter_file = adapter_files["sd1", "plain", ".safetensors"]
    info = ip_adapter.inspect(adapter_file)
    wide = clip_vision.inspect(encoder_files["other"])
    with pytest.raises(IPAdapterEncoderError, match="ip-adapter_sd1 needs a CLIP ViT with 16-wide image embeds.*"
                                                    "clip_wide.safetensors is a 48-wide CLIP ViT/8"):
        ip_adapter.check_encoder(info, wide)
    with pytest.raises(IPAdapterEncoderError, match=r"ip-adapter_sd1 needs .* image encoder in .*; found: "
                                                    r"clip_wide \(48-wide CLIP ViT/8\)"):
        ip_adapter.find_encoder(info, ClipVisionLibrary(encoder_files["other"].parent))
    with pytest.raises(IPAdapterEncoderError, match="found: none"):
        ip_adapter.find_encoder(info, ClipVisionLibrary(tmp_path / "empty"))
    adapter = load_ip_adapter(adapter_file, random_models.build("sd1", tiny=True, seed=21)["unet"])
    with pytest.raises(IPAdapterEncoderError, match="needs a CLIP ViT with 16-wide image embeds"):
        adapter.image_tokens(clip_vision.load_clip_vision(encoder_files["other"]).encode(_image(14)))


def test_damaged_and_foreign_files_are_refused_by_name(unets, adapter_files, encoder_files, tmp_path):
    unet = unets["sd1"]
    for suffix in (".safetensors", ".bin"):
        truncated = tmp_path / f"ip-adapter_cut{suffix}"
        truncated.write_bytes(adapter_files["sd1", "plain", suffix].read_bytes()[:3000])
        with pytest.raises(IPAdapterFileError, match=f"ip-adapter_cut{suffix}: the file is truncated"):
            load_ip_adapter(truncated, unet, "sd1")
    state = copy.deepcopy(adapter_files["sd1", "plus", "state"])
    del state["image_proj"]["proj_out.weight"]
    incomplete = random_ip_adapters.save_ip_adapter(state, tmp_path / "ip-adapter_incomplete.bin")
    with pytest.raises(IPAdapterFileError, match="ip-adapter_incomplete.bin: .*incomplete"):
        load_ip_adapter(incomplete, unet, "sd1")
    with pytest.raises(IPAdapterFileError, match="clip_vision_tiny.safetensors is not an IP-Adapter"):
        ip_adapter.inspect(encoder_files["single"])
    unsafe = tmp_path / "ip-adapter_code.bin"
    torch.save({"image_proj": {"proj.weight": torch.zeros(1)}, "call": Path("x")}, unsafe)
    with pytest.raises(IPAdapterFileError, match="refused to load ip-adapter_code.bin"):
        load_ip_adapter(unsafe, unet)
    cut_encoder = tmp_path / "clip_cut.safetensors"
    cut_encoder.write_bytes(encoder_files["single"].read_bytes()[:5000])
    with pytest.raises(ClipVisionFileError, match="clip_cut.safetensors"):
        clip_vision.load_clip_vision(cut_encoder)
    with pytest.raises(ClipVisionFileError, match="ip-adapter_sd1.safetensors is an IP-Adapter"):
        clip_vision.inspect(adapter_files["sd1", "plain", ".safetensors"])
