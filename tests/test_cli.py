"""`python app.py generate`: headless generation that prints the image paths, with the UI's defaults."""

import subprocess
import sys
from pathlib import Path

from PIL import Image

import app
from backend.infotext import parse_infotext
from backend.request import GenerationRequest
from tests.conftest import install

ROOT = Path(__file__).resolve().parents[1]


def test_generate_prints_one_path_per_image(settings, model_files, capsys):
    install(settings, model_files["sd1"])
    code = app.main(["--data-dir", str(settings.data_dir), "generate", "--prompt", "a red star", "--width", "64",
                     "--height", "64", "--steps", "3", "--seed", "11", "--batch-size", "2"])
    out = capsys.readouterr().out.split()
    assert code == 0 and [Path(p).name for p in out] == ["00000-11.png", "00001-12.png"]
    parsed = parse_infotext(Image.open(out[0]).info["parameters"])
    defaults = GenerationRequest()
    assert parsed["Sampler"] == defaults.sampler and parsed["CFG scale"] == "7" and parsed["Steps"] == "3"


def test_img2img_from_the_command_line(settings, model_files, capsys, tmp_path):
    install(settings, model_files["sd1"])
    init = tmp_path / "in.png"
    Image.new("RGB", (80, 64), (200, 10, 10)).save(init)
    code = app.main(["--data-dir", str(settings.data_dir), "--outdir", str(tmp_path / "out"), "generate",
                     "--prompt", "x", "--init-image", str(init), "--denoising-strength", "0.3", "--width", "64",
                     "--height", "64", "--steps", "4", "--seed", "1"])
    path = Path(capsys.readouterr().out.strip())
    assert code == 0 and path.parent.parent == tmp_path / "out" / "img2img-images"
    assert parse_infotext(Image.open(path).info["parameters"])["Denoising strength"] == "0.3"


