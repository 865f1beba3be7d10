"""ControlNet files: tiny random ControlNets written in lllyasviel's layout (.safetensors/.pth, with and
without `control_model.`, fp16/fp32) and diffusers' layout load to the same weights and residuals;
families are detected from the tensors; wrong bases, damaged and foreign files are refused by name;
the library titles and resolves models the way sd-webui-controlnet does."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from backend import controlnet_files, random_controlnets, random_models
from backend.controlnet_files import (
    ControlNetBaseError,
    ControlNetFileError,
    ControlNetNotFoundError,
    inspect,
    load_controlnet,
)
from backend.controlnet_library import ControlNetLibrary, model_hash
from backend.errors import InputError, ModelFileError
from backend.settings import Settings

SEEDS = {"sd1": 11, "sd2": 12, "sdxl": 13}


@pytest.fixture(scope="module")
def controlnets() -> dict:
    models = {family: random_controlnets.build(family, seed) for family, seed in SEEDS.items()}
    models["union"] = random_controlnets.build("sdxl", seed=14, union=True)
    return models


def unet_config(family: str) -> dict:
    return random_models.configs(family, tiny=True)["unet"]


def rounded(model, dtype):
    """The reference for a file stored in `dtype`: the model's weights rounded to it, in fp32."""
    return {k: v.to(dtype).float() for k, v in model.state_dict().items()}


