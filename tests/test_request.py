"""`GenerationRequest.validate()`: every field a client sends is refused with a RequestError naming it
when it is out of range, not a finite number, too long, or too big for 64 bits."""

import pytest

from backend.request import MAX_PROMPT_CHARS, GenerationRequest, RequestError

PROMPT_FIELDS = ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")


@pytest.mark.parametrize("name", PROMPT_FIELDS)
def test_a_prompt_over_the_cap_is_refused_naming_field_length_and_cap(name):
    assert MAX_PROMPT_CHARS == 32_768
    request = GenerationRequest(**{name: "a" * (MAX_PROMPT_CHARS + 1)})
    with pytest.raises(RequestError, match=f"^{name} is 32,769 characters long; the limit is 32,768 characters"):
        request.validate()


@pytest.mark.parametrize("name", PROMPT_FIELDS)
def test_a_prompt_at_the_cap_is_accepted(name):
    GenerationRequest(**{name: "a" * MAX_PROMPT_CHARS}).validate()


BIG = 2**70
OUT_OF_RANGE = [
    # (field values, the start of the message)
    ({"cfg_scale": float("nan")}, "cfg_scale must be a finite number, not nan"),
    ({"cfg_scale": float("inf")}, "cfg_scale must be a finite number, not inf"),
    ({"cfg_scale": float("-inf")}, "cfg_scale must be a finite number, not -inf"),
    ({"hr_scale": float("nan")}, "hr_scale must be a finite number, not nan"),
    ({"denoising_strength": float("inf")}, "denoising_strength must be a finite number"),
    ({"hr_second_pass_steps": BIG}, "hr_second_pass_steps must be a whole number that fits in 64 bits, not "
                                    "1180591620717411303424"),
    ({"hr_second_pass_steps": 1001}, "hires steps must be between 0 and 1000, not 1001"),
    ({"hr_second_pass_steps": -1}, "hires steps must be between 0 and 1000, not -1"),
    ({"hr_second_pass_steps": 1001, "enable_hr": True}, "hires steps must be between 0 and 1000, not 1001"),
    ({"steps": 10**400}, "steps must be a whole number that fits in 64 bits, not a 1329-bit number"),
    ({"steps": float("inf")}, "steps must be a whole number that fits in 64 bits, not inf"),
    ({"steps": 1e300}, "steps must be a whole number that fits in 64 bits, not 1e+300"),
    ({"mask_blur": 4097}, "mask blur must be between 0 and 4096, not 4097"),
    ({"only_masked_padding": 2**40}, "only masked padding must be between 0 and 4096, not 1099511627776"),
    ({"width": float("nan")}, "width must be a whole number that fits in 64 bits, not nan"),
    ({"width": 10**5000}, "width must be a whole number that fits in 64 bits, not a 16610-bit number"),
]
for name in ("steps", "width", "height", "batch_size", "batch_count", "clip_skip", "seed", "subseed",
             "seed_resize_from_w", "seed_resize_from_h", "mask_blur", "only_masked_padding", "hr_resize_x",
             "hr_resize_y", "hr_second_pass_steps"):
    for value in (BIG, -BIG, 2**64, -(2**63) - 1):
        OUT_OF_RANGE.append(({name: value}, f"{name} must be a whole number that fits in 64 bits, not {value}"))
        OUT_OF_RANGE.append(({name: value, "enable_hr": True},
                             f"{name} must be a whole number that fits in 64 bits, not {value}"))


@pytest.mark.parametrize("fields, message", OUT_OF_RANGE)
def test_out_of_range_fields_are_a_request_error_naming_the_field(fields, message):
    with pytest.raises(RequestError) as refusal:
        GenerationRequest(**fields).validate()
    assert str(refusal.value).startswith(message)


ACCEPTED = [
    {"seed": 2**64 - 1, "subseed": -1},
    {"seed": -(2**63)},
    {"hr_second_pass_steps": 0},
    {"hr_second_pass_steps": 1000, "enable_hr": True},
    {"hr_resize_x": 0, "hr_resize_y": 0, "hr_scale": 2.0},
    {"mask_blur": 4096, "only_masked_padding": 0},
    {"cfg_scale": 0.0},
]


@pytest.mark.parametrize("fields", ACCEPTED)
def test_edges_of_the_ranges_are_accepted(fields):
    GenerationRequest(**fields).validate()
