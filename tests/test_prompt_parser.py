"""A1111's prompt language, table-driven: its documented examples first, then edge cases."""

import pytest

from backend.prompt_parser import parse_prompt_attention, prompt_schedules, split_and

ATTENTION = [
    # A1111's documented examples
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    # weights and nesting
    ("((word))", [("word", 1.2100000000000002)]),
    ("[word]", [("word", 0.9090909090909091)]),
    ("[[word]]", [("word", 0.8264462809917354)]),
    ("(word:1.3)", [("word", 1.3)]),
    ("((a:1.2):1.5)", [("a", 1.7999999999999998)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a: 0.5 )", [("a", 0.5)]),
    ("[unbalanced", [("unbalanced", 0.9090909090909091)]),
    ("a)b]c", [("a)b]c", 1.0)]),
    ("a:b", [("a:b", 1.0)]),
    ("", [("", 1.0)]),
    # escapes
    ("\\\\", [("\\", 1.0)]),
    ("a\\b", [("ab", 1.0)]),
    ("(a\\)b)", [("a)b", 1.1)]),
    # BREAK
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("a BREAKb", [("a BREAKb", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    # a weight A1111 would raise on is taken literally
    ("(word:1.2.3)", [("word:1.2.3)", 1.1)]),
]


@pytest.mark.parametrize("text, expected", ATTENTION)
def test_parse_prompt_attention(text, expected):
    assert parse_prompt_attention(text) == expected


SCHEDULES = [
    # A1111's documented examples (10 steps)
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
    ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
    # edge cases
    ("a [b::4] c", [(4, "a b c"), (10, "a  c")]),
    ("[red:blue:0.5] star", [(5, "red star"), (10, "blue star")]),
    ("[a:b:0]", [(10, "b")]),
    ("[a:b:-2]", [(10, "b")]),
    ("[a:b:25]", [(10, "a")]),
    ("[a:b:1e1]", [(10, "a")]),
    ("a | b", [(10, "a | b")]),  # a bare | is only legal inside brackets
    ("(a|b)", [(10, "(a|b)")]),
    ("[a|b:0.5]", [(10, "[a|b:0.5]")]),  # an option cannot hold a top-level colon
    ("[a:b:c]", [(10, "[a:b:c]")]),
    ("a [{b|d{:.5] c", [(10, "a [{b|d{:.5] c")]),
    ("a\\[b:3]", [(10, "a\\[b:3]")]),
    ("(x:1.2) [y:z:5]", [(5, "(x:1.2) y"), (10, "(x:1.2) z")]),
    ("[[a|b]:c:3]", [(1, "a"), (2, "b"), (3, "a"), *[(s, "c") for s in range(4, 11)]]),
]


@pytest.mark.parametrize("prompt, expected", SCHEDULES)
def test_prompt_schedules(prompt, expected):
    assert prompt_schedules(prompt, 10) == expected


def test_hires_pass_continues_the_fraction_and_step_ranges():
    assert prompt_schedules("a [b:.5] c", 10, 10) == [(10, "a b c")]
    assert prompt_schedules("a [b:1.5] c", 10, 10) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedules("a [b:13] c", 10, 10) == [(3, "a  c"), (10, "a b c")]


def test_deep_nesting_is_taken_literally_not_a_crash():
    prompt = "[" * 3000 + "a"
    assert prompt_schedules(prompt, 10) == [(10, prompt)]


@pytest.mark.parametrize("prompt, expected", [
    ("a cat", [("a cat", 1.0)]),
    ("a cat AND a dog", [("a cat", 1.0), (" a dog", 1.0)]),
    ("a cat :1.5 AND a dog:0.5", [("a cat", 1.5), (" a dog", 0.5)]),
    ("a cat AND a dog: -0.3", [("a cat", 1.0), (" a dog", -0.3)]),
    ("ANDROID", [("ANDROID", 1.0)]),
    ("(a:1.2) AND b", [("(a:1.2)", 1.0), (" b", 1.0)]),
])
def test_split_and(prompt, expected):
    assert split_and(prompt) == expected
