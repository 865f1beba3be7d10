"""Prompt and negative prompt of different token lengths (issue 15), as A1111 runs them: by default the
UNet sees each at its own length; with "Pad prompt/negative prompt" (`pad_cond_uncond`) the shorter is
padded with the empty prompt's embedding and both run as one batch. Equal lengths: one batch, as before."""

import numpy as np
import pytest
import torch

from backend import conditioning, denoiser
from backend.generation import generate
from backend.options import Options
from backend.request import GenerationRequest, RequestError
from backend.runtime import Runtime

THREE_CHUNKS = "a red star BREAK a blue circle BREAK a green square"
ONE_CHUNK = "ugly"
# "ugly" and two empty chunks: what pad_cond_uncond makes of ONE_CHUNK next to THREE_CHUNKS
ONE_CHUNK_AND_TWO_EMPTY = "ugly BREAK BREAK BREAK"
STEPS = 4  # DPM++ 2M: one guidance step per sampling step
# Pixels [20, 20:26] of the padded image, recorded before issue 15 (when padding was the only behaviour).
PADDED_PIN = [[174, 184, 147], [162, 127, 100], [144, 149, 118], [88, 169, 187], [152, 73, 158], [173, 106, 161]]


def run(manager, prompt=THREE_CHUNKS, negative=ONE_CHUNK, **fields) -> np.ndarray:
    request = GenerationRequest(prompt=prompt, negative_prompt=negative, width=64, height=64, steps=STEPS, seed=3,
                                save_images=False, **fields)
    return np.asarray(generate(manager, request).images[0].image, dtype=np.int16)


@pytest.fixture
def unet_calls(sd1_manager, monkeypatch):
    """(batch, tokens) of the text each UNet call receives, recorded around the real UNet's forward."""
    unet = sd1_manager.activate().unet
    calls: list[tuple[int, int]] = []
    forward = unet.forward

    def recording(sample, timestep, encoder_hidden_states=None, **kwargs):
        calls.append(tuple(encoder_hidden_states.shape[:2]))
        return forward(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)

    monkeypatch.setattr(unet, "forward", recording)
    return calls


def test_by_default_prompt_and_negative_run_at_their_own_lengths(sd1_manager, unet_calls):
    default = run(sd1_manager)
    # As A1111: the conditional rows first (3 chunks), then the negative alone (1 chunk), every step.
    assert unet_calls == [(1, 3 * 77), (1, 77)] * STEPS
    unet_calls.clear()
    padded = run(sd1_manager, pad_cond_uncond=True)
    assert unet_calls == [(2, 3 * 77)] * STEPS
    assert np.abs(default - padded).max() > 0  # the padded chunks change what the negative says


def test_pad_cond_uncond_keeps_the_padded_pixels(sd1_manager, unet_calls):
    padded = run(sd1_manager, pad_cond_uncond=True)
    assert unet_calls == [(2, 3 * 77)] * STEPS  # one batch: the negative padded to 3 chunks
    assert padded[20, 20:26].tolist() == PADDED_PIN
    # Padding appends the empty prompt's chunks: the same as writing two empty chunks into the negative.
    assert np.array_equal(padded, run(sd1_manager, negative=ONE_CHUNK_AND_TWO_EMPTY))


@pytest.mark.parametrize("negative, tokens", [(ONE_CHUNK_AND_TWO_EMPTY, 3 * 77), ("bad BREAK worse BREAK ugly", 3 * 77)])
def test_equal_lengths_run_one_batched_call_per_step_with_or_without_the_option(sd1_manager, unet_calls, negative,
                                                                                 tokens):
    default = run(sd1_manager, negative=negative)
    assert unet_calls == [(2, tokens)] * STEPS
    assert np.array_equal(default, run(sd1_manager, negative=negative, pad_cond_uncond=True))
    assert unet_calls == [(2, tokens)] * (2 * STEPS)


def test_a_longer_negative_runs_apart_too(sd1_manager, unet_calls):
    run(sd1_manager, prompt=ONE_CHUNK, negative=THREE_CHUNKS)
    assert unet_calls == [(1, 77), (1, 3 * 77)] * STEPS
    unet_calls.clear()
    run(sd1_manager, prompt=ONE_CHUNK, negative=THREE_CHUNKS, pad_cond_uncond=True)
    assert unet_calls == [(2, 3 * 77)] * STEPS  # the prompt is padded this time


