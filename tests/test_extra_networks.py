"""Extra-network tags in prompts: `<kind:name:args>` parsing and the LoRA strengths they ask for."""

import pytest

from backend.extra_networks import NetworkTag, lora_activation, parse_tags
from backend.lora import MAX_STRENGTH, Activation
from backend.lora_files import LoraError

TAG_CASES = [
    # (prompt, text left, tags)
    ("a cat <lora:detail:0.7>", "a cat ", [NetworkTag("lora", ("detail", "0.7"))]),
    ("<LORA:x:1:0.5> b <hypernet:h>", " b ", [NetworkTag("lora", ("x", "1", "0.5")),
                                              NetworkTag("hypernet", ("h",))]),
    ("<lora:x:1:unet=0.2>", "", [NetworkTag("lora", ("x", "1"), (("unet", "0.2"),))]),
    ("no tags: (a:1.2)", "no tags: (a:1.2)", []),
]


@pytest.mark.parametrize("prompt, text, tags", TAG_CASES)
def test_parse_tags(prompt, text, tags):
    assert parse_tags(prompt) == (text, tags)


STRENGTHS = [
    # (tag, (te, unet))
    ("<lora:x>", (1.0, 1.0)),
    ("<lora:x:0.8>", (0.8, 0.8)),
    ("<lora:x:1:0.5>", (1.0, 0.5)),
    ("<lora:x:0.8:unet=-2>", (0.8, -2.0)),
    ("<lora:x:te=0:unet=1>", (0.0, 1.0)),
    ("<lora:x:100>", (100.0, 100.0)),
    ("<lora:x:-100:1e2>", (-100.0, 100.0)),
]


@pytest.mark.parametrize("tag, strengths", STRENGTHS)
def test_strengths_as_a1111_reads_them(tag, strengths):
    assert lora_activation(parse_tags(tag)[1][0]) == Activation("x", *strengths)


BAD_STRENGTHS = [
    # (tag, the value the message names)
    ("<lora:x:1e308>", "1e+308"),
    ("<lora:x:1e400>", "inf"),
    ("<lora:x:nan>", "nan"),
    ("<lora:x:NaN>", "nan"),
    ("<lora:x:-inf>", "-inf"),
    ("<lora:x:100.5>", "100.5"),
    ("<lora:x:-1000>", "-1000"),
    ("<lora:x:1:nan>", "nan"),
    ("<lora:x:1:unet=1e39>", "1e+39"),
    ("<lora:x:te=inf>", "inf"),
]


@pytest.mark.parametrize("tag, shown", BAD_STRENGTHS)
def test_non_finite_or_huge_strength_is_a_user_error(tag, shown):
    message = f"LoRA strength for 'x' must be a finite number between -100 and 100, not {shown}"
    with pytest.raises(LoraError, match=message.replace("+", r"\+")):
        lora_activation(parse_tags(tag)[1][0])


def test_activation_itself_refuses_a_strength_out_of_range():
    assert MAX_STRENGTH == 100
    with pytest.raises(LoraError, match="'y' must be a finite number"):
        Activation("y", 1.0, float("nan"))