def test_errors_are_one_clear_line(settings, model_files, capsys):
    install(settings, model_files["sd1"])
    code = app.main(["--data-dir", str(settings.data_dir), "generate", "--prompt", "x", "--checkpoint", "nope"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err.startswith("error: checkpoint 'nope' not found") and "tiny-sd1.safetensors" in err


def test_ckpt_dir_points_at_another_install(settings, model_files, tmp_path, capsys):
    other = tmp_path / "a1111" / "models" / "Stable-diffusion"
    other.mkdir(parents=True)
    (other / "elsewhere.safetensors").write_bytes(model_files["sd1"].read_bytes())
    code = app.main(["--data-dir", str(settings.data_dir), "--ckpt-dir", str(other), "generate", "--prompt", "x",
                     "--width", "64", "--height", "64", "--steps", "2", "--seed", "3"])
    path = Path(capsys.readouterr().out.strip())
    assert code == 0 and parse_infotext(Image.open(path).info["parameters"])["Model"] == "elsewhere"


def test_help_lists_every_flag():
    result = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    for flag in ("--data-dir", "--ckpt-dir", "--vae-dir", "--lora-dir", "--embeddings-dir", "--device",
                 "--no-half", "--precision", "--medvram", "--lowvram", "--threads", "generate", "--listen", "--port",
                 "--share", "--gradio-auth", "--gradio-auth-path", "--insecure"):
        assert flag in result.stdout
    gen = subprocess.run([sys.executable, "app.py", "generate", "--help"], cwd=ROOT, capture_output=True, text=True)
    for flag in ("--prompt", "--negative-prompt", "--checkpoint", "--steps", "--sampler", "--schedule-type",
                 "--cfg-scale", "--seed", "--width", "--height", "--batch-size", "--init-image",
                 "--denoising-strength", "--mask"):
        assert flag in gen.stdout


def test_the_command_line_starts_from_the_saved_options(settings, model_files, capsys):
    """config.json (the Settings tab's options) applies to `generate` as to the UI: defaults, file names,
    and extensions turned off there."""
    install(settings, model_files["sd1"])
    (settings.data_dir / "config.json").write_text(
        '{"default_sampler": "Euler", "default_steps": 3, "default_cfg_scale": 4.5, '
        '"filename_pattern": "[seed]-[steps]-cli", "save_txt": true, "disabled_extensions": ["cfg-rescale"]}')
    code = app.main(["--data-dir", str(settings.data_dir), "generate", "--prompt", "a red star", "--width", "64",
                     "--height", "64", "--seed", "5", "--cfg-scale", "6"])
    captured = capsys.readouterr()
    path = Path(captured.out.strip())
    assert code == 0 and path.name == "00000-5-3-cli.png" and path.with_suffix(".txt").is_file()
    parsed = parse_infotext(Image.open(path).info["parameters"])
    assert parsed["Sampler"] == "Euler" and parsed["Steps"] == "3" and parsed["CFG scale"] == "6"
    # a panel of a disabled extension is not there to take arguments
    code = app.main(["--data-dir", str(settings.data_dir), "generate", "--prompt", "x", "--width", "64",
                     "--height", "64", "--steps", "2", "--seed", "5"])
    assert code == 0


def test_sampler_parameters_from_the_command_line_and_the_options(settings, model_files, capsys):
    install(settings, model_files["sd1"])
    (settings.data_dir / "config.json").write_text('{"s_churn": 0.5, "uni_pc_order": 2}')
    code = app.main(["--data-dir", str(settings.data_dir), "generate", "--prompt", "a red star", "--width", "64",
                     "--height", "64", "--steps", "3", "--seed", "5", "--sampler", "Euler a", "--eta", "0.5",
                     "--ensd", "31337"])
    path = Path(capsys.readouterr().out.strip())
    parsed = parse_infotext(Image.open(path).info["parameters"])
    assert code == 0 and parsed["Eta"] == "0.5" and parsed["ENSD"] == "31337"
    code = app.main(["--data-dir", str(settings.data_dir), "generate", "--prompt", "a red star", "--width", "64",
                     "--height", "64", "--steps", "3", "--seed", "5", "--sampler", "Euler"])
    parsed = parse_infotext(Image.open(Path(capsys.readouterr().out.strip())).info["parameters"])
    assert code == 0 and parsed["Sigma churn"] == "0.5" and "UniPC order" not in parsed


def test_controlnet_units_and_detect_from_the_command_line(settings, model_files, capsys, tmp_path):
    import numpy as np
    from PIL import ImageDraw

    from backend import random_controlnets

    install(settings, model_files["sd1"])
    folder = settings.model_dir("controlnet")
    folder.mkdir(parents=True)
    random_controlnets.save_lllyasviel(random_controlnets.build("sd1", seed=1), folder / "tiny_canny.safetensors")
    edges = tmp_path / "edges.png"
    drawing = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(drawing).rectangle((10, 10, 40, 40), outline="black", width=3)
    drawing.save(edges)
    code = app.main(["--data-dir", str(settings.data_dir), "detect", "--module", "canny", "--image", str(edges)])
    detected = Path(capsys.readouterr().out.strip())
    assert code == 0 and detected.name == "edges-canny.png"
    assert set(np.unique(np.asarray(Image.open(detected)))) == {0, 255}  # edges, white on black
    common = ["--data-dir", str(settings.data_dir), "generate", "--prompt", "a star", "--width", "64", "--height",
              "64", "--steps", "2", "--seed", "4"]
    code = app.main([*common, "--controlnet", f"model=tiny_canny,module=canny,image={edges},weight=0.8,end=0.5"])
    parsed = parse_infotext(Image.open(Path(capsys.readouterr().out.strip())).info["parameters"])
    assert code == 0 and "Weight: 0.8" in parsed["ControlNet 0"] and "Guidance End: 0.5" in parsed["ControlNet 0"]
    code = app.main([*common, "--controlnet", f"module=canny,image={edges}"])
    assert code == 1 and "name the model (model=NAME)" in capsys.readouterr().err
