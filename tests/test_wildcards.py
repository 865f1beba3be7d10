"""Wildcards and variants: seeded, per image, nested, in both prompts, around A1111's own syntax."""

import json
from pathlib import Path

import numpy as np
import pytest

from backend import infotext
from backend.generation import generate
from backend.model_manager import ModelManager
from backend.request import GenerationRequest
from backend.settings import Settings
from backend.wildcards import WildcardError, Wildcards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "wildcards"
    (root / "scenes").mkdir(parents=True)
    (root / "color.txt").write_text("# colours the default model knows\nred\nblue\ngreen\nyellow\n\npurple\n")
    (root / "scenes" / "thing.txt").write_text("__color__ star\n{small|large} __color__ circle\n")
    (root / "loop_a.txt").write_text("x __loop_b__\n")
    (root / "loop_b.txt").write_text("y __loop_a__\n")
    return root


def test_expansion_is_seeded_and_varies_with_the_seed(folder):
    wildcards = Wildcards(folder)
    first = wildcards.expand("a __color__ star", 7).text
    assert first == wildcards.expand("a __color__ star", 7).text
    assert first.split()[1] in {"red", "blue", "green", "yellow", "purple"}
    assert len({wildcards.expand("a __color__ star", seed).text for seed in range(30)}) >= 4


def test_nesting_variants_and_subfolders(folder):
    wildcards = Wildcards(folder)
    texts = {wildcards.expand("__scenes/thing__", seed).text for seed in range(40)}
    assert all("__" not in t and "{" not in t for t in texts)
    assert any(t.endswith(" star") for t in texts) and any(t.startswith(("small ", "large ")) for t in texts)
    picks = wildcards.expand("{2$$red|blue|green}", 3).text.split(",")
    assert len(picks) == 2 and len(set(picks)) == 2


def test_a1111_syntax_passes_through_untouched(folder):
    text = "a [__color__:blue:0.5] (star:1.2) [a|b] <lora:easel-outlined:0.8> AND c"
    expanded = Wildcards(folder).expand(text, 1).text
    assert expanded.startswith("a [") and expanded.endswith(":blue:0.5] (star:1.2) [a|b] <lora:easel-outlined:0.8> AND c")


def test_missing_wildcards_stay_and_are_reported_and_cycles_are_refused(folder):
    result = Wildcards(folder).expand("a __nope__ star", 1)
    assert result.text == "a __nope__ star" and "__nope__" in result.warnings[0]
    with pytest.raises(WildcardError, match=r"__loop_a__ -> __loop_b__ -> __loop_a__"):
        Wildcards(folder).expand("__loop_a__", 1)


def test_wildcard_browser_lists_files_and_sizes(folder):
    files = {f.name: f.lines for f in Wildcards(folder).files()}
    assert files == {"color": 5, "loop_a": 1, "loop_b": 1, "scenes/thing": 2}


@pytest.fixture
def manager(tmp_path, folder):
    settings = Settings(data_dir=tmp_path, ckpt_dir=ROOT / "models" / "Stable-diffusion", wildcards_dir=folder)
    return ModelManager(settings)


def test_each_image_of_a_batch_expands_with_its_own_seed_and_reproduces_alone(manager):
    request = GenerationRequest(prompt="a large __color__ circle on a white background, center",
                                negative_prompt="__color__", steps=6, seed=100, batch_size=4, save_images=False)
    batch = generate(manager, request)
    prompts = [image.prompt for image in batch.images]
    assert len(set(prompts)) >= 2 and all("__" not in p for p in prompts)
    assert all("__" not in image.negative_prompt for image in batch.images)
    third = batch.images[2]
    assert 'Wildcard prompt: "a large __color__ circle on a white background, center"' in third.infotext
    assert 'Wildcard negative prompt: __color__,' in third.infotext  # quoted only when needed, as A1111
    # The PNG's own parameters reproduce it: the expanded prompt, no wildcards left.
    fields = infotext.request_fields(infotext.parse_infotext(third.infotext))
    alone = generate(manager, GenerationRequest(**fields, save_images=False))
    assert alone.images[0].prompt == third.prompt
    difference = np.abs(np.asarray(alone.images[0].image, dtype=int) - np.asarray(third.image, dtype=int))
    # The same image: a UNet batch of another size only rounds differently (measured: max 1 level).
    assert difference.mean() < 0.05 and difference.max() <= 2
    same = generate(manager, request.with_changes(same_wildcards=True))
    assert len({image.prompt for image in same.images}) == 1


def test_a_missing_wildcard_warns_in_the_result_and_generation_goes_on(manager):
    result = generate(manager, GenerationRequest(prompt="a large __absent__ star", steps=2, seed=1, save_images=False))
    assert len(result.images) == 1 and result.images[0].prompt == "a large __absent__ star"
    assert any("__absent__" in warning for warning in result.warnings)


def test_styles_apply_at_generation_before_wildcards_and_are_recorded(manager, tmp_path):
    manager.settings.styles_file.write_text('name,prompt,negative_prompt\nCentered,"{prompt}, center",__color__\n')
    result = generate(manager, GenerationRequest(prompt="a large red circle on a white background", steps=2, seed=4,
                                                 styles=("Centered", "Nope"), save_images=False))
    image = result.images[0]
    assert image.prompt == "a large red circle on a white background, center"
    assert "__" not in image.negative_prompt and image.negative_prompt
    parsed = infotext.parse_infotext(image.infotext)
    assert json.loads(parsed["Styles array"]) == ["Centered", "Nope"]
    assert any("Nope" in warning for warning in result.warnings)
