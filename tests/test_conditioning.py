"""Prompts to embeddings as A1111 builds them: chunks, BREAK, the comma back-off, weights and emphasis
modes, schedules; and end to end on the default model."""

from pathlib import Path

import numpy as np
import pytest
import torch

from backend import conditioning
from backend.clip_tokenizer import load_clip_tokenizer
from backend.generation import generate
from backend.model_manager import ModelManager
from backend.request import GenerationRequest
from backend.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
BOS, EOS, COMMA = 49406, 49407, 267


@pytest.fixture(scope="module")
def tokenizer(tokenizer_cache):
    return load_clip_tokenizer(str(tokenizer_cache))


def test_chunks_wrap_to_77_with_weights_per_token(tokenizer):
    chunks, count = conditioning.chunk_prompt(tokenizer, "a (red:1.5) star")
    assert count == 3 and len(chunks) == 1
    chunk = chunks[0]
    assert chunk.tokens[:5] == [BOS, 320, 736, 1565, EOS] and len(chunk.tokens) == 77
    assert chunk.tokens[4:] == [EOS] * 73
    assert chunk.weights[:5] == [1.0, 1.0, 1.5, 1.0, 1.0] and len(chunk.weights) == 77


def test_break_starts_a_new_chunk_and_counts_a_full_one(tokenizer):
    chunks, count = conditioning.chunk_prompt(tokenizer, "a red star BREAK blue")
    assert len(chunks) == 2 and count == 76  # A1111's counter: 75 for the closed chunk
    assert chunks[0].tokens[:5] == [BOS, 320, 736, 1565, EOS]
    assert chunks[1].tokens[:3] == [BOS, 1746, EOS]


def test_a_full_chunk_moves_the_words_after_a_near_comma_to_the_next(tokenizer):
    text = "red " * 70 + ", " + "blue " * 10  # the comma is token 71: within 20 of the end
    chunks, _ = conditioning.chunk_prompt(tokenizer, text)
    assert len(chunks) == 2
    first = chunks[0].tokens
    assert first[70:73] == [736, COMMA, EOS]  # cut after the comma, padded
    assert chunks[1].tokens[1:11] == [1746] * 10
    far = "red , " + "blue " * 80  # the comma is too far back: a plain split at 75
    chunks, _ = conditioning.chunk_prompt(tokenizer, far)
    assert chunks[0].tokens[1:3] == [736, COMMA] and chunks[0].tokens[76] == EOS
    assert chunks[0].tokens[3:76] == [1746] * 73


def test_emphasis_none_keeps_brackets_as_text_and_ignore_drops_weights(tokenizer):
    none_chunks, _ = conditioning.chunk_prompt(tokenizer, "(red:1.5)", emphasis="None")
    ignore_chunks, _ = conditioning.chunk_prompt(tokenizer, "(red:1.5)", emphasis="Ignore")
    assert len([t for t in none_chunks[0].tokens if t not in (BOS, EOS)]) > 1  # "(", "red", ":", ...
    assert ignore_chunks[0].tokens[:3] == [BOS, 736, EOS] and set(ignore_chunks[0].weights) == {1.0}


def test_token_counter_counts_the_longest_scheduled_text(tokenizer):
    assert conditioning.count_tokens(tokenizer, "a [red star:blue:5]") == 3
    assert conditioning.count_tokens(tokenizer, "(red:1.4) star") == 2


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    data = tmp_path_factory.mktemp("prompts")
    return ModelManager(Settings(data_dir=data, ckpt_dir=ROOT / "models" / "Stable-diffusion"))


def test_weights_scale_the_token_embeddings_and_original_restores_the_mean(manager):
    model = manager.activate("easel-shapes")
    plain = conditioning.encode_prompt(model, "a red star").context
    no_norm = conditioning.encode_prompt(model, "a (red:1.5) star", emphasis="No norm").context
    original = conditioning.encode_prompt(model, "a (red:1.5) star").context
    assert torch.allclose(no_norm[2], plain[2] * 1.5, atol=1e-5)
    assert torch.allclose(no_norm[1], plain[1], atol=1e-6)
    assert torch.allclose(original.mean(), plain.mean(), atol=1e-5)
    assert torch.equal(conditioning.encode_prompt(model, "a (red:1) star").context, plain)


def test_schedules_encode_each_text_once_and_pick_by_step(manager):
    model = manager.activate("easel-shapes")
    cond = conditioning.encode_for_generation(model, "a [red:blue:3] star AND a circle:0.5", "[ugly|bad]", 6)
    assert cond.texts == 5  # "a red star ", "a blue star ", " a circle", "ugly", "bad"
    (w1, first), (w2, second) = cond.positive
    assert (w1, w2) == (1.0, 0.5) and [end for end, _ in first] == [3, 6] and len(second) == 1
    assert conditioning.Conditioning.at(first, 3) is first[0][1]  # steps 0..3 use the text before
    assert conditioning.Conditioning.at(first, 4) is first[1][1]
    assert [end for end, _ in cond.negative] == [1, 2, 3, 4, 5, 6]
    assert cond.negative[0][1] is not cond.negative[1][1] and cond.negative[0][1] is cond.negative[2][1]


