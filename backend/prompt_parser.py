"""A1111's prompt language: attention weights, prompt editing and alternation, `AND` subprompts.

- `parse_prompt_attention(text)`: `(x)` x1.1, `[x]` /1.1, `(x:w)`, nesting multiplies, unbalanced
  brackets close at the end, `\\(` `\\)` `\\[` `\\]` `\\\\` are literals, equal neighbours merge, `BREAK`
  appears as `("BREAK", -1)`.
- `prompt_schedules(prompt, steps, hires_steps)`: `[from:to:when]`, `[to:when]`, `[from::when]` and
  `[a|b|c]` resolved into the texts in force up to each step.
- `split_and(prompt)`: composable-diffusion subprompts with their `:weight`.

The results match A1111's own functions case for case (the tests hold a table of its documented
examples); where A1111 would raise on a prompt (`(word:1.2.3)`), the text is taken literally instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
class _NoMatch(Exception):
    """The text at this position is not the construct being tried."""


@dataclass
class _Scheduled:
    before: list | None  # None: `[to:when]`
    after: list
    when: str  # the number as written (a "." makes it a fraction of the steps)
    step: int = 0  # `when` resolved for the steps at hand


@dataclass
class _Alternate:
    options: list[list | None]


_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+", re.S)
_NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")
_STRAY = "[]():"


class _ScheduleParser:
    """Recursive descent over A1111's scheduling grammar. Inside a construct only well-formed
    syntax is accepted; at the top level a bracket or colon that starts nothing is a literal."""

    def __init__(self, text: str):
        self.text = text

    def parse(self) -> list:
        nodes, pos = [], 0
        while pos < len(self.text):
            items, pos = self.prompt(pos)
            nodes += items
            if pos < len(self.text):
                if self.text[pos] not in _STRAY:
                    raise _NoMatch(pos)  # e.g. a "|" outside brackets: the prompt is taken literally
                nodes.append(self.text[pos])
                pos += 1
        return nodes

    def prompt(self, pos: int) -> tuple[list, int]:
        """A run of plain text, whitespace and bracketed constructs."""
        items = []
        while pos < len(self.text):
            plain = _PLAIN.match(self.text, pos)
            if plain:
                items.append(plain.group(0))
                pos = plain.end()
                continue
            char = self.text[pos]
            try:
                if char == "(":
                    item, pos = self.round(pos)
                elif char == "[":
                    item, pos = self.square(pos)
                else:
                    break
            except _NoMatch:
                break
            items.extend(item) if isinstance(item, list) else items.append(item)
        return items, pos

    def expect(self, pos: int, char: str) -> int:
        if pos < len(self.text) and self.text[pos] == char:
            return pos + 1
        raise _NoMatch(pos)

    def round(self, pos: int) -> tuple[list, int]:
        """`(prompt)` or `(prompt:prompt)`: kept as written, with what is inside resolved."""
        inner, pos = self.prompt(pos + 1)
        if pos < len(self.text) and self.text[pos] == ":":
            second, pos = self.prompt(pos + 1)
            return ["(", *inner, ":", *second, ")"], self.expect(pos, ")")
        return ["(", *inner, ")"], self.expect(pos, ")")

    def square(self, pos: int):
        start = pos + 1
        for attempt in (self._scheduled, self._alternate, self._emphasis):
            try:
                return attempt(start)
            except _NoMatch:
                continue
        raise _NoMatch(pos)

    def _scheduled(self, pos: int):
        first, pos = self.prompt(pos)
        pos = self.expect(pos, ":")
        number = _NUMBER.match(self.text, pos)
        if number:  # `[to:when]`
            return _Scheduled(None, first, number.group(1)), number.end()
        second, pos = self.prompt(pos)
        pos = self.expect(pos, ":")
        number = _NUMBER.match(self.text, pos)
        if not number:
            raise _NoMatch(pos)
        return _Scheduled(first, second, number.group(1)), number.end()

    def _alternate(self, pos: int):
        first, pos = self.prompt(pos)
        options = [first]
        pos = self.expect(pos, "|")
        while True:
            option, pos = self.prompt(pos)
            options.append(option or None)
            if pos < len(self.text) and self.text[pos] == "|":
                pos += 1
                continue
            return _Alternate(options), self.expect(pos, "]")

    def _emphasis(self, pos: int):
        inner, pos = self.prompt(pos)
        return ["[", *inner, "]"], self.expect(pos, "]")


def _when_step(when: str, steps: int, int_offset: int, fraction_offset: float) -> int:
    value = float(when)
    value = (value - fraction_offset) * steps if "." in when else value - int_offset
    return min(steps, int(value))


def _collect_steps(nodes: list, steps: int, offsets: tuple[int, float], found: set[int]) -> None:
    for node in nodes:
        if isinstance(node, _Scheduled):
            node.step = _when_step(node.when, steps, *offsets)
            if node.step >= 1:
                found.add(node.step)
            for part in (node.before or [], node.after):
                _collect_steps(part, steps, offsets, found)
        elif isinstance(node, _Alternate):
            found.update(range(1, steps + 1))
            for option in node.options:
                _collect_steps(option or [], steps, offsets, found)


def _text_at(nodes: list, step: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Scheduled):
            out.append(_text_at((node.before or []) if step <= node.step else node.after, step))
        else:
            out.append(_text_at(node.options[(step - 1) % len(node.options)] or [], step))
    return "".join(out)


def prompt_schedules(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """[(last step, text in force up to it), ...] for one pass of `steps` (or, with `hires_steps`,
    for the hires pass, where fractions run 1..2 and step numbers continue after the first pass)."""
    if hires_steps is None:
        total, offsets = steps, (0, 0.0)
    else:
        total, offsets = hires_steps, (steps, 1.0)
    try:
        nodes = _ScheduleParser(prompt).parse()
    except (_NoMatch, RecursionError):
        return [(total, prompt)]
    found = {total}
    _collect_steps(nodes, total, offsets, found)
    return [(step, _text_at(nodes, step)) for step in sorted(found)]


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
