"""The web UI in a real browser: Debian's Chromium driven by Playwright, against the app serving the
shipped default model. Screenshots of each tab land in test-artifacts/screenshots (for people to look
at; nothing compares them).

Skipped when Playwright or Chromium is missing (`run_tests.sh` installs both where it can).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from backend.settings import Settings

playwright = pytest.importorskip("playwright.sync_api")

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DEFAULT_MODEL = ROOT / "models" / "Stable-diffusion" / "easel-shapes.safetensors"
ARTIFACTS = Path(os.environ.get("EASEL_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "screenshots"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 60_000

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed "
                                "(apt-get install chromium)")


def start_server(data_dir: Path, tokenizer_cache: Path, **server_options):
    from ui.launch import ServerOptions, launch

    ckpt = data_dir / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    shutil.copy(DEFAULT_MODEL, ckpt / DEFAULT_MODEL.name)
    shutil.copytree(tokenizer_cache, data_dir / "cache", dirs_exist_ok=True)
    shutil.copytree(ROOT / "wildcards", data_dir / "wildcards")
    shutil.copytree(ROOT / "models" / "Lora", data_dir / "models" / "Lora")
    shutil.copytree(ROOT / "models" / "ControlNet", data_dir / "models" / "ControlNet")
    shutil.copytree(ROOT / "extensions", data_dir / "extensions")
    settings = Settings(data_dir=data_dir, default_checkpoint="easel-shapes")
    demo, url, _ = launch(settings, ServerOptions(**server_options), block=False)
    return demo, url, settings


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer_cache, face_model_dirs):
    data_dir = tmp_path_factory.mktemp("ui-data")
    ckpt = data_dir / "models" / "Stable-diffusion"
    (data_dir / "models").mkdir()
    for source in face_model_dirs:  # GFPGAN and CodeFormer files (random weights) for the Extras test
        (data_dir / "models" / source.name).symlink_to(source, target_is_directory=True)
    demo, url, settings = start_server(data_dir, tokenizer_cache)
    # A second copy to switch to, and a broken file that must not take the app down.
    shutil.copy(DEFAULT_MODEL, ckpt / "second-copy.safetensors")
    (ckpt / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    yield url, settings
    demo.close()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    url, _ = server
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    page.set_default_timeout(TIMEOUT_MS)
    page.outside_requests = []
    page.on("request", lambda r: r.url.startswith(url) or page.outside_requests.append(r.url))
    page.goto(url)
    page.wait_for_selector("#txt2img_prompt textarea")
    wait_for_text(page, "#model_status", "Model:")  # the page's load event has filled in the current model
    yield page
    page.close()


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def set_number(page, selector: str, value) -> None:
    """Type a number and commit it. A slider inside an accordion that has just opened can still be
    mounting and reset the typed value, so for sliders wait until the range input shows it too, and
    type again if it does not."""
    field = page.locator(selector).first
    container = selector.split(" ")[0]
    for attempt in range(3):
        field.fill(str(value))
        field.press("Tab")
        if page.locator(f"{container} input[type=range]").count() == 0:
            return
        try:
            page.wait_for_function(
                """([sel, value]) => [...document.querySelectorAll(`${sel} input`)]
                    .every(e => Number(e.value) === Number(value))""",
                arg=[container, value], timeout=5_000)
            return
        except playwright.TimeoutError:
            if attempt == 2:
                raise


def wait_for_text(page, selector: str, text: str) -> None:
    page.wait_for_function(
        "([sel, text]) => { const e = document.querySelector(sel); return e && e.innerText.includes(text); }",
        arg=[selector, text], timeout=TIMEOUT_MS,
    )


def generate(page, tab: str = "txt2img") -> None:
    """Click Generate and wait until this job's final status (images or an error) is shown."""
    page.evaluate(
        """tab => {
            window.easelStatuses = [];
            const target = document.querySelector(`#${tab}_progress`);
            new MutationObserver(() => window.easelStatuses.push(target.innerText))
                .observe(target, {childList: true, subtree: true, characterData: true});
        }""", tab)
    page.click(f"#{tab}_generate")
    try:
        page.wait_for_function(
            "() => window.easelStatuses.some(t => /image|⚠/.test(t) && !/ETA|Step/.test(t))", timeout=TIMEOUT_MS)
    except playwright.TimeoutError:
        screenshot(page, f"{tab}-generate-timeout")
        raise
    page.locator(f"#{tab}_generate").wait_for(state="visible")