def test_and_subprompts_batch_together_and_the_negative_runs_alone(sd1_manager, unet_calls):
    run(sd1_manager, prompt=f"{THREE_CHUNKS} AND a circle:0.5", batch_size=2)
    # Both subprompts for both images (the short one padded with its last vector), then both negatives.
    assert unet_calls == [(4, 3 * 77), (2, 77)] * STEPS


def _guidance(model, prompt, negative, cfg_scale=7.0, **fields):
    cond = conditioning.encode_for_generation(model, prompt, negative, STEPS)
    request = GenerationRequest(prompt=prompt, negative_prompt=negative, cfg_scale=cfg_scale, width=64, height=64,
                                **fields)
    return cond, denoiser._Guidance(model, cond, 1, request)


@torch.no_grad()
def test_guidance_is_the_cfg_formula_over_separate_unet_calls(sd1_manager):
    model = sd1_manager.activate()
    cond, guidance = _guidance(model, THREE_CHUNKS, ONE_CHUNK)
    positive, negative = cond.positive[0][1][0][1].context, cond.negative[0][1].context
    assert positive.shape[0] == 3 * 77 and negative.shape[0] == 77
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    predicted = guidance.predict(x, t, 0)
    cond_out = model.unet(x, t, encoder_hidden_states=positive[None]).sample
    uncond_out = model.unet(x, t, encoder_hidden_states=negative[None]).sample
    assert torch.equal(predicted, uncond_out + (cond_out - uncond_out) * 7.0)

    padded_negative = torch.cat([negative, cond.empty.context, cond.empty.context])
    _, padded = _guidance(model, THREE_CHUNKS, ONE_CHUNK, pad_cond_uncond=True)
    batched = model.unet(x.repeat(2, 1, 1, 1), t, encoder_hidden_states=torch.stack([padded_negative, positive])).sample
    uncond_out, cond_out = batched.chunk(2)
    assert torch.equal(padded.predict(x, t, 0), uncond_out + (cond_out - uncond_out) * 7.0)
    assert not torch.equal(predicted, padded.predict(x, t, 0))


def test_the_option_reaches_requests_and_is_checked(sd1_manager, tmp_path):
    assert Options().pad_cond_uncond is False and GenerationRequest().pad_cond_uncond is False
    with pytest.raises(ValueError, match="pad_cond_uncond"):
        Options(pad_cond_uncond="yes").validate()
    with pytest.raises(RequestError, match="pad_cond_uncond"):
        GenerationRequest(pad_cond_uncond=1).validate()
    runtime = Runtime.create(sd1_manager.settings, manager=sd1_manager)
    assert runtime.request_defaults("txt2img")["pad_cond_uncond"] is False
    runtime.apply({"pad_cond_uncond": True}, save=False)
    assert runtime.request_defaults("img2img")["pad_cond_uncond"] is True


def test_the_infotext_says_pad_conds_when_padding_happened_and_pastes_back(sd1_manager):
    from backend.generation import generate
    from backend.infotext import parse_infotext, request_fields

    def infotext(**fields) -> str:
        request = GenerationRequest(prompt=THREE_CHUNKS, width=64, height=64, steps=2, seed=3, save_images=False,
                                    **fields)
        return generate(sd1_manager, request).images[0].infotext

    padded = infotext(negative_prompt=ONE_CHUNK, pad_cond_uncond=True)
    assert parse_infotext(padded)["Pad conds"] == "True"
    assert request_fields(parse_infotext(padded))["pad_cond_uncond"] is True
    assert "Pad conds" not in infotext(negative_prompt=ONE_CHUNK)  # the option off
    assert "Pad conds" not in infotext(negative_prompt=THREE_CHUNKS, pad_cond_uncond=True)  # nothing to pad
    assert "pad_cond_uncond" not in request_fields(parse_infotext("x\nSteps: 2, Sampler: Euler, Seed: 1"))
