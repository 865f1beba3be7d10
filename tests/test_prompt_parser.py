"""A1111's prompt language, table-driven: its documented examples first, then edge cases. Prompt editing
is also compared with A1111's own parser (lark's Earley parser on A1111's grammar) on random prompts."""

import random

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


# Prompts that parse more than one way: A1111 keeps the derivation lark's Earley parser lists first
# (checked against lark 1.3.1; see a1111_schedules below).
ODD_SCHEDULES = [
    ("[y:z:0.4][y:z:0.4]::ANDAND", [(4, "y[y:z:0.4]::ANDAND"), (10, "z[y:z:0.4]::ANDAND")]),
    ("[y:z:0.4][y:z:0.4]:ANDAND", [(4, "yy:ANDAND"), (10, "zz:ANDAND")]),
    ("[a:b:3]::[c:d:6]", [(6, "[a:b:3]::c"), (10, "[a:b:3]::d")]),
    ("[a:b:3]:[c:d:6]", [(3, "a:c"), (6, "b:c"), (10, "b:d")]),
    ("[a:b:2]):", [(10, "[a:b:2]):")]),
    ("[a:b:2]) :", [(2, "a) :"), (10, "b) :")]),
    ("[a:b:2]):]", [(2, "a):]"), (10, "b):]")]),
    ("([a:b:2]):", [(10, "([a:b:2]):")]),
    ("[a:b:2]]:", [(10, "[a:b:2]]:")]),
    ("[a:b:2](:", [(10, "[a:b:2](:")]),
    ("[a:b:2]()::", [(10, "[a:b:2]()::")]),
    ("[a:b:2][]:", [(2, "a[]:"), (10, "b[]:")]),
    ("[[a:b:3]:4]:", [(3, ":"), (4, ":"), (10, "b:")]),
    ("a [b:c:0.5] :)", [(5, "a b :)"), (10, "a c :)")]),
    ("((a) [b:c:0.5]", [(5, "((a) b"), (10, "((a) c")]),
    ("[a:b:0.5)", [(10, "[a:b:0.5)")]),
    ("[a|b]]::", [(s, ("a" if s % 2 else "b") + "]::") for s in range(1, 11)]),
]


@pytest.mark.parametrize("prompt, expected", ODD_SCHEDULES)
def test_odd_prompts_resolve_as_a1111_does(prompt, expected):
    assert prompt_schedules(prompt, 10) == expected


def test_hires_pass_continues_the_fraction_and_step_ranges():
    assert prompt_schedules("a [b:.5] c", 10, 10) == [(10, "a b c")]
    assert prompt_schedules("a [b:1.5] c", 10, 10) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedules("a [b:13] c", 10, 10) == [(3, "a  c"), (10, "a b c")]
    assert prompt_schedules("[a|b] [c:d:1.5]", 4, 6) == [
        (1, "a c"), (2, "b c"), (3, "a c"), (4, "b d"), (5, "a d"), (6, "b d")]


def test_old_scheduling_reads_when_below_1_as_a_fraction_of_the_first_pass():
    assert prompt_schedules("a [b:0.5] c", 10, use_old_scheduling=True) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedules("a [b:5e-1] c", 10, use_old_scheduling=True) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedules("a [b:5e-1] c", 10) == [(10, "a b c")]  # no ".": a step, 0
    assert prompt_schedules("a [b:.5] c", 10, 10, use_old_scheduling=True) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedules("a [b:3] c", 10, 20, use_old_scheduling=True) == [(3, "a  c"), (10, "a b c")]


def test_a_when_beyond_float_range_is_taken_literally():
    assert prompt_schedules("[a:b:1e400]", 10) == [(10, "[a:b:1e400]")]  # A1111 raises OverflowError


def test_deep_nesting_is_taken_literally_not_a_crash():
    prompt = "[" * 3000 + "a"
    assert prompt_schedules(prompt, 10) == [(10, prompt)]


# -- long prompts: linear time (measured by hand, not asserted), same results as A1111's grammar gives ----
def _weights(count: int) -> str:
    words = ["masterpiece", "best quality", "castle", "forest", "cinematic lighting", "film grain"]
    return ", ".join(f"({words[i % len(words)]}:1.1), {words[(i + 1) % len(words)]}" for i in range(count))


@pytest.mark.parametrize("prefix", ["", "score: ", "(", "smile :) "])
def test_150_weights_and_two_edits(prefix):
    head, tail = _weights(75), _weights(75)
    prompt = f"{prefix}{head}, [red dress:blue dress:0.5], {tail} [day|night]"
    expected = [(s, f"{prefix}{head}, {'red' if s <= 10 else 'blue'} dress, {tail} {'day' if s % 2 else 'night'}")
                for s in range(1, 21)]
    assert prompt_schedules(prompt, 20) == expected


@pytest.mark.parametrize("colons, first_takes_effect", [(1, True), (2, False), (3000, False), (3001, True)])
def test_a_run_of_stray_colons_decides_by_its_length(colons, first_takes_effect):
    """A1111 leaves the edit before an even run of stray characters literal (how lark orders its items)."""
    prompt = "[a:b:5]" + ":" * colons + "[c:d:7]"
    first = ["a", "b"] if first_takes_effect else ["[a:b:5]", "[a:b:5]"]
    expected = [(5, first[0] + ":" * colons + "c"), (7, first[1] + ":" * colons + "c"),
                (10, first[1] + ":" * colons + "d")]
    assert prompt_schedules(prompt, 10) == (expected if first_takes_effect else expected[1:])