def gallery_images(page, tab: str = "txt2img") -> list[Image.Image]:
    images = []
    for src in page.eval_on_selector_all(f"#{tab}_gallery .thumbnail-item img, #{tab}_gallery button img",
                                         "els => [...new Set(els.map(e => e.src))]"):
        response = page.request.get(src)
        assert response.ok, src
        images.append(Image.open(io.BytesIO(response.body())))
    return images


def test_txt2img_shows_the_image_and_its_infotext_and_saves_the_same(page, server):
    _, settings = server
    page.fill("#txt2img_prompt textarea", "a large red circle on a blue background, center")
    wait_for_text(page, ".easel-tokens", "/75")
    set_number(page, "#txt2img_seed input", 77)
    generate(page)
    images = gallery_images(page)
    assert len(images) == 1 and images[0].size == (64, 64)
    shown = page.inner_text("#txt2img_infotext")
    assert "a large red circle on a blue background, center" in shown and "Seed: 77" in shown
    assert "Size: 64x64" in shown and "Model: easel-shapes" in shown
    saved = sorted((settings.output_root / "txt2img-images").rglob("*-77.png"))
    assert saved, "the image was not saved"
    with Image.open(saved[-1]) as png:
        assert png.info["parameters"].replace("\n", " ") == shown.replace("\n", " ").strip()
        assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(images[0].convert("RGB")))
    assert images[0].info.get("parameters") == png.info["parameters"]  # downloads keep the infotext
    screenshot(page, "txt2img")
    assert page.outside_requests == []  # no fonts, analytics or version checks from other hosts


def test_same_seed_twice_is_identical_and_send_to_img2img_carries_image_and_prompt(page):
    prompt = "a small yellow square on a purple background, bottom right"
    page.fill("#txt2img_prompt textarea", prompt)
    set_number(page, "#txt2img_seed input", 4242)
    generate(page)
    first = np.asarray(gallery_images(page)[0].convert("RGB"))
    generate(page)
    second = np.asarray(gallery_images(page)[0].convert("RGB"))
    assert np.array_equal(first, second)
    page.click("#txt2img_send_to_img2img")
    page.wait_for_selector("#img2img_image img")
    assert page.input_value("#img2img_prompt textarea") == prompt
    assert page.input_value("#img2img_seed input") == "4242"
    src = page.get_attribute("#img2img_image img", "src")
    sent = np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))
    assert np.array_equal(sent, first)
    screenshot(page, "img2img")


def test_hires_fix_makes_the_large_image_and_pastes_back_from_png_info(page, server):
    _, settings = server
    page.fill("#txt2img_prompt textarea", "a large red star on a blue background, top left")
    set_number(page, "#txt2img_seed input", 31)
    page.click("text=Hires. fix")
    page.check("#txt2img_enable_hr input[type=checkbox]")
    set_number(page, "#txt2img_hr_scale input[type=number]", 1.5)
    set_number(page, "#txt2img_hires_steps input[type=number]", 4)
    set_number(page, "#txt2img_denoising_strength input[type=number]", 0.4)
    generate(page)
    images = gallery_images(page)
    assert [image.size for image in images] == [(96, 96)]
    shown = page.inner_text("#txt2img_infotext")
    assert "Size: 64x64" in shown and "Hires upscale: 1.5" in shown and "Hires steps: 4" in shown, shown
    assert "Denoising strength: 0.4" in shown and "Hires upscaler: Latent" in shown
    # the saved PNG, dropped on PNG Info and sent to txt2img, turns the hires fix on with its settings
    saved = sorted((settings.output_root / "txt2img-images").rglob("*-31.png"))[-1]
    page.reload()
    page.wait_for_selector("#txt2img_prompt textarea")
    page.click("button[role=tab]:has-text('PNG Info')")
    page.set_input_files("#pnginfo_image input[type=file]", str(saved))
    wait_for_text(page, "#pnginfo_html", "Hires upscale")
    page.click("#pnginfo_send_to_txt2img")
    page.wait_for_function("() => document.querySelector('#txt2img_prompt textarea').value.includes('red star')")
    page.click("text=Hires. fix")
    page.wait_for_function("() => document.querySelector('#txt2img_enable_hr input')?.checked")
    assert page.input_value("#txt2img_hr_scale input[type=number]") == "1.5"
    assert page.input_value("#txt2img_hires_steps input[type=number]") == "4"
    screenshot(page, "txt2img-hires")


