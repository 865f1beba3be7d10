"""A1111 infotext: exact formatting, round trips, parsing of real A1111/Forge infotexts, and texts
built to make a parser slow or to overflow the numbers it hands on."""

import random
import re

import pytest

from backend.infotext import (
    MAX_INFOTEXT_CHARS,
    InfotextError,
    format_infotext,
    parameter_pairs,
    parse_infotext,
    request_fields,
)
from backend.request import MAX_PROMPT_CHARS, GenerationRequest

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


# -- the parameter line: A1111's grammar, read in linear time ------------------------------------------
PARSE_CASES = [
    # (parameter line after "a prompt\n", expected values)
    ('Steps: 20, Sampler: Euler a, ADetailer prompt: "a face, smiling: 1.2", Seed: 3',
     {"ADetailer prompt": "a face, smiling: 1.2", "Seed": "3"}),
    ('Steps: 20, Seed: 1, Lora hashes: "a: 1, b: 2", Version: v1.6.0',
     {"Lora hashes": "a: 1, b: 2", "Version": "v1.6.0"}),
    ("Steps: 20, Seed: 1, Hires upscale: 2, Hires resize: 1024x1024, Hires steps: 10",
     {"Hires resize": "1024x1024", "Hires resize-1": "1024", "Hires resize-2": "1024", "Hires steps": "10"}),
    ("Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 9",
     {"Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7"}),
    ('Steps: 1, Seed: 2, Hires prompt: "say \\"hi\\", ok\\nbye", Size: 64x64',
     {"Hires prompt": 'say "hi", ok\nbye', "Size-1": "64"}),
    ('Steps: 1, Empty: "", Seed: 2', {"Empty": "", "Seed": "2"}),
    # a quoted value followed by more text is read up to the comma, as A1111's regex reads it
    ('Steps: 1, Note: "a, b" c, Seed: 2', {"Note": '"a', "Seed": "2"}),
    ("Steps: 1,Seed: 2 ,  Model/Name-x:  v1 , (junk) Size: 8x8",
     {"Seed": "2", "Model/Name-x": "v1", "Size": "8x8"}),
]


@pytest.mark.parametrize("line, expected", PARSE_CASES)
def test_parameter_line_values(line, expected):
    parsed = parse_infotext(f"a prompt\n{line}")
    assert parsed["Prompt"] == "a prompt"
    assert {key: parsed.get(key) for key in expected} == expected