@torch.no_grad()
def residuals(model, seed: int = 0, union: bool = False) -> list[torch.Tensor]:
    """down_block_res_samples + [mid_block_res_sample] for a fixed input (SDXL: with size conditioning)."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    kwargs = dict(
        sample=torch.randn(1, 4, 8, 8, generator=generator),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 3, config.cross_attention_dim, generator=generator),
        return_dict=False,
    )
    cond = torch.rand(1, 3, 64, 64, generator=generator)
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=generator),
                                       "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    if union:
        kwargs.update(controlnet_cond=[cond], control_type=torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 0.0]]),
                      control_type_idx=[1])
    else:
        kwargs["controlnet_cond"] = cond
    down, mid = model(**kwargs)
    return [*down, mid]


def assert_same_model(loaded, reference_model, dtype=torch.float32, union=False) -> None:
    expected = rounded(reference_model, dtype)
    actual = loaded.state_dict()
    assert sorted(actual) == sorted(expected)
    assert all(torch.equal(actual[k], expected[k]) for k in expected)
    reference = type(reference_model).from_config(reference_model.config).eval()
    reference.load_state_dict(expected)
    want, got = residuals(reference, union=union), residuals(loaded, union=union)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # Randomised zero-convolutions: the residuals carry the condition image, so the comparison means something.
    assert all(r.abs().mean() > 1e-3 for r in got)


# -- the same ControlNet in every layout -----------------------------------------------------------
LLLYASVIEL_VARIANTS = [pytest.param(suffix, dtype, prefix, id=f"{suffix[1:]}-{str(dtype)[6:]}-{'prefix' if prefix else 'bare'}")
                       for suffix in (".safetensors", ".pth") for dtype in (torch.float32, torch.float16)
                       for prefix in (True, False)]


@pytest.mark.parametrize(("suffix", "dtype", "prefix"), LLLYASVIEL_VARIANTS)
def test_lllyasviel_files_load_to_the_same_model(tmp_path, controlnets, suffix, dtype, prefix):
    name = f"control_tiny_{str(dtype)[6:]}_{'prefixed' if prefix else 'bare'}{suffix}"
    path = random_controlnets.save_lllyasviel(controlnets["sd1"], tmp_path / name, dtype, prefix)
    info = inspect(path)
    assert (info.family, info.layout, info.kind, info.dtype) == ("sd1", "lllyasviel", "controlnet", str(dtype)[6:])
    loaded = load_controlnet(path, "sd1", torch.float32, "cpu", unet_config("sd1"))
    assert type(loaded).__name__ == "ControlNetModel"
    assert_same_model(loaded, controlnets["sd1"], dtype)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_family_loads_alike_from_both_layouts(tmp_path, controlnets, family):
    model = controlnets[family]
    single = random_controlnets.save_lllyasviel(model, tmp_path / f"{family}.safetensors")
    folder = random_controlnets.save_diffusers(model, tmp_path / f"{family}-diffusers")
    # A diffusers weights file alone (its config.json moved away): the config comes from the tensors.
    alone = tmp_path / "alone" / f"{family}-diffusers.safetensors"
    alone.parent.mkdir()
    alone.write_bytes((folder / "diffusion_pytorch_model.safetensors").read_bytes())
    for path, layout in ((single, "lllyasviel"), (folder, "diffusers"), (alone, "diffusers")):
        info = inspect(path)
        assert (info.family, info.layout, info.kind) == (family, layout, "controlnet"), path
        loaded = load_controlnet(path, family, torch.float32, "cpu", unet_config(family))
        assert_same_model(loaded, model)
    if family != "sdxl":  # without the base UNet's config, the family's conventions (tiny SDXL's size embedding is not)
        assert_same_model(load_controlnet(single, family), model)


def test_diffusers_weights_file_with_config_beside_it(tmp_path, controlnets):
    folder = random_controlnets.save_diffusers(controlnets["sd1"], tmp_path / "canny", dtype=torch.float16)
    weights = folder / "diffusion_pytorch_model.safetensors"
    assert inspect(weights).dtype == "float16"
    loaded = load_controlnet(weights, "sd1", unet_config=unet_config("sd1"))
    assert_same_model(loaded, controlnets["sd1"], torch.float16)
    assert loaded.dtype == torch.float32
    half = load_controlnet(weights, "sd1", torch.float16, "cpu")
    expected = rounded(controlnets["sd1"], torch.float16)
    assert all(v.dtype == torch.float16 and torch.equal(v.float(), expected[k]) for k, v in half.state_dict().items())


def test_bin_weights_are_read_weights_only(tmp_path, controlnets):
    folder = random_controlnets.save_diffusers(controlnets["sd2"], tmp_path / "bin")
    state = controlnets["sd2"].state_dict()
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    assert_same_model(load_controlnet(folder, "sd2", unet_config=unet_config("sd2")), controlnets["sd2"])
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02cos\nsystem\n.")  # a pickle that imports code
    with pytest.raises(ModelFileError, match="diffusion_pytorch_model.bin"):
        load_controlnet(folder, "sd2")


def test_union_controlnet_loads_with_and_without_its_config(tmp_path, controlnets):
    union = controlnets["union"]
    folder = random_controlnets.save_diffusers(union, tmp_path / "union")
    info = inspect(folder)
    assert (info.family, info.layout, info.kind) == ("sdxl", "diffusers", "union")
    loaded = load_controlnet(folder, "sdxl", unet_config=unet_config("sdxl"))
    assert type(loaded).__name__ == "ControlNetUnionModel"
    assert_same_model(loaded, union, union=True)
    # A config.json that does not fit (ProMax weights beside the original's config): the tensors' config wins.
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_control_type": 8}))
    assert_same_model(load_controlnet(folder, "sdxl", unet_config=unet_config("sdxl")), union, union=True)
    (folder / "config.json").unlink()
    assert_same_model(load_controlnet(folder, "sdxl", unet_config=unet_config("sdxl")), union, union=True)
    with pytest.raises(ValueError, match="diffusers layout only"):
        random_controlnets.save_lllyasviel(union, tmp_path / "union.safetensors")


def test_shuffle_pools_its_residuals(tmp_path, controlnets):
    """Weights cannot tell: a .yaml beside the file decides (A1111), else "shuffle" in the name does
    (sd-webui-controlnet)."""
    plain = random_controlnets.save_lllyasviel(controlnets["sd1"], tmp_path / "control_v11p_sd15_canny.pth")
    shuffle = random_controlnets.save_lllyasviel(controlnets["sd1"], tmp_path / "control_v11e_sd15_shuffle.pth")
    configured = random_controlnets.save_lllyasviel(controlnets["sd1"], tmp_path / "renamed.pth")
    configured.with_suffix(".yaml").write_text(
        "model:\n  params:\n    control_stage_config:\n      params:\n        global_average_pooling: True\n")
    pooled = {path.stem: load_controlnet(path, "sd1", unet_config=unet_config("sd1")).config.global_pool_conditions
              for path in (plain, shuffle, configured)}
    assert pooled == {"control_v11p_sd15_canny": False, "control_v11e_sd15_shuffle": True, "renamed": True}


@pytest.mark.parametrize(("family", "depths"), [
    ("sd1", None), ("sd2", None), ("sdxl", None),
    ("sdxl", [0, 0, 1]), ("sdxl", [0, 0, 0]),  # the "mid" and "small" SDXL ControlNets
])
def test_released_sizes_are_read_from_shapes(family, depths):
    """Real-size architectures, on the meta device (no memory): the config read from the original layout's
    shapes builds the same modules, with the family's attention heads and size embedding."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    unet = random_models.configs(family, tiny=False)["unet"]
    if depths:
        unet["transformer_layers_per_block"] = depths
    with init_empty_weights():
        released = ControlNetModel.from_unet(UNet2DConditionModel.from_config(unet), load_weights_from_unet=False)
        shapes = {k: tuple(v.shape) for k, v in random_controlnets.lllyasviel_state_dict(released).items()}
        info, _ = controlnet_files._identify(Path(f"{family}.safetensors"), shapes, "float16")
        config = controlnet_files._full_config(info.config, info.family, info.kind, None)
        rebuilt = ControlNetModel.from_config(config)
    assert info.family == family
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in released.state_dict().items()}
    for key in ("attention_head_dim", "addition_time_embed_dim", "cross_attention_dim", "use_linear_projection"):
        assert rebuilt.config[key] == released.config[key], key