def test_an_extension_panel_reaches_its_extension_and_the_extensions_tab_lists_them(page):
    page.fill("#txt2img_prompt textarea", "a large red star on a blue background, top left")
    set_number(page, "#txt2img_seed input", 12)
    page.click("#txt2img_ext_cfg-rescale button, #txt2img_ext_cfg-rescale >> text=CFG rescale")
    set_number(page, "#txt2img_ext_cfg-rescale_phi input[type=number]", 0.7)
    generate(page)
    assert "CFG Rescale phi: 0.7" in page.inner_text("#txt2img_infotext")
    page.click("button[role=tab]:has-text('Extensions')")
    table = page.inner_text("#extensions_table")
    assert "cfg-rescale" in table and "dynamic-thresholding" in table and "disabled" in table
    screenshot(page, "extensions")


def test_the_script_dropdown_runs_an_xyz_plot(page):
    page.fill("#txt2img_prompt textarea", "a large red star on a blue background, center")
    page.locator("#txt2img_script input").fill("X/Y/Z plot")
    page.keyboard.press("Enter")
    page.click("#txt2img_script_x-y-z-plot >> text=X/Y/Z plot settings")
    page.fill("#txt2img_ext_x-y-z-plot_x_values textarea, #txt2img_ext_x-y-z-plot_x_values input", "1, 2")
    generate(page)
    images = gallery_images(page)
    assert len(images) == 3 and images[0].width == 2 * 64 and images[0].height > 64  # grid (with legend), cells
    assert "X/Y/Z plot: 2 of 2 cells" in page.inner_text("#txt2img_progress")
    screenshot(page, "txt2img-xyz")


def test_interrupt_returns_to_ready_with_the_finished_images(page):
    page.fill("#txt2img_prompt textarea", "a large green star on a white background, top left")
    set_number(page, "#txt2img_steps input[type=number]", 150)
    set_number(page, "#txt2img_seed input", 5)
    set_number(page, "#txt2img_batch_count input[type=number]", 6)
    page.click("#txt2img_generate")
    wait_for_text(page, "#txt2img_progress", "batch 2/6")
    page.click("#txt2img_interrupt")
    wait_for_text(page, "#txt2img_progress", "Interrupted")
    page.locator("#txt2img_generate").wait_for(state="visible")
    assert not page.locator("#txt2img_interrupt").is_visible()
    assert 1 <= len(gallery_images(page)) < 6


def test_inpaint_upload_changes_only_the_masked_area(page, tmp_path):
    source = Image.new("RGB", (64, 64), (40, 80, 220))
    source.paste((240, 220, 40), (8, 8, 24, 24))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 32, 64, 64))
    source.save(tmp_path / "source.png")
    mask.save(tmp_path / "mask.png")
    page.click("button[role=tab]:has-text('img2img')")
    page.click("#img2img_modes button[role=tab]:has-text('Inpaint upload')")
    page.set_input_files("#img2img_upload_image input[type=file]", str(tmp_path / "source.png"))
    page.set_input_files("#img2img_upload_mask input[type=file]", str(tmp_path / "mask.png"))
    page.wait_for_selector("#img2img_upload_mask img")
    page.fill("#img2img_prompt textarea", "a large red circle on a blue background, bottom right")
    page.click("text=Inpaint settings")
    set_number(page, "#img2img_mask_blur input[type=number]", 0)
    set_number(page, "#img2img_denoising_strength input[type=number]", 1)
    set_number(page, "#img2img_seed input", 3)
    generate(page, "img2img")
    shown = page.inner_text("#img2img_infotext")
    assert "Mask blur: 0" in shown and "Denoising strength: 1" in shown and "Seed: 3," in shown, shown
    result = np.asarray(gallery_images(page, "img2img")[0].convert("RGB")).astype(int)
    original = np.asarray(source).astype(int)
    keep = np.asarray(mask) == 0
    assert np.array_equal(result[keep], original[keep])
    assert np.abs(result[~keep] - original[~keep]).mean() > 5  # the masked corner was repainted
    screenshot(page, "inpaint")


