"""T2I-Adapters and union ControlNets in models/ControlNet: tiny random adapters written in TencentARC's layout
(.safetensors/.pth, with and without `adapter.`) and diffusers' layout load to the same `T2IAdapter`; applied
in generation once per pass, scaled, windowed, masked and mixed with ControlNets as sd-webui-controlnet does;
union ControlNets told their control type."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from backend import control_pass, control_units, controlnet_files, random_adapters, random_controlnets, random_models
from backend.control_pass import ActiveControl, SamplingProgress, residuals
from backend.control_units import ControlError, ControlUnit
from backend.controlnet_files import ControlNetBaseError, ControlNetFileError, inspect, load_controlnet
from backend.generation import generate
from backend.model_manager import ModelManager
from backend.request import GenerationRequest
from backend.settings import Settings


def edges() -> Image.Image:
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).rectangle((10, 12, 40, 44), outline="black", width=3)
    return image


def unet_config(family: str) -> dict:
    return random_models.configs(family, tiny=True)["unet"]


@torch.no_grad()
def features(adapter, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return adapter(torch.rand(1, adapter.config.in_channels, 64, 64, generator=generator))


# -- reading -------------------------------------------------------------------------------------------
ADAPTERS = {"sd1": ("sd1", 3), "sd1-grey": ("sd1", 1), "sdxl": ("sdxl", 3), "light": ("light", 3)}


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_every_layout_loads_to_the_same_adapter(tmp_path, name):
    kind, channels = ADAPTERS[name]
    adapter = random_adapters.build(kind, seed=2, in_channels=channels)
    folder = random_adapters.save_diffusers(adapter, tmp_path / f"{name}-diffusers")
    alone = tmp_path / "alone" / f"{name}.safetensors"  # diffusers weights without their config.json
    alone.parent.mkdir()
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", alone)
    files = [(random_adapters.save_tencentarc(adapter, tmp_path / f"t2iadapter_{name}_sd14v1.pth"), "tencentarc"),
             (random_adapters.save_tencentarc(adapter, tmp_path / f"{name}.safetensors", prefix=True), "tencentarc"),
             (folder, "diffusers"), (folder / "diffusion_pytorch_model.safetensors", "diffusers"), (alone, "diffusers")]
    family = "sdxl" if kind == "sdxl" else "sd1"
    expected = adapter.state_dict()
    for path, layout in files:
        info = inspect(path)
        assert (info.family, info.layout, info.kind, info.dtype) == (family, layout, "t2i_adapter", "float32"), path
        assert info.config == {k: v for k, v in adapter.config.items() if not k.startswith("_")}
        loaded = load_controlnet(path, family, unet_config=None if kind == "light" else unet_config(family))
        assert type(loaded).__name__ == "T2IAdapter"
        assert sorted(loaded.state_dict()) == sorted(expected)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
        assert all(torch.equal(a, b) for a, b in zip(features(loaded), features(adapter), strict=True))
    half = random_adapters.save_tencentarc(adapter, tmp_path / f"{name}-fp16.safetensors", torch.float16)
    assert inspect(half).dtype == "float16"
    loaded = load_controlnet(half, family, torch.float32)
    assert all(torch.equal(loaded.state_dict()[k], v.half().float()) for k, v in expected.items())


@pytest.mark.parametrize(("adapter_type", "factor", "in_channels", "channels", "family"), [
    ("full_adapter", 8, 3, [320, 640, 1280, 1280], "sd1"),  # t2iadapter_depth_sd14v1
    ("full_adapter", 8, 1, [320, 640, 1280, 1280], "sd1"),  # t2iadapter_canny_sd15v2
    ("full_adapter_xl", 16, 1, [320, 640, 1280, 1280], "sdxl"),  # t2i-adapter-canny-sdxl-1.0
    ("full_adapter_xl", 16, 3, [320, 640, 1280, 1280], "sdxl"),  # t2i-adapter-openpose-sdxl-1.0
    ("light_adapter", 8, 3, [320, 640, 1280], "sd1"),  # t2iadapter_color_sd14v1
])
def test_released_sizes_are_read_from_shapes(adapter_type, factor, in_channels, channels, family):
    """Real-size adapters on the meta device: the config read from TencentARC's shapes is the released one,
    and the features fit that family's real UNet (the base itself is told by the unshuffle factor)."""
    from accelerate import init_empty_weights
    from diffusers import T2IAdapter

    config = dict(in_channels=in_channels, channels=channels, num_res_blocks=2 if adapter_type != "light_adapter"
                  else 4, downscale_factor=factor, adapter_type=adapter_type)
    with init_empty_weights():
        released = T2IAdapter(**config)
    shapes = {k: tuple(v.shape) for k, v in random_adapters.tencentarc_state_dict(released).items()}
    info, _ = controlnet_files._identify(controlnet_files.Path("adapter.safetensors"), shapes, "float16")
    assert (info.family, info.kind, info.config) == (family, "t2i_adapter", config)
    assert controlnet_files._fits_unet(info, random_models.configs(family, tiny=False)["unet"])
    assert not controlnet_files._fits_unet(info, unet_config(family))