# A1111's own regex for the parameter line: the reference the linear scanner must agree with.
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def test_scanner_reads_short_lines_exactly_as_a1111s_regex():
    rng = random.Random(0)
    alphabet = ["a", "b", "1", "_", "é", " ", "\t", ",", ":", '"', "\\", "-", "/", ".", "("]
    for _ in range(20_000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        assert parameter_pairs(line) == [(k.strip(), v) for k, v in A1111_PARAM.findall(line)], line


# 60-100 KB texts of the shapes that slow parsers down. On a long run of key characters without a
# colon, or an unclosed quote, A1111's regex needs 20 s or more (it retries at every character and each
# try runs to the end of the run), so a quadratic parser makes this test hang visibly.
SLOW_FOR_A_REGEX = [
    # (text, expected values)
    ("a" * 60_000, {"Prompt": "a" * 60_000, "Steps": None}),
    ("a a" * 34_000, {"Prompt": "a a" * 34_000, "Steps": None}),  # 100 KB froze a server for 56 s
    ("a:" * 30_000, {"Prompt": "a:" * 30_000, "Steps": None}),
    (", a" * 20_000, {"Prompt": ", a" * 20_000, "Steps": None}),
    ("x\nSteps: 1, Seed: 2, Note: " + "b c" * 20_000, {"Prompt": "x", "Note": "b c" * 20_000}),
    ('x\nSteps: 1, Seed: 2, Note: "' + "\\b" * 30_000, {"Prompt": "x", "Note": '"' + "\\b" * 30_000}),
    ("word " * 12_000 + "\nSteps: 1, Seed: 2, Size: 64x64", {"Prompt": "word " * 12_000, "Size-2": "64"}),
]


@pytest.mark.parametrize("text, expected", SLOW_FOR_A_REGEX, ids=lambda v: v[:12] if isinstance(v, str) else "")
def test_long_adversarial_text_is_parsed_in_one_pass(text, expected):
    parsed = parse_infotext(text)
    assert {key: parsed.get(key) for key in expected} == expected


@pytest.mark.parametrize("text", ["a" * 300_000, "a:" * 150_000, ", a" * 100_000,
                                  "p\nSteps: 1, Seed: 2, Note: " + "b" * MAX_INFOTEXT_CHARS])
def test_text_over_the_limit_is_refused_naming_the_limit(text):
    assert MAX_INFOTEXT_CHARS == 262_144
    with pytest.raises(InfotextError, match=f"{len(text):,} characters long; Easel reads at most 262,144"):
        parse_infotext(text)


def test_infotext_of_the_longest_prompts_a_request_accepts_is_read_back():
    longest = "a, (b:1.1) " * (MAX_PROMPT_CHARS // 11)
    parameters = {"Steps": 20, "Sampler": "Euler a", "Seed": 1, "Size": "512x512", "Hires prompt": longest + "1",
                  "Hires negative prompt": longest + "2", "Lora hashes": "x: 0123456789ab", "Version": "easel"}
    parsed = parse_infotext(format_infotext(longest, longest + "0", parameters))
    assert (parsed["Prompt"], parsed["Negative prompt"]) == (longest, longest + "0")
    assert (parsed["Hires prompt"], parsed["Hires negative prompt"]) == (longest + "1", longest + "2")
    assert (parsed["Size-1"], parsed["Lora hashes"]) == ("512", "x: 0123456789ab")


def test_text_at_the_limit_is_read():
    text = "p\nSteps: 1, Seed: 2, Note: " + "b" * (MAX_INFOTEXT_CHARS - 27)
    assert len(text) == MAX_INFOTEXT_CHARS
    assert parse_infotext(text)["Note"] == "b" * (MAX_INFOTEXT_CHARS - 27)


# -- numbers handed to GenerationRequest ---------------------------------------------------------------
GOOD = {"Steps": "20", "CFG scale": "7", "Seed": "5", "Variation seed": "6", "Hires steps": "10",
        "Size-1": "512", "Size-2": "768"}
GOOD_FIELDS = {"steps": 20, "cfg_scale": 7.0, "seed": 5, "subseed": 6, "hr_second_pass_steps": 10,
               "width": 512, "height": 768}
UNUSABLE_NUMBERS = [
    # (key, value, field left out)
    ("Steps", "inf", "steps"),
    ("Steps", "1e400", "steps"),
    ("Steps", "-inf", "steps"),
    ("Seed", "nan", "seed"),
    ("Seed", str(2**70), "seed"),
    ("Seed", str(-(2**70)), "seed"),
    ("Seed", "1e30", "seed"),
    ("Seed", "9" * 5000, "seed"),  # beyond Python's int-from-text digit limit
    ("CFG scale", "inf", "cfg_scale"),
    ("CFG scale", "nan", "cfg_scale"),
    ("CFG scale", "1e400", "cfg_scale"),
    ("Variation seed", str(2**64), "subseed"),
    ("Hires steps", "1e400", "hr_second_pass_steps"),
    ("Size-1", "inf", "width"),
]


@pytest.mark.parametrize("key, value, field_name", UNUSABLE_NUMBERS)
def test_non_finite_and_oversized_numbers_are_skipped(key, value, field_name):
    fields = request_fields({**GOOD, key: value})
    assert field_name not in fields
    assert {k: fields[k] for k in GOOD_FIELDS if k != field_name} == {
        k: v for k, v in GOOD_FIELDS.items() if k != field_name}


@pytest.mark.parametrize("value, seed", [(str(2**64 - 1), 2**64 - 1), ("12345678901234567", 12345678901234567),
                                         ("-1", -1), ("42.0", 42), (" 7 ", 7)])
def test_whole_numbers_are_read_exactly_up_to_64_bits(value, seed):
    assert request_fields({"Seed": value})["seed"] == seed


@pytest.mark.parametrize("size", [f"{2**70}x64", "64x" + "9" * 5000])
def test_oversized_seed_resize_is_skipped(size):
    fields = request_fields(parse_infotext(f"p\nSteps: 3, Seed: 1, Seed resize from: {size}"))
    assert "seed_resize_from_w" not in fields and "seed_resize_from_h" not in fields
    assert (fields["steps"], fields["seed"]) == (3, 1)


@pytest.mark.parametrize("text, device, source", [
    ("x\nSteps: 2, Sampler: Euler, Seed: 1", "cpu", "NV"),  # A1111's default (GPU) made on an NVIDIA GPU
    ("x\nSteps: 2, Sampler: Euler, Seed: 1", "cuda:0", "GPU"),
    ("x\nSteps: 2, Sampler: Euler, Seed: 1, RNG: CPU", "cuda", "CPU"),
    ("x\nSteps: 2, Sampler: Euler, Seed: 1, RNG: NV", "cuda", "NV"),
    ("x\nSteps: 2, Sampler: Euler, Seed: 1, RNG: GPU", "mps", "NV"),
])
def test_the_rng_key_picks_the_noise_source_that_reproduces_the_image_here(text, device, source):
    assert request_fields(parse_infotext(text), device)["randn_source"] == source