def test_png_info_fills_txt2img_from_an_a1111_infotext(page, tmp_path):
    text = ("a cat in a hat, (masterpiece:1.2)\nNegative prompt: blurry, lowres\n"
            "Steps: 33, Sampler: Euler a, Schedule type: Karras, CFG scale: 5.5, Seed: 424242, Size: 64x128, "
            "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, Version: v1.10.1")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (64, 128), (10, 20, 30)).save(tmp_path / "a1111.png", pnginfo=info)
    page.click("button[role=tab]:has-text('PNG Info')")
    page.set_input_files("#pnginfo_image input[type=file]", str(tmp_path / "a1111.png"))
    wait_for_text(page, "#pnginfo_html", "424242")
    screenshot(page, "png-info")
    page.click("#pnginfo_send_to_txt2img")
    page.wait_for_selector("#txt2img_prompt textarea")
    wait_for_text(page, "body", "txt2img")
    page.wait_for_function("document.querySelector('#txt2img_prompt textarea').value.includes('cat')")
    assert page.input_value("#txt2img_prompt textarea") == "a cat in a hat, (masterpiece:1.2)"
    assert page.input_value("#txt2img_neg_prompt textarea") == "blurry, lowres"
    assert page.input_value("#txt2img_seed input") == "424242"
    assert page.input_value("#txt2img_steps input[type=number]") == "33"
    assert page.input_value("#txt2img_cfg_scale input[type=number]") == "5.5"
    assert page.input_value("#txt2img_width input[type=number]") == "64"
    assert page.input_value("#txt2img_height input[type=number]") == "128"
    assert page.input_value("#txt2img_sampler input") == "Euler a"


def choose_checkpoint(page, name: str) -> None:
    page.click("#setting_sd_model_checkpoint input")
    page.click(f"ul[role=listbox] li:has-text('{name}')")


def test_switching_checkpoints_and_a_broken_file_keeps_the_previous_model(page):
    page.click("#refresh_checkpoints")
    choose_checkpoint(page, "second-copy.safetensors")
    wait_for_text(page, "#model_status", "Model: second-copy")
    assert page.input_value("#setting_sd_model_checkpoint input") == "second-copy.safetensors"
    choose_checkpoint(page, "broken.safetensors")
    wait_for_text(page, "#model_status", "Cannot load broken.safetensors")
    screenshot(page, "broken-checkpoint")
    page.wait_for_function(
        "document.querySelector('#setting_sd_model_checkpoint input').value == 'second-copy.safetensors'")
    page.fill("#txt2img_prompt textarea", "a large white diamond on a black background, center")
    generate(page)
    assert "Model: second-copy" in page.inner_text("#txt2img_infotext")
    assert len(gallery_images(page)) == 1


def test_settings_tab_saves_config_json(page, server):
    _, settings = server
    page.click("button[role=tab]:has-text('Settings')")
    steps = page.get_by_label("Default steps").first
    steps.fill("12")
    steps.press("Tab")
    page.click("#settings_submit")
    wait_for_text(page, "#settings_result", "applied")
    screenshot(page, "settings")
    import json

    stored = json.loads((Path(settings.data_dir) / "config.json").read_text())
    assert stored["default_steps"] == 12
    page.reload()
    page.wait_for_selector("#txt2img_steps input[type=number]")
    page.wait_for_function("document.querySelector('#txt2img_steps input[type=number]').value == '12'")