def test_adapters_for_another_base_and_damaged_files_are_refused_by_name(tmp_path):
    xl = random_adapters.save_tencentarc(random_adapters.build("sdxl", seed=1), tmp_path / "adapter-xl.safetensors")
    sd = random_adapters.save_diffusers(random_adapters.build("sd1", seed=1), tmp_path / "t2i-sd15")
    for path, loaded, words in ((xl, "sd1", ("T2I-Adapter for SDXL", "SD 1.x")),
                                (sd, "sdxl", ("T2I-Adapter for SD 1.x", "SDXL")),
                                (sd, "sd2", ("T2I-Adapter for SD 1.x", "SD 2.x"))):
        with pytest.raises(ControlNetBaseError) as caught:
            load_controlnet(path, loaded)
        message = str(caught.value)
        assert path.name in message and message.index(words[0]) < message.index(words[1]), message
    light = random_adapters.save_tencentarc(random_adapters.build("light"), tmp_path / "color.safetensors")
    with pytest.raises(ControlNetBaseError, match=r"color.safetensors does not fit .*\[32, 32\].*\[32, 64\]"):
        load_controlnet(light, "sd1", unet_config=unet_config("sd1"))
    pth = random_adapters.save_tencentarc(random_adapters.build("sd1"), tmp_path / "whole.pth")
    for whole in (xl, pth):
        truncated = tmp_path / f"t2iadapter_truncated{whole.suffix}"
        truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
        with pytest.raises(ControlNetFileError, match=truncated.name):
            load_controlnet(truncated, "sd1")
    state = random_adapters.tencentarc_state_dict(random_adapters.build("sd1"))
    pruned = {k: v for k, v in state.items() if k != "body.3.block2.weight"}
    save_file(pruned, tmp_path / "pruned.safetensors")
    with pytest.raises(ControlNetFileError, match=r"pruned.safetensors: the T2I-Adapter weights do not fit .*1 missing, "
                                                  r"e.g. adapter.body.1.resnets.1.block2.weight"):
        load_controlnet(tmp_path / "pruned.safetensors", "sd1")
    save_file({**state, "body.2.down_opt.op.weight": torch.zeros(1)}, tmp_path / "coadapter.safetensors")
    with pytest.raises(ControlNetFileError, match=r"coadapter.safetensors is not a ControlNet .*down_opt"):
        inspect(tmp_path / "coadapter.safetensors")


# -- applying ------------------------------------------------------------------------------------------
def adapter_control(unit: ControlUnit, adapter, mask=None, soft=False) -> ActiveControl:
    hint = torch.rand(1, adapter.config.in_channels, 64, 64, generator=torch.Generator().manual_seed(1))
    return ActiveControl(unit, adapter, hint, mask, soft, "t2i_adapter")


