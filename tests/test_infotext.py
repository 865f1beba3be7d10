"""A1111 infotext: exact formatting, round trips, and parsing of real A1111/Forge infotexts."""

import pytest

from backend.infotext import format_infotext, parse_infotext, request_fields
from backend.request import GenerationRequest

FORMAT_CASES = [
    # (prompt, negative, parameters, expected text)
    ("a cat", "", {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7.0, "Seed": 1, "Size": "512x512"},
     "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512"),
    ("a cat", "blurry", {"Seed": 5, "Steps": 30, "Version": "easel-v1", "Sampler": "DPM++ 2M", "Lora hashes": "x"},
     "a cat\nNegative prompt: blurry\nSteps: 30, Sampler: DPM++ 2M, Seed: 5, Lora hashes: x, Version: easel-v1"),
    ("p", "", {"Steps": 20, "CFG scale": 7.5, "Denoising strength": 0.75, "Clip skip": None, "VAE": "",
               "Model": "v1-5"},
     "p\nSteps: 20, CFG scale: 7.5, Model: v1-5, Denoising strength: 0.75"),
    ("p", "", {"Steps": 1, "Seed": 2, "Lora hashes": "add_detail: 7c6bad76eb54, style: 0123456789ab"},
     'p\nSteps: 1, Seed: 2, Lora hashes: "add_detail: 7c6bad76eb54, style: 0123456789ab"'),
    ("multi\nline", "neg\nlines", {"Steps": 2, "Seed": 1, "Hires prompt": "a\nb"},
     'multi\nline\nNegative prompt: neg\nlines\nSteps: 2, Seed: 1, Hires prompt: "a\\nb"'),
    ("(a:1.2), b", "", {"Model": "anime, v2", "Seed": 3, "Steps": 9},
     '(a:1.2), b\nSteps: 9, Seed: 3, Model: "anime, v2"'),
]


@pytest.mark.parametrize("prompt, negative, parameters, expected", FORMAT_CASES)
def test_format_matches_a1111_layout(prompt, negative, parameters, expected):
    assert format_infotext(prompt, negative, parameters) == expected


@pytest.mark.parametrize("prompt, negative, parameters, expected", FORMAT_CASES)
def test_round_trip(prompt, negative, parameters, expected):
    parsed = parse_infotext(format_infotext(prompt, negative, parameters))
    assert parsed["Prompt"] == prompt and parsed["Negative prompt"] == negative
    for key, value in parameters.items():
        if value not in (None, ""):
            expected_value = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
            assert parsed[key] == expected_value, key


A1111_V16 = """masterpiece, best quality, 1girl, (smile:1.2), <lora:add_detail:0.5>
Negative prompt: (worst quality, low quality:1.4), EasyNegative
Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, Model hash: 6ce0161689, \
Model: v1-5-pruned-emaonly, Denoising strength: 0.5, Clip skip: 2, ENSD: 31337, Hires upscale: 2, Hires steps: 10, \
Hires upscaler: R-ESRGAN 4x+, Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.6.0"""

A1111_V110 = """a photo of a cat
Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 42, Size: 512x512, \
Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"""

MULTILINE = """line one,
line two
Negative prompt: bad,
ugly
Steps: 30, Sampler: DPM++ SDE, Schedule type: Karras, CFG scale: 5.5, Seed: 1, Size: 1024x1024, \
Model hash: 31e35c80fc, Model: sd_xl_base_1.0, VAE hash: 235745af8d, VAE: sdxl_vae.safetensors, \
Variation seed: 99, Variation seed strength: 0.3, Seed resize from: 768x768, \
ADetailer prompt: "a face, smiling", ADetailer model: face_yolov8n.pt, RNG: CPU, Version: f2.0.1v1.10.1-previous"""


def test_parse_a1111_v1_6_with_legacy_sampler_name():
    p = parse_infotext(A1111_V16)
    assert p["Prompt"] == "masterpiece, best quality, 1girl, (smile:1.2), <lora:add_detail:0.5>"
    assert p["Negative prompt"] == "(worst quality, low quality:1.4), EasyNegative"
    assert (p["Sampler"], p["Schedule type"]) == ("DPM++ 2M", "Karras")
    assert (p["Size-1"], p["Size-2"], p["Seed"], p["Clip skip"]) == ("512", "768", "1234567890", "2")
    assert p["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert p["Hires upscaler"] == "R-ESRGAN 4x+"
    assert p["Version"] == "v1.6.0"


def test_parse_a1111_v1_10_fills_defaults():
    p = parse_infotext(A1111_V110)
    assert p["Prompt"] == "a photo of a cat" and p["Negative prompt"] == ""
    assert (p["Sampler"], p["Schedule type"], p["Clip skip"], p["RNG"]) == ("Euler a", "Automatic", "1", "GPU")


def test_parse_multiline_forge_infotext():
    p = parse_infotext(MULTILINE)
    assert p["Prompt"] == "line one,\nline two"
    assert p["Negative prompt"] == "bad,\nugly"
    assert p["ADetailer prompt"] == "a face, smiling"
    assert (p["Variation seed"], p["Variation seed strength"], p["Seed resize from"]) == ("99", "0.3", "768x768")
    assert p["RNG"] == "CPU"


def test_a_line_with_fewer_than_three_pairs_is_prompt_text_as_in_a1111():
    p = parse_infotext("a cat\nSteps: 1, Seed: 2")
    assert p["Prompt"] == "a cat\nSteps: 1, Seed: 2" and "Steps" not in p


def test_prompt_without_parameters_is_all_prompt():
    p = parse_infotext("just a prompt, with: a colon")
    assert p["Prompt"] == "just a prompt, with: a colon" and p["Negative prompt"] == ""
    assert "Steps" not in p


def test_request_fields_fill_a_generation_request():
    fields = request_fields(parse_infotext(MULTILINE))
    request = GenerationRequest(**fields)
    assert (request.prompt, request.negative_prompt) == ("line one,\nline two", "bad,\nugly")
    assert (request.steps, request.sampler, request.schedule_type, request.cfg_scale) == (30, "DPM++ SDE", "Karras", 5.5)
    assert (request.seed, request.width, request.height) == (1, 1024, 1024)
    assert (request.subseed, request.subseed_strength) == (99, 0.3)
    assert (request.seed_resize_from_w, request.seed_resize_from_h) == (768, 768)
    assert request.checkpoint == "sd_xl_base_1.0" and request.vae == "sdxl_vae.safetensors"
    legacy = GenerationRequest(**request_fields(parse_infotext(A1111_V16)))
    assert (legacy.sampler, legacy.schedule_type, legacy.clip_skip, legacy.denoising_strength) == (
        "DPM++ 2M", "Karras", 2, 0.5)