def _image(manager, prompt, seed=1, **fields):
    result = generate(manager, GenerationRequest(prompt=prompt, checkpoint="easel-shapes", steps=20, cfg_scale=6,
                                                 seed=seed, save_images=False, **fields))
    return np.asarray(result.images[0].image, dtype=np.float64)


def redness(pixels):
    return (pixels[..., 0] - (pixels[..., 1] + pixels[..., 2]) / 2).mean()


def test_attention_weight_changes_the_red_in_the_image(manager):
    for seed in (1, 3):
        strong = _image(manager, "a large (red:1.5) circle on a white background, center", seed)
        weak = _image(manager, "a large (red:0.5) circle on a white background, center", seed)
        assert np.abs(strong[..., 0] - weak[..., 0]).mean() > 1, seed  # the red channel moves
    plain = _image(manager, "a large red circle on a white background, center")
    assert np.array_equal(_image(manager, "a large (red:1.0) circle on a white background, center"), plain)


def test_prompt_editing_gives_an_image_unlike_either_prompt(manager):
    # Euler on a uniform schedule: with Karras on this zero-terminal-SNR model the first half of the
    # steps is spent at sigma > 100, where the text barely matters yet.
    fields = {"sampler": "Euler", "schedule_type": "Uniform"}
    edited = _image(manager, "a large [red:blue:0.5] circle on a white background, center", **fields)
    red = _image(manager, "a large red circle on a white background, center", **fields)
    blue = _image(manager, "a large blue circle on a white background, center", **fields)
    assert np.abs(edited - red).mean() > 2 and np.abs(edited - blue).mean() > 2


def test_a_200_token_prompt_generates(manager):
    prompt = ", ".join(["a large red circle on a white background, center"] * 18)
    model = manager.activate("easel-shapes")
    assert conditioning.chunk_count(model, prompt) == 3
    image = _image(manager, prompt)
    assert image.shape == (64, 64, 3) and image.std() > 10


def test_each_schedule_keeps_its_length_and_the_empty_prompt_pads(sd1_manager):
    model = sd1_manager.activate()
    cond = conditioning.encode_for_generation(model, "a [red:blue BREAK sky:2] star AND a circle", "ugly", 6)
    (_, edited), (_, circle) = cond.positive
    short, long, negative = edited[0][1], edited[1][1], cond.negative[0][1]
    # One schedule's texts share a length: the short one gets an empty chunk (A1111's empty_chunk).
    assert (short.chunks, long.chunks, circle[0][1].chunks, negative.chunks) == (2, 2, 1, 1)
    assert cond.empty.chunks == 1 and torch.equal(short.context[77:], cond.empty.context)
    assert cond.lengths_differ(0) and cond.lengths_differ(5)  # 2 chunks against 1 at every step
    # Subprompts stack padded with their last vector; pad_cond_uncond appends the empty prompt.
    stacked = conditioning.stack_contexts([short, circle[0][1]])
    assert stacked.shape[:2] == (2, 154) and torch.equal(stacked[0], short.context)
    assert torch.equal(stacked[1, 77:], circle[0][1].context[-1:].expand(77, -1))
    padded_cond, padded_uncond = conditioning.pad_cond_uncond(stacked, negative.context[None], cond.empty)
    assert padded_cond is stacked and padded_uncond.shape[:2] == (1, 154)
    assert torch.equal(padded_uncond[0], torch.cat([negative.context, cond.empty.context]))
    plain = conditioning.encode_for_generation(model, "a star", "ugly", 6)
    assert plain.empty is None and not plain.lengths_differ(0)


@pytest.mark.parametrize("prompt, old, ends", [("a [red:blue:0.5] star", False, [10]),
                                                 ("a [red:blue:8] star", False, [10]),
                                                 ("a [red:blue:1.5] star", False, [5, 10]),
                                                 ("a [red:blue:0.5] star", True, [4, 8])])
def test_the_hires_pass_continues_the_first_passs_timeline_unless_old_timelines(sd1_manager, prompt, old, ends):
    """A1111 >= 1.7: in the hires pass a fraction runs 1..2 and a whole `when` counts on from the first pass's
    8 steps, so `[red:blue:0.5]` and `[red:blue:8]` are over before it starts. With old timelines A1111 reuses
    the first pass's timeline."""
    model = sd1_manager.activate()
    cond = conditioning.encode_for_generation(model, prompt, "", 8, hires_steps=10, use_old_scheduling=old)
    schedule = cond.positive[0][1]
    assert [end for end, _ in schedule] == ends
    blue = conditioning.encode_for_generation(model, "a blue star", "", 8).positive[0][1][0][1]
    assert torch.equal(schedule[-1][1].context, blue.context)