SAMPLE = torch.zeros(4, 4, 8, 8)  # rows 0-1: the negative prompt's, 2-3: the prompt's


def call(*controls, progress=None, uncond=slice(0, 2)):
    return residuals(list(controls), progress or SamplingProgress(0, 10), SAMPLE, torch.tensor(500.0),
                     torch.zeros(4, 77, 32), None, uncond)


def test_adapter_features_are_scaled_masked_and_computed_once_per_pass():
    adapter = random_adapters.build("sd1", seed=3)
    unit = adapter_control(ControlUnit("a", weight=0.5, guidance_start=0.3, guidance_end=0.6), adapter)
    reference = adapter(unit.hint)
    runs = []
    adapter.register_forward_hook(lambda *args: runs.append(1))
    acting = [call(unit, progress=SamplingProgress(step, 10)) for step in range(10)]
    assert [found is not None for found in acting] == [False] * 3 + [True] * 4 + [False] * 3 and len(runs) == 1
    found = acting[3]
    assert found.down is None and found.mid is None and set(found.unet_kwargs()) == {"down_intrablock_additional_residuals"}
    assert [f.shape[0] for f in found.intrablock] == [4, 4]
    assert all(torch.equal(f, (r * 0.5).expand(4, -1, -1, -1)) for f, r in zip(found.intrablock, reference, strict=True))
    assert found.unet_kwargs()["down_intrablock_additional_residuals"] is not found.intrablock  # the UNet pops it
    # "My prompt is more important": sd-webui-controlnet's soft weights for adapters, shallow first
    soft = call(adapter_control(ControlUnit("a", weight=2.0), adapter, soft=True)).intrablock
    assert all(torch.allclose(f[0], r[0] * 2.0 * s) for f, r, s in zip(soft, reference, (0.25, 0.62), strict=True))
    # "ControlNet is more important": nothing for the negative prompt's rows
    strong = call(adapter_control(ControlUnit("a", control_mode="ControlNet is more important"), adapter)).intrablock
    assert all(torch.all(f[:2] == 0) and torch.equal(f[2:], r.expand(2, -1, -1, -1)) for f, r in zip(strong, reference))
    # a mask over the left half of the latents confines every feature to it
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    masked = call(adapter_control(ControlUnit("a"), adapter, mask=mask)).intrablock
    assert all(torch.all(f[..., f.shape[-1] // 2:] == 0) and torch.all(f[..., : f.shape[-1] // 2] != 0) for f in masked)


class ConstantNet:
    """A ControlNet whose residuals are ones (12 down) and twos (mid) whatever the input."""

    def __call__(self, sample, t, encoder_hidden_states, controlnet_cond, added_cond_kwargs, return_dict):
        shape = (sample.shape[0], 2, 4, 4)
        return [torch.ones(shape) for _ in range(12)], torch.full(shape, 2.0)


def test_adapters_and_controlnets_act_in_the_same_call():
    adapter = random_adapters.build("sd1", seed=3)
    first, second = adapter_control(ControlUnit("a"), adapter), adapter_control(ControlUnit("b", weight=2.0), adapter)
    both = call(first, second, ActiveControl(ControlUnit("c", weight=0.5), ConstantNet(), torch.zeros(1, 3, 64, 64),
                                             None, False))
    assert set(both.unet_kwargs()) == {"down_block_additional_residuals", "mid_block_additional_residual",
                                       "down_intrablock_additional_residuals"}
    assert torch.all(both.mid == 1.0) and all(torch.all(d == 0.5) for d in both.down)
    reference = adapter(first.hint)
    assert all(torch.allclose(f, r.expand(4, -1, -1, -1) * 3) for f, r in zip(both.intrablock, reference, strict=True))


class OneModel:
    """A ControlNetCache that always gives one model."""

    def __init__(self, net):
        self.net = net

    def load(self, name, model):
        return self.net, f"{name} [0123abcd]"

    def annotator_weights(self, module):
        return None


def test_control_maps_fit_the_adapter():
    """A grey adapter (canny, sketch) gets the map's luma; SDXL's adapter unshuffles by 16, so with an SD VAE
    (latents 1/8) the size must be a multiple of 16."""
    model = SimpleNamespace(vae_scale_factor=8, device="cpu", dtype=torch.float32)
    unit = ControlUnit("adapter", "none", edges().convert("RGB"))
    colour, _ = control_pass.prepare((unit,), OneModel(random_adapters.build("sd1")), model, (64, 48), None, False)
    grey, _ = control_pass.prepare((unit,), OneModel(random_adapters.build("sd1", in_channels=1)), model, (64, 48),
                                    None, False)
    assert colour[0].hint.shape == (1, 3, 48, 64) and grey[0].hint.shape == (1, 1, 48, 64)
    assert torch.allclose(grey[0].hint[0, 0], colour[0].hint[0].mean(dim=0), atol=1e-6)  # a grey map: R = G = B
    xl = OneModel(random_adapters.build("sdxl"))
    assert control_pass.prepare((unit,), xl, model, (80, 64), None, False)[0][0].hint.shape == (1, 3, 64, 80)
    with pytest.raises(ControlError, match=r"unit 0: adapter \[0123abcd\] is a T2I-Adapter .* multiples of 16, not 72x64"):
        control_pass.prepare((unit,), xl, model, (72, 64), None, False)


# -- generations ---------------------------------------------------------------------------------------
def manager_with(tmp_path_factory, tokenizer_cache, checkpoint, files) -> ModelManager:
    from tests.conftest import install

    settings = Settings(data_dir=tmp_path_factory.mktemp("data"))
    settings.cache_dir.mkdir(parents=True)
    shutil.copytree(tokenizer_cache, settings.cache_dir, dirs_exist_ok=True)
    install(settings, checkpoint)
    folder = settings.model_dir("controlnet")
    for name, write in files.items():
        write(folder / name)
    return ModelManager(settings)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory, tokenizer_cache, model_files) -> ModelManager:
    adapter = random_adapters.build("sd1", seed=5)
    return manager_with(tmp_path_factory, tokenizer_cache, model_files["sd1"], {
        "t2iadapter_tiny_sd14v1.pth": lambda path: random_adapters.save_tencentarc(adapter, path),
        "sub/t2i-adapter-tiny": lambda path: random_adapters.save_diffusers(adapter, path),
        "t2iadapter_sketch_sd14v1.safetensors": lambda path: random_adapters.save_tencentarc(
            random_adapters.build("sd1", seed=6, in_channels=1), path, prefix=True),
        "control_tiny_canny.safetensors": lambda path: random_controlnets.save_lllyasviel(
            random_controlnets.build("sd1", seed=1), path),
    })


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory, tokenizer_cache, model_files) -> ModelManager:
    return manager_with(tmp_path_factory, tokenizer_cache, model_files["sdxl"], {
        "t2i-adapter-tiny-sdxl.safetensors": lambda path: random_adapters.save_tencentarc(
            random_adapters.build("sdxl", seed=7), path),
        "t2iadapter_tiny_sd14v1.pth": lambda path: random_adapters.save_tencentarc(random_adapters.build("sd1"), path),
        "controlnet-union-tiny": lambda path: random_controlnets.save_diffusers(
            random_controlnets.build("sdxl", seed=14, union=True), path),
    })


BASE = dict(prompt="a star", negative_prompt="blur", width=64, height=64, steps=3, seed=3, save_images=False,
            sampler="Euler")


def pixels(manager, *units, **fields) -> np.ndarray:
    result = generate(manager, GenerationRequest(**{**BASE, **fields}, control_units=tuple(units)))
    return np.asarray(result.images[0].image).astype(int)


def test_an_adapter_steers_weight_0_changes_nothing_and_both_layouts_agree(sd1):
    plain = pixels(sd1)
    steered = pixels(sd1, ControlUnit("t2iadapter_tiny_sd14v1", "canny", edges()))
    assert np.abs(steered - plain).mean() > 1
    assert np.array_equal(pixels(sd1, ControlUnit("t2iadapter_tiny_sd14v1", "canny", edges(), weight=0.0)), plain)
    assert np.array_equal(pixels(sd1, ControlUnit("sub/t2i-adapter-tiny", "canny", edges())), steered)
    sketch = pixels(sd1, ControlUnit("t2iadapter_sketch_sd14v1", "canny", edges()))  # a grey-input adapter
    assert np.abs(sketch - plain).mean() > 1 and np.abs(sketch - steered).mean() > 1


def test_guidance_start_and_end_window_an_adapter(sd1):
    """6 Euler steps: the UNet calls see A1111's sampling steps 0, 0, 1, 2, 3, 4 (fractions 0 to 2/3). The first
    steps shape a tiny model's image; the later ones move a few pixel values."""
    def unit(**fields):
        return ControlUnit("t2iadapter_tiny_sd14v1", "canny", edges(), **fields)

    plain, steered = pixels(sd1, steps=6), pixels(sd1, unit(), steps=6)
    early, late = pixels(sd1, unit(guidance_end=0.2), steps=6), pixels(sd1, unit(guidance_start=0.4), steps=6)
    assert np.abs(early - plain).mean() > 1 and not np.array_equal(early, steered)
    assert np.abs(late - steered).mean() > 1 and not np.array_equal(late, plain)
    assert np.array_equal(pixels(sd1, unit(guidance_start=0.9), steps=6), plain)


def test_an_adapter_and_a_controlnet_in_one_generation(sd1):
    adapter = ControlUnit("t2iadapter_tiny_sd14v1", "canny", edges())
    controlnet = ControlUnit("control_tiny_canny", "canny", edges())
    alone, both = pixels(sd1, controlnet), pixels(sd1, adapter, controlnet)
    assert np.abs(both - alone).mean() > 1 and np.abs(both - pixels(sd1, adapter)).mean() > 1
    assert np.array_equal(pixels(sd1, ControlUnit("t2iadapter_tiny_sd14v1", "canny", edges(), weight=0.0),
                                 controlnet), alone)


def test_an_sdxl_adapter_steers_an_sdxl_model_and_an_sd1_one_is_refused(sdxl):
    plain = pixels(sdxl)
    assert np.abs(pixels(sdxl, ControlUnit("t2i-adapter-tiny-sdxl", "canny", edges())) - plain).mean() > 1
    assert np.array_equal(pixels(sdxl, ControlUnit("t2i-adapter-tiny-sdxl", "canny", edges(), weight=0)), plain)
    with pytest.raises(ControlNetBaseError, match=r"ControlNet unit 0: t2iadapter_tiny_sd14v1.pth is a T2I-Adapter "
                                                  r"for SD 1.x models, but the loaded checkpoint is SDXL"):
        pixels(sdxl, ControlUnit("t2iadapter_tiny_sd14v1", "canny", edges()))


# -- union ControlNets ---------------------------------------------------------------------------------
def test_a_union_controlnet_takes_its_control_type(sdxl):
    plain = pixels(sdxl)
    canny = pixels(sdxl, ControlUnit("controlnet-union-tiny", "canny", edges()))  # the module's: Hard Edge
    depth = pixels(sdxl, ControlUnit("controlnet-union-tiny", "canny", edges(), union_control_type="Depth"))
    assert np.abs(canny - plain).mean() > 1 and np.abs(depth - canny).mean() > 1
    assert np.array_equal(pixels(sdxl, ControlUnit("controlnet-union-tiny", "canny", edges(),
                                                    union_control_type="Hard Edge")), canny)
    with pytest.raises(ControlError, match=r"module 'none' does not tell its control type: set the unit's union "
                                           r"control type to one of: OpenPose, Depth, Soft Edge, Hard Edge, Normal "
                                           r"Map, Segmentation$"):
        pixels(sdxl, ControlUnit("controlnet-union-tiny", "none", edges()))
    with pytest.raises(ControlError, match=r"knows 6 control types .*; union control type 'Tile' is not one of them"):
        pixels(sdxl, ControlUnit("controlnet-union-tiny", "canny", edges(), union_control_type="Tile"))


def test_union_residuals_are_diffusers_own():
    net = random_controlnets.build("sdxl", seed=14, union=True)
    generator = torch.Generator().manual_seed(0)
    sample, context = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 3, 64, generator=generator)
    added = {"text_embeds": torch.randn(2, 32, generator=generator), "time_ids": torch.tensor([[64.0] * 6] * 2)}
    hint = torch.rand(1, 3, 64, 64, generator=generator)
    found = {}
    for index in (1, 3):
        control = ActiveControl(ControlUnit("u", weight=0.5), net, hint, None, False, "union", index)
        found[index] = residuals([control], SamplingProgress(), sample, torch.tensor(500.0), context, added, None)
        types = torch.zeros(2, 6)
        types[:, index] = 1
        with torch.no_grad():
            down, mid = net(sample, torch.tensor(500.0), encoder_hidden_states=context, controlnet_cond=[hint.expand(2,
                            -1, -1, -1)], control_type=types, control_type_idx=[index], added_cond_kwargs=added,
                            return_dict=False)
        assert all(torch.equal(a, b * 0.5) for a, b in zip([*found[index].down, found[index].mid], [*down, mid],
                                                            strict=True))
    assert (found[1].mid - found[3].mid).abs().mean() > 1e-3