@pytest.mark.parametrize("prompt", ["[" + ":" * 3000 + "]", "[a" + ":" * 3000 + "b:0.5]", "[" + "a:" * 1500 + "5]"])
def test_3000_colons_in_a_bracket_are_text(prompt):
    assert prompt_schedules(prompt, 10) == [(10, prompt)]


def test_2000_nested_brackets():
    assert prompt_schedules("[" * 2000 + "[a:b:5]" + "]" * 2000, 10) == [
        (5, "[" * 2000 + "a" + "]" * 2000), (10, "[" * 2000 + "b" + "]" * 2000)]
    assert prompt_schedules("(" * 2000 + "[a:b:0.5]" + ")" * 2001, 10) == [
        (5, "(" * 2000 + "a" + ")" * 2001), (10, "(" * 2000 + "b" + ")" * 2001)]
    assert prompt_schedules("[a:" * 2000 + "x" + ":5]" * 2000, 10) == [(5, "a"), (10, "x")]
    alternation = "[a|" * 2000 + "x" + "]" * 2000
    assert prompt_schedules(alternation, 3) == [(1, "a"), (2, "x"), (3, "a")]


# -- A1111's own parser as the reference ---------------------------------------------------------------------
# A1111's grammar (modules/prompt_parser.py), rule for rule and in its order, with our names: lark's Earley
# parser picks among ambiguous parses by rule order and shape, so those must not change.
A1111_GRAMMAR = r"""
!start: (text | /[][():]/+)*
text: (emphasis | edit | alternation | chars | BLANK)*
!emphasis: "(" text ")"
    | "(" text ":" text ")"
    | "[" text "]"
edit: "[" [text ":"] text ":" [BLANK] WHEN [BLANK] "]"
alternation: "[" text ("|" [text])+ "]"
BLANK: /\s+/
chars: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> WHEN
"""


@pytest.fixture(scope="module")
def a1111_schedules():
    """A1111's get_learned_conditioning_prompt_schedules([prompt], ...)[0], on lark's parse tree.
    lark >= 1.1.8: older versions (A1111 pins 1.1.2) resolve ties by set order, which changes with the
    process's hash seed."""
    lark = pytest.importorskip("lark", minversion="1.1.8")
    parser = lark.Lark(A1111_GRAMMAR)  # A1111's options: the defaults (Earley, dynamic lexer)

    def schedules(prompt, steps, hires_steps=None, use_old_scheduling=False):
        if hires_steps is None or use_old_scheduling:
            total, int_offset, fraction_offset = steps, 0, 0.0
        else:
            total, int_offset, fraction_offset = hires_steps, steps, 1.0
        try:
            tree = parser.parse(prompt)
        except lark.exceptions.LarkError:
            return [(total, prompt)]
        ends, found = {}, {total}
        for edit in tree.find_data("edit"):  # children: before (or None), after, blank, when, blank
            when = edit.children[3]
            value = float(when)
            if use_old_scheduling:
                value = value * total if value < 1 else value
            elif "." in when:
                value = (value - fraction_offset) * total
            else:
                value -= int_offset
            ends[id(edit)] = min(total, int(value))
            if ends[id(edit)] >= 1:
                found.add(ends[id(edit)])
        if any(tree.find_data("alternation")):
            found.update(range(1, total + 1))

        def text(node, step):
            if node is None:  # an absent `[text ":"]` or option
                return ""
            if isinstance(node, lark.Token):
                return str(node)
            if node.data == "edit":
                return text(node.children[0] if step <= ends[id(node)] else node.children[1], step)
            if node.data == "alternation":
                return text(node.children[(step - 1) % len(node.children)], step)
            return "".join(text(child, step) for child in node.children)

        return [(step, text(tree, step)) for step in sorted(found)]

    return schedules


PIECES = ["[", "]", "(", ")", ":", "::", "|", "\\", "\\[", " ", "  ", "\n", "a", "word", "5", "-1", "1e1", "0.4",
          ".5", ".", "AND", "[a:b:0.5]", "[x|y]", "(w:1.1)", "[c:3]", "[:d:2]"]


def random_prompt(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 12)))


def test_prompt_editing_matches_a1111_on_random_prompts(a1111_schedules):
    rng = random.Random(1111)
    cases = [(random_prompt(rng), rng.choice([1, 3, 10, 20]), rng.choice([None, None, 4, 10]), rng.random() < 0.2)
             for _ in range(800)]
    mismatches = [(prompt, steps, hires, old) for prompt, steps, hires, old in cases
                  if prompt_schedules(prompt, steps, hires, use_old_scheduling=old)
                  != a1111_schedules(prompt, steps, hires, old)]
    assert not mismatches, f"{len(mismatches)} of {len(cases)} differ from A1111, e.g. {mismatches[:5]}"


def test_the_reference_reads_a1111s_documented_examples(a1111_schedules):
    """The reference itself is checked on A1111's doctests, so a mistake in it cannot pass unseen."""
    for prompt, expected in SCHEDULES[:13]:
        assert a1111_schedules(prompt, 10) == expected
    assert a1111_schedules("a [b:1.5] c", 10, 10) == [(5, "a  c"), (10, "a b c")]
    assert a1111_schedules("[y:z:0.4][y:z:0.4]::ANDAND", 10) == ODD_SCHEDULES[0][1]


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