def test_a_server_started_with_gradio_auth_rejects_a_wrong_password(browser, tmp_path, tokenizer_cache):
    """Started the way users start it: `app.py --gradio-auth`, in its own process."""
    ckpt = tmp_path / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    shutil.copy(DEFAULT_MODEL, ckpt)
    shutil.copytree(tokenizer_cache, tmp_path / "cache", dirs_exist_ok=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--data-dir", str(tmp_path), "--port", str(port),
                               "--gradio-auth", "alice:s3cret", "--threads", "1"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        for _ in range(600):  # until the server answers (model load included)
            assert server.poll() is None, server.stderr.read()
            try:
                page.goto(url)
                break
            except playwright.Error:
                page.wait_for_timeout(100)
        page.fill("input[type=text]", "alice")
        page.fill("input[type=password]", "wrong")
        page.keyboard.press("Enter")
        wait_for_text(page, "body", "Incorrect")
        assert page.locator("#txt2img_prompt").count() == 0
        screenshot(page, "login-rejected")
        page.fill("input[type=text]", "alice")
        page.fill("input[type=password]", "s3cret")
        page.keyboard.press("Enter")
        page.wait_for_selector("#txt2img_prompt textarea")
        page.close()
    finally:
        server.terminate()
        server.wait(30)


def test_inpaint_with_a_drawn_mask_repaints_only_under_the_brush(page, tmp_path):
    source = Image.new("RGB", (64, 64), (40, 80, 220))
    source.save(tmp_path / "source.png")
    page.click("button[role=tab]:has-text('img2img')")
    page.click("#img2img_modes button[role=tab]:has-text('Inpaint')")
    page.locator("#img2img_inpaint").wait_for(state="visible")
    page.set_input_files("#img2img_inpaint input[type=file]", str(tmp_path / "source.png"))
    page.wait_for_selector("#img2img_inpaint canvas")
    page.get_by_label("Brush").first.click()
    # Find the image on screen (the canvas is zoomed to fit) and draw a short diagonal in its top left.
    box, previous = None, None
    for attempt in range(100):  # until the canvas shows the image and its zoom has settled
        if attempt and attempt % 20 == 0 and box is None:  # an upload into a not-yet-ready editor is dropped
            page.set_input_files("#img2img_inpaint input[type=file]", str(tmp_path / "source.png"))
        shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB")).astype(int)
        ys, xs = np.nonzero((np.abs(shot - np.array([40, 80, 220])) < 8).all(axis=-1))
        box = (xs.min(), ys.min(), xs.max() - xs.min()) if len(xs) > 1000 else None
        if box is not None and box == previous:
            break
        previous = box
        page.wait_for_timeout(100)
    if box is None:
        screenshot(page, "inpaint-drawn-failed")
    assert box is not None, "the uploaded image never showed on the inpaint canvas"
    left, top, side = box
    page.mouse.click(left + 0.1 * side, top + 0.1 * side)  # one dab of the brush near (6, 6)
    page.fill("#img2img_prompt textarea", "a large red circle on a blue background, top left")
    page.click("text=Inpaint settings")
    set_number(page, "#img2img_mask_blur input[type=number]", 0)
    set_number(page, "#img2img_denoising_strength input[type=number]", 1)
    set_number(page, "#img2img_seed input", 3)
    generate(page, "img2img")
    changed = (np.asarray(gallery_images(page, "img2img")[0].convert("RGB")).astype(int)
               != np.asarray(source).astype(int)).any(axis=-1)
    ys, xs = np.nonzero(changed)
    assert len(ys) > 50  # repainted under the dab
    assert np.hypot(ys - 6.4, xs - 6.4).max() < 40  # and nowhere far from it
    screenshot(page, "inpaint-drawn")


def test_wildcard_browser_inserts_a_wildcard_that_expands_on_generate(page):
    page.fill("#txt2img_prompt textarea", "a large")
    page.click("text=Wildcards")
    page.click("#txt2img_wildcards >> text=__color__")
    page.wait_for_function("document.querySelector('#txt2img_prompt textarea').value == 'a large __color__'")
    page.fill("#txt2img_prompt textarea", "a large __color__ circle on a white background, center")
    generate(page)
    shown = page.inner_text("#txt2img_infotext")
    assert 'Wildcard prompt: "a large __color__ circle on a white background, center"' in shown
    assert shown.splitlines()[0].split()[2] in (ROOT / "wildcards" / "color.txt").read_text().split()


def test_extra_networks_card_puts_the_lora_in_the_prompt_and_the_image_records_it(page):
    page.fill("#txt2img_prompt textarea", "a large blue square on a yellow background, center")
    page.click("text=Extra networks")
    page.locator("#txt2img_extra_cards >> text=easel-outlined").wait_for()
    screenshot(page, "txt2img-extra-network-cards")
    page.click("#txt2img_extra_cards >> text=easel-outlined")
    page.wait_for_function("document.querySelector('#txt2img_prompt textarea').value.endsWith(' <lora:easel-outlined:1>')")
    wait_for_text(page, "#txt2img_extra_details", "sd_v1")  # the card's kohya metadata
    wait_for_text(page, ".easel-tokens", "10/75")  # the tag does not count as tokens
    screenshot(page, "txt2img-extra-networks")
    generate(page)
    assert "Lora hashes: " in page.inner_text("#txt2img_infotext")
    # A second click takes the tag out; the search filters the cards.
    page.click("#txt2img_extra_cards >> text=easel-outlined")
    page.wait_for_function("!document.querySelector('#txt2img_prompt textarea').value.includes('<lora:')")
    page.fill("#txt2img_extra_search input, #txt2img_extra_search textarea", "nothing-called-this")
    page.wait_for_function("!document.querySelector('#txt2img_extra_cards').innerText.includes('easel-outlined')")


def test_extras_upscales_an_uploaded_image(page, tmp_path):
    source = tmp_path / "small.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(source)
    page.click("button[role=tab]:has-text('Extras')")
    page.set_input_files("#extras_image input[type=file]", str(source))
    page.locator("#extras_image img").first.wait_for()
    set_number(page, "#extras_scale input[type=number]", 2)
    page.click("#extras_generate")
    wait_for_text(page, "#extras_info", "Postprocess upscaler: Lanczos")
    assert "Postprocess upscale by: 2" in page.inner_text("#extras_info")
    images = gallery_images(page, "extras")
    assert [image.size for image in images] == [(80, 48)]
    screenshot(page, "extras")


def test_extras_restores_the_face_of_a_photo(page, tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    photo = Image.fromarray(skimage_data.astronaut())
    photo.save(tmp_path / "astronaut.png")
    page.click("button[role=tab]:has-text('Extras')")
    page.set_input_files("#extras_image input[type=file]", str(tmp_path / "astronaut.png"))
    page.locator("#extras_image img").first.wait_for()
    set_number(page, "#extras_scale input[type=number]", 1)
    set_number(page, "#extras_gfpgan input[type=number]", 1)
    page.click("#extras_generate")
    wait_for_text(page, "#extras_info", "GFPGAN: 1 face found by OpenCV Haar cascades")
    assert "GFPGAN visibility: 1" in page.inner_text("#extras_info")
    [image] = gallery_images(page, "extras")
    changed = np.abs(np.asarray(image.convert("RGB"), dtype=np.int16) - np.asarray(photo, dtype=np.int16)).sum(2) > 0
    assert image.size == photo.size and 0.05 < changed.mean() < 0.3 and not changed[330:].any()
    screenshot(page, "extras-faces")


def test_send_to_extras_carries_the_image_and_its_parameters(page):
    page.fill("#txt2img_prompt textarea", "a large green star on a black background, center")
    set_number(page, "#txt2img_seed input", 21)
    generate(page)
    page.click("#txt2img_send_to_extras")
    page.locator("#extras_image img").first.wait_for()
    set_number(page, "#extras_scale input[type=number]", 2)
    page.click("#extras_generate")
    wait_for_text(page, "#extras_info", "Postprocess upscale by: 2")
    [image] = gallery_images(page, "extras")
    assert image.size == (128, 128)
    assert "Seed: 21" in image.info.get("parameters", "")  # the generation's infotext travels along


def test_controlnet_unit_previews_its_map_and_puts_the_object_where_the_edges_are(page, server, tmp_path):
    """The shipped canny ControlNet of the default model, as a new user tries it: upload a picture, preview
    its edges, generate with a prompt that does not say where; the object lands where the edges are."""
    from training import metrics, shapes

    scene = shapes.Scene("star", "red", "blue", "large", "top left")
    shapes.render(scene).save(tmp_path / "star.png")
    unit = "#txt2img_controlnet_unit0"
    page.locator("#txt2img_controlnet").get_by_text("ControlNet", exact=True).first.click()
    page.set_input_files(f"{unit}_image input[type=file]", str(tmp_path / "star.png"))
    page.wait_for_selector(f"{unit}_image img")
    page.click(f"{unit}_module input")
    page.click("ul[role=listbox] li:has-text('canny')")
    wait_for_text(page, f"{unit}_threshold_a", "Low Threshold")  # the module's sliders are shown
    page.click(f"{unit}_refresh")
    page.click(f"{unit}_model input")
    page.click("ul[role=listbox] li:has-text('easel-shapes-canny')")
    page.click(f"{unit}_preview")
    page.wait_for_selector(f"{unit}_preview_image img")
    src = page.get_attribute(f"{unit}_preview_image img", "src")
    edges = np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("L"))
    assert edges.shape == (512, 512) and set(np.unique(edges)) == {0, 255}  # at the processor resolution
    assert edges[:171, :171].mean() > 5 and edges[200:, 200:].max() == 0  # the star's outline, top left only
    page.check(f"{unit}_enable input[type=checkbox]")
    page.fill("#txt2img_prompt textarea", "a large red star on a blue background")
    set_number(page, "#txt2img_seed input", 21)
    generate(page)
    shown = page.inner_text("#txt2img_infotext")
    assert "ControlNet 0:" in shown and "Module: canny" in shown and "Model: easel-shapes-canny [" in shown, shown
    [image] = gallery_images(page)
    reading = metrics.Scorer().fit(samples=600).read(image)
    assert (reading.cell, reading.color, reading.shape) == ((0, 0), "red", "star"), reading
    screenshot(page, "txt2img-controlnet")
