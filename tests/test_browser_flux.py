"""FLUX.1 in a real browser: the top bar picks a transformer-only FLUX file, its text encoders (two CLIP-L
files to choose from) and its VAE; the page follows the family's presets (Euler, CFG 1) and generates."""

from __future__ import annotations

import shutil

import pytest
import torch

from backend.random_flow_models import ENCODER_FILES, build_flux, save_separate
from backend.random_t5_tokenizer import write_t5_tokenizer
from backend.settings import Settings
from tests.test_browser import (
    BROWSER_ARGS,
    CHROMIUM,
    DEFAULT_MODEL,
    choose_checkpoint,
    gallery_images,
    generate,
    playwright,
    screenshot,
    set_number,
    wait_for_text,
)

pytestmark = pytest.mark.skipif(not __import__("pathlib").Path(CHROMIUM).exists(), reason="chromium is not installed")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer_cache):
    from ui.launch import ServerOptions, launch

    data = tmp_path_factory.mktemp("flux-ui")
    settings = Settings(data_dir=data, default_checkpoint="easel-shapes")
    shutil.copytree(tokenizer_cache, settings.cache_dir, dirs_exist_ok=True)
    write_t5_tokenizer(settings.cache_dir)
    save_separate(build_flux(seed=4), settings.models_dir, "flux-dev", dtype=torch.float32, encoder_dtype=torch.float32)
    encoders = settings.model_dir("text_encoder")
    shutil.copy(encoders / ENCODER_FILES["clip_l"], encoders / "clip_l_other.safetensors")  # a choice to make
    shutil.copy(DEFAULT_MODEL, settings.model_dir("checkpoints") / DEFAULT_MODEL.name)
    demo, url, _ = launch(settings, ServerOptions(), block=False)
    yield url
    demo.close()


@pytest.fixture
def page(server):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.set_default_timeout(60_000)
        page.goto(server)
        page.wait_for_selector("#txt2img_prompt textarea")
        wait_for_text(page, "#model_status", "Model:")
        yield page
        browser.close()


def pick(page, selector: str, name: str) -> None:
    """Choose `name` in a dropdown and wait until the server's answer has re-rendered it with the choice.
    The answer to the previous pick can re-render the dropdown while this one is typed (the typed text is
    then lost), so type again when the status line does not name it."""
    for attempt in range(3):
        page.fill(f"{selector} input", name)  # typing filters the list; Enter takes the match
        page.keyboard.press("Enter")
        page.keyboard.press("Escape")
        try:  # the server took the pick (the status line names it)
            page.wait_for_function(
                "([sel, text]) => { const e = document.querySelector(sel); return e && e.innerText.includes(text); }",
                arg=["#model_status", name], timeout=20_000)
            return
        except playwright.TimeoutError:
            if attempt == 2:
                raise


def test_pick_a_flux_file_its_text_encoders_and_vae_and_generate(page):
    choose_checkpoint(page, "flux-dev.safetensors")  # two CLIP-L files and no pick: the error names the fix
    wait_for_text(page, "#model_status", "holds several")
    pick(page, "#setting_text_encoders", "clip_l.safetensors")
    pick(page, "#setting_text_encoders", "t5xxl_fp16.safetensors")
    pick(page, "#setting_sd_vae", "ae.safetensors")
    choose_checkpoint(page, "flux-dev.safetensors")
    wait_for_text(page, "#model_status", "Model: flux-dev · FLUX.1")
    page.wait_for_function("document.querySelector('#txt2img_sampler input').value == 'Euler'")
    assert page.input_value("#txt2img_cfg_scale input[type=number]") == "1"
    page.fill("#txt2img_prompt textarea", "a red cat")
    wait_for_text(page, ".easel-tokens", "/512")  # T5's tokens against FLUX.1 dev's limit
    for field, value in (("width", 64), ("height", 64), ("steps", 3)):
        set_number(page, f"#txt2img_{field} input[type=number]", value)
    set_number(page, "#txt2img_distilled_cfg_scale input[type=number]", 5)
    generate(page)
    shown = page.inner_text("#txt2img_infotext")
    screenshot(page, "flux-txt2img")
    assert "Model: flux-dev" in shown and "Distilled CFG Scale: 5" in shown and "VAE: ae.safetensors" in shown
    assert [image.size for image in gallery_images(page)] == [(64, 64)]