# -- refusals -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("made_for", "loaded", "words"), [
    ("sdxl", "sd1", ("SDXL", "SD 1.x")),
    ("sd1", "sdxl", ("SD 1.x", "SDXL")),
    ("sd2", "sd1", ("SD 2.x", "SD 1.x")),
])
def test_controlnet_for_another_base_is_refused(tmp_path, controlnets, made_for, loaded, words):
    path = random_controlnets.save_lllyasviel(controlnets[made_for], tmp_path / f"cn-{made_for}.safetensors")
    with pytest.raises(ControlNetBaseError) as caught:
        load_controlnet(path, loaded)
    message = str(caught.value)
    assert isinstance(caught.value, InputError)
    assert path.name in message and all(word in message for word in words)
    assert message.index(words[0]) < message.index(words[1])


def test_controlnet_that_does_not_fit_the_unet_is_refused(tmp_path, controlnets):
    path = random_controlnets.save_lllyasviel(controlnets["sd1"], tmp_path / "tiny.safetensors")
    real_unet = random_models.configs("sd1", tiny=False)["unet"]
    with pytest.raises(ControlNetBaseError, match=r"tiny.safetensors does not fit .*\[32, 64\].*\[320, 640, 1280, 1280\]"):
        load_controlnet(path, "sd1", unet_config=real_unet)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_and_random_files_are_named(tmp_path, controlnets, suffix):
    whole = random_controlnets.save_lllyasviel(controlnets["sd1"], tmp_path / f"whole{suffix}")
    truncated = tmp_path / f"control_truncated{suffix}"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    noise = tmp_path / f"control_noise{suffix}"
    noise.write_bytes(torch.randint(0, 256, (50_000,), generator=torch.Generator().manual_seed(0),
                                    dtype=torch.uint8).numpy().tobytes())
    for path in (truncated, noise):
        with pytest.raises(ModelFileError, match=path.name) as caught:
            load_controlnet(path, "sd1")
        assert isinstance(caught.value, ControlNetFileError)
        with pytest.raises(ControlNetFileError, match=path.name):
            inspect(path)


def test_missing_weights_are_named(tmp_path, controlnets):
    state = random_controlnets.lllyasviel_state_dict(controlnets["sd1"])
    del state["control_model.zero_convs.1.0.weight"]
    save_file(state, tmp_path / "pruned.safetensors")
    with pytest.raises(ControlNetFileError, match=r"pruned.safetensors: .*incomplete.*controlnet_down_blocks.1"):
        load_controlnet(tmp_path / "pruned.safetensors", "sd1")


def foreign_files(controlnets) -> dict[str, tuple[dict, str]]:
    lllyasviel = random_controlnets.lllyasviel_state_dict(controlnets["sd1"], prefix=False)
    checkpoint = random_models.original_state_dict(random_models.build("sd1", tiny=True, seed=0))
    return {
        "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
                  "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}, "a LoRA"),
        "checkpoint": (checkpoint, "a Stable Diffusion checkpoint"),
        "control-lora": ({**lllyasviel, "lora_controlnet": torch.zeros(1)}, "a Control-LoRA"),
        "t2i-style": ({"style_embedding": torch.zeros(1, 8, 16), "ln_post.weight": torch.zeros(16)},
                      "a T2I-Adapter style model, which Easel does not apply"),
        "noise-keys": ({"weight": torch.zeros(3)}, "no ControlNet weights"),
    }


def test_files_that_are_not_controlnets_are_refused(tmp_path, controlnets):
    for name, (state, words) in foreign_files(controlnets).items():
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, path)
        for call in (lambda: inspect(path), lambda: load_controlnet(path, "sd1")):
            with pytest.raises(ControlNetFileError, match=f"{name}.safetensors is not a ControlNet.*{words}"):
                call()


# -- the library ---------------------------------------------------------------------------------------
def old_hash(path: Path) -> str:
    """A1111's `sd_models.model_hash`, written out: sha256 of bytes [1 MiB, 1 MiB + 64 KiB), 8 digits."""
    return hashlib.sha256(path.read_bytes()[0x100000:0x110000]).hexdigest()[:8]


def test_model_hash_is_a1111s_old_hash(tmp_path):
    big, small = tmp_path / "big.bin", tmp_path / "small.bin"
    big.write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    small.write_bytes(b"x" * 1000)
    assert model_hash(big) == old_hash(big) == hashlib.sha256(bytes(range(256)) * 256).hexdigest()[:8]
    assert model_hash(small) == "e3b0c442"  # sd-webui-controlnet's hash of any file under 1 MiB


