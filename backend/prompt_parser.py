"""A1111's prompt language: attention weights, prompt editing and alternation, `AND` subprompts.

- `parse_prompt_attention(text)`: `(x)` x1.1, `[x]` /1.1, `(x:w)`, nesting multiplies, unbalanced
  brackets close at the end, `\\(` `\\)` `\\[` `\\]` `\\\\` are literals, equal neighbours merge, `BREAK`
  appears as `("BREAK", -1)`.
- `prompt_schedules(prompt, steps, hires_steps)`: `[from:to:when]`, `[to:when]`, `[from::when]` and
  `[a|b|c]` resolved into the texts in force up to each step; which brackets take effect in an odd prompt
  (stray brackets and colons) is decided as A1111's parser decides it (`backend/prompt_editing.py`).
- `split_and(prompt)`: composable-diffusion subprompts with their `:weight`.

The results match A1111's own functions case for case (the tests hold a table of its documented
examples, and compare prompt editing with A1111's parser on random prompts); where A1111 would raise on
a prompt (`(word:1.2.3)`, `[a:b:1e400]`), the text is taken literally instead.
"""

from __future__ import annotations

import re

from backend.prompt_editing import Alternation, Edit, parse_prompt_editing

ROUND, SQUARE = 1.1, 1 / 1.1

# One token of attention syntax per match; the alternatives are tried in this order.
_ATTENTION_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]            # escaped bracket or backslash: a literal
    | \\                    # any other backslash: dropped
    | \( | \[               # openers
    | :\s*([+-]?[.\d]+)\s*\)  # ":weight)" closing a round bracket
    | \) | \]               # closers
    | [^\\()\[\]:]+         # plain text
    | :                     # a colon that is not a weight
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """`text` as (fragment, weight) pairs, as A1111 reads it. `BREAK` is `("BREAK", -1)`."""
    parts: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for part in parts[start:]:
            part[1] *= factor

    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            parts.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(parts))
        elif token == "[":
            open_square.append(len(parts))
        elif weight is not None and open_round:
            try:
                factor = float(weight)
            except ValueError:  # "(word:1.2.3)": A1111 raises here; keep the text instead
                parts.append([token, 1.0])
                continue
            scale_from(open_round.pop(), factor)
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE)
        else:
            for index, piece in enumerate(_BREAK.split(token)):
                if index:
                    parts.append(["BREAK", -1])
                parts.append([piece, 1.0])
    for start in open_round:  # unbalanced brackets close at the end
        scale_from(start, ROUND)
    for start in open_square:
        scale_from(start, SQUARE)
    if not parts:
        return [("", 1.0)]
    merged = [parts[0]]
    for part in parts[1:]:
        if part[1] == merged[-1][1]:
            merged[-1][0] += part[0]
        else:
            merged.append(part)
    return [(fragment, weight) for fragment, weight in merged]


# -- prompt editing and alternation ---------------------------------------------------------------
def prompt_schedules(prompt: str, steps: int, hires_steps: int | None = None, *,
                     use_old_scheduling: bool = False) -> list[tuple[int, str]]:
    """[(last step, text in force up to it), ...] for one pass of `steps` (or, with `hires_steps`, for the
    hires pass, where fractions run 1..2 and step numbers continue after the first pass). With
    `use_old_scheduling` (A1111's "Old prompt editing timelines"), a `when` below 1 is a fraction and any
    other a step of the first pass."""
    if hires_steps is None or use_old_scheduling:
        total, int_offset, fraction_offset = steps, 0, 0.0
    else:
        total, int_offset, fraction_offset = hires_steps, steps, 1.0
    pieces = parse_prompt_editing(prompt)
    if pieces is None:
        return [(total, prompt)]
    ends: dict[int, int] = {}
    found = {total}
    try:
        for node in _edits_and_alternations(pieces):
            if isinstance(node, Edit):
                ends[id(node)] = _when_step(node.when, total, int_offset, fraction_offset, use_old_scheduling)
                if ends[id(node)] >= 1:
                    found.add(ends[id(node)])
            else:
                found.update(range(1, total + 1))
    except OverflowError:  # `when` beyond float range ("1e400"): A1111 raises; the text is used literally
        return [(total, prompt)]
    return [(step, _text_at(pieces, step, ends)) for step in sorted(found)]


def _when_step(when: str, steps: int, int_offset: int, fraction_offset: float, old: bool) -> int:
    value = float(when)
    if old:
        value = value * steps if value < 1 else value
    elif "." in when:
        value = (value - fraction_offset) * steps
    else:
        value -= int_offset
    return min(steps, int(value))  # int() truncates toward zero, as A1111's does


def _edits_and_alternations(pieces: list):
    """Every edit and alternation, also those inside a branch that is never in force (A1111 counts them)."""
    pending = [pieces]
    while pending:  # a loop, not recursion: edits may nest thousands deep
        for piece in pending.pop():
            if isinstance(piece, Edit):
                yield piece
                pending += [piece.before, piece.after]
            elif isinstance(piece, Alternation):
                yield piece
                pending += piece.options
            elif isinstance(piece, list):
                pending.append(piece)


_DONE = object()


def _text_at(pieces: list, step: int, ends: dict[int, int]) -> str:
    out = []
    pending = [iter(pieces)]
    while pending:
        piece = next(pending[-1], _DONE)
        if piece is _DONE:
            pending.pop()
        elif isinstance(piece, str):
            out.append(piece)
        elif isinstance(piece, list):
            pending.append(iter(piece))
        elif isinstance(piece, Edit):
            pending.append(iter(piece.before if step <= ends[id(piece)] else piece.after))
        else:
            pending.append(iter(piece.options[(step - 1) % len(piece.options)]))
    return "".join(out)


# -- AND -------------------------------------------------------------------------------------------------
_AND = re.compile(r"\bAND\b")
_SUBPROMPT_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Composable diffusion: `a AND b :0.5` -> [("a", 1.0), ("b", 0.5)]."""
    parts = []
    for subprompt in _AND.split(prompt):
        match = _SUBPROMPT_WEIGHT.search(subprompt)  # always matches; trailing blanks drop off the text
        parts.append((match.group(1), float(match.group(2)) if match.group(2) is not None else 1.0))
    return parts