@pytest.mark.parametrize(("text", "module", "index"), [
    ("Hard Edge", False, 3), ("canny", False, 3), ("soft edge", False, 2), ("Normal_Map", False, 4),
    ("NormalMap", False, 4), ("segmentation", False, 5), ("repaint", False, 7), ("OPENPOSE", False, 0),
    ("lineart_anime", False, None), ("Unknown", False, None),
    ("softedge_hed", True, 2), ("depth_midas", True, 1), ("lineart_anime", True, 3), ("dw_openpose_full", True, 0),
    ("tile_resample", True, 6), ("blur_gaussian", True, 6), ("inpaint_only+lama", True, 7), ("scribble_xdog", True, 2),
    ("mlsd", True, 3), ("normal_bae", True, 4), ("seg_ofade20k", True, 5), ("none", True, None), ("shuffle", True, None),
])
def test_union_control_types_by_name_and_by_module(text, module, index):
    assert control_units.union_type_index(text, module=module) == index


def test_union_control_type_is_validated_written_and_read_back():
    with pytest.raises(ControlError, match=r"unit 2: union control type must be one of: OpenPose, Depth, Soft Edge, "
                                           r"Hard Edge, Normal Map, Segmentation, Tile, Inpaint .*not 'Sketch'"):
        ControlUnit("u", union_control_type="Sketch").validate(2)
    for accepted in ("scribble", "Unknown", "unknown", ""):
        ControlUnit("u", union_control_type=accepted).validate(0)
    params = control_units.infotext_parameters((ControlUnit("u", "canny", union_control_type="Depth"),
                                                ControlUnit("v", union_control_type="unknown")))
    assert params["ControlNet 0"].endswith("Union Control Type: Depth") and "Union" not in params["ControlNet 1"]
    back = control_units.units_from_infotext(params)
    assert back[0]["union_control_type"] == "Depth" and "union_control_type" not in back[1]
    assert control_units.unit_from_spec("model=u,module=canny,union=depth", None).union_control_type == "depth"
    assert control_units.unit_from_spec("model=u,pixel_perfect=true", None).pixel_perfect is True
    assert control_units.unit_from_spec("model=u,pixel_perfect=False", None).pixel_perfect is False