@pytest.fixture
def library_root(tmp_path, controlnets) -> Path:
    root = tmp_path / "ControlNet"
    random_controlnets.save_lllyasviel(controlnets["sd1"], root / "control_v11p_sd15_canny.pth")
    random_controlnets.save_lllyasviel(controlnets["sd1"], root / "sd15" / "control_v11p_sd15_canny_fp16.safetensors",
                                       torch.float16)
    random_controlnets.save_lllyasviel(controlnets["sd2"], root / "sd21" / "deep" / "thibaud_sd21_depth.safetensors")
    folder = random_controlnets.save_diffusers(controlnets["union"], root / "sdxl" / "controlnet-union-sdxl-1.0")
    (folder / "diffusion_pytorch_model_promax.safetensors").write_bytes(
        (folder / "diffusion_pytorch_model.safetensors").read_bytes())
    (root / "None.pth").write_bytes(b"")  # sd-webui-controlnet never lists a model called None
    (root / "notes.txt").write_text("not a model")
    (root / ".hidden.safetensors").write_bytes(b"")
    return root


def test_library_lists_subfolders_with_sd_webui_controlnet_titles(library_root):
    library = ControlNetLibrary(library_root)
    rows = [(f.name, f.relative) for f in library.files]
    assert rows == [
        ("control_v11p_sd15_canny", "control_v11p_sd15_canny"),
        ("control_v11p_sd15_canny_fp16", "sd15/control_v11p_sd15_canny_fp16"),
        ("controlnet-union-sdxl-1.0", "sdxl/controlnet-union-sdxl-1.0"),
        ("diffusion_pytorch_model_promax", "sdxl/controlnet-union-sdxl-1.0/diffusion_pytorch_model_promax"),
        ("thibaud_sd21_depth", "sd21/deep/thibaud_sd21_depth"),
    ]
    union = library_root / "sdxl" / "controlnet-union-sdxl-1.0"
    assert library.titles()[0] == f"control_v11p_sd15_canny [{old_hash(library_root / 'control_v11p_sd15_canny.pth')}]"
    assert library.titles()[2] == f"controlnet-union-sdxl-1.0 [{old_hash(union / 'diffusion_pytorch_model.safetensors')}]"
    assert len({t.split(" [")[1] for t in library.titles()}) == 4  # the promax copy has the same bytes


def test_library_resolves_what_clients_send(library_root):
    library = ControlNetLibrary(library_root)
    canny = library.files[0]
    cases = {
        canny.title: canny.path,
        "control_v11p_sd15_canny": canny.path,
        "control_v11p_sd15_canny.pth": canny.path,
        "CONTROL_V11P_SD15_CANNY": canny.path,
        "control_v11p_sd15_canny [0123abcd]": canny.path,  # a title from another copy of the file
        "sd15/control_v11p_sd15_canny_fp16": library_root / "sd15" / "control_v11p_sd15_canny_fp16.safetensors",
        "controlnet-union-sdxl-1.0": library_root / "sdxl" / "controlnet-union-sdxl-1.0",
        "depth": library_root / "sd21" / "deep" / "thibaud_sd21_depth.safetensors",  # sd-webui-controlnet's substring
    }
    assert {text: library.resolve(text).path for text in cases} == cases
    assert library.resolve("None") is None and library.resolve("") is None and library.resolve(None) is None
    with pytest.raises(ControlNetNotFoundError, match=r"'openpose' not found in .*ControlNet; available: control_v11p"):
        library.resolve("openpose")


def test_library_finds_a_file_added_after_the_scan_and_follows_settings(tmp_path, library_root, controlnets):
    library = ControlNetLibrary([library_root, tmp_path / "missing"])
    random_controlnets.save_lllyasviel(controlnets["sd1"], library_root / "control_v11p_sd15_openpose.safetensors")
    assert library.resolve("control_v11p_sd15_openpose").name == "control_v11p_sd15_openpose"
    assert Settings(data_dir=tmp_path).model_dir("controlnet") == tmp_path / "models" / "ControlNet"
    assert Settings(data_dir=tmp_path, controlnet_dir=library_root).model_dir("controlnet") == library_root


def test_inspect_reads_only_the_header_of_safetensors(tmp_path, controlnets, monkeypatch):
    path = random_controlnets.save_lllyasviel(controlnets["sdxl"], tmp_path / "xl.safetensors")
    monkeypatch.setattr(controlnet_files, "read_state_dict", lambda p: pytest.fail("read the tensors"))
    assert inspect(path).family == "sdxl"
    with pytest.raises(ControlNetBaseError):
        load_controlnet(path, "sd1")  # refused before the weights are read
