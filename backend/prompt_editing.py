"""Which `[from:to:when]`, `[to:when]`, `[from::when]` and `[a|b]` of a prompt take effect, as A1111 decides.

A1111 parses them with lark's Earley parser on a grammar where a bracket or colon that starts nothing stands
for itself; where a prompt parses several ways, lark's choice is what this module reproduces, in linear
time (`parse_prompt_editing`). Rendering the pieces per step is `prompt_parser.prompt_schedules`.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")  # a backslash takes the next character along, not a newline
_WHITESPACE = re.compile(r"\s+")
_BLANKS = re.compile(r"\s*")
# lark's common.SIGNED_NUMBER; Python tries the alternatives in this order, as lark's own regex does
_NUMBER = re.compile(r"[+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+)")
_STRAY = "[]():"  # the characters A1111's grammar lets stand for themselves outside any bracket


@dataclass
class Edit:
    """`[before:after:when]`; `before` is empty for `[after:when]`."""

    before: list
    after: list
    when: str  # the number as written: with a "." it is a fraction of the steps


@dataclass
class Alternation:
    options: list[list]


def parse_prompt_editing(prompt: str) -> list | None:
    """The prompt as pieces (text, `Edit`, `Alternation`), or None where it is used literally."""
    # 1. Without "[", "]" and ":" or "|" nothing can take effect, however the prompt parses.
    if "[" not in prompt or "]" not in prompt or (":" not in prompt and "|" not in prompt):
        return None
    # 2. A prompt that is one well-formed whole parses only that way.
    whole = _parse_prompt(prompt, 0, len(prompt))
    if whole is not None:
        return whole
    # 3. Otherwise it splits into prompts and stray characters, as lark resolves the ambiguity.
    segments = _top_level_segments(prompt)
    if segments is None:
        return None
    pieces: list = []
    for start, end, is_prompt in segments:
        pieces.extend(_parse_prompt(prompt, start, end) if is_prompt else [prompt[start:end]])
    return pieces


# -- one well-formed prompt ---------------------------------------------------------------------------
@dataclass
class _Open:
    char: str  # "(", "[", or "" for the prompt itself
    parts: list = field(default_factory=lambda: [[]])  # the pieces between separators
    separators: list = field(default_factory=list)  # (":" or "|", position)


def _parse_prompt(text: str, start: int, end: int) -> list | None:
    """text[start:end] as one prompt of A1111's grammar, or None where it is not one."""
    stack = [_Open("")]
    pos = start
    while pos < end:
        char = text[pos]
        if char in "([":
            stack.append(_Open(char))
        elif char in ":|" and len(stack) > 1:
            stack[-1].parts.append([])
            stack[-1].separators.append((char, pos))
        elif char in ")]" and len(stack) > 1:
            closed = _close(text, stack.pop(), char, pos)
            if closed is None:
                return None
            stack[-1].parts[-1].extend(closed)
        else:
            match = _PLAIN.match(text, pos, end)
            if match is None:  # a stray ":", "|", ")" or "]", or a backslash with nothing to escape
                return None
            stack[-1].parts[-1].append(match.group())
            pos = match.end()
            continue
        pos += 1
    return stack[0].parts[0] if len(stack) == 1 else None


def _close(text: str, bracket: _Open, char: str, pos: int) -> list | None:
    """The pieces of a bracket closed by `char` at `pos`, or None where it is none of the grammar's."""
    kinds = [kind for kind, _ in bracket.separators]
    parts = bracket.parts
    if bracket.char == "(":  # emphasis stays in the text: `(a)`, `(a:b)`
        if char != ")" or "|" in kinds or len(kinds) > 1:
            return None
        return ["(", *parts[0], *([":", *parts[1]] if kinds else []), ")"]
    if char != "]":
        return None
    if not kinds:
        return ["[", *parts[0], "]"]
    if set(kinds) == {"|"}:
        return [Alternation(parts)]
    if set(kinds) != {":"} or len(kinds) > 2:
        return None
    when = _when_number(text, bracket.separators[-1][1] + 1)
    if when is None or when[1] != pos:
        return None
    return [Edit(parts[0] if len(kinds) == 2 else [], parts[-2], when[0])]


def _when_number(text: str, pos: int) -> tuple[str, int] | None:
    """(the number, the position of the "]" after it) where `[blanks] number [blanks] ]` starts at pos."""
    number = _NUMBER.match(text, _BLANKS.match(text, pos).end())
    if number is None:
        return None
    close = _BLANKS.match(text, number.end()).end()
    return (number.group(), close) if text.startswith("]", close) else None


# -- the top level, as lark's Earley parser resolves it ----------------------------------------------------
def _top_level_segments(text: str) -> list[tuple[int, int, bool]] | None:
    """(start, end, is_prompt) pieces of the top level in order, or None where lark finds no parse.

    The top-level rule, `(prompt | stray+)*`, is left-recursive: lark's tree is read from the end. At each
    end it keeps, in this order, the whole prefix as one prompt, the whole prefix as stray characters, a
    prompt ending there (which one makes no difference to the text), or the run of stray characters that
    its Earley sets completed first; `_EarleyOrder` knows that run.
    """
    order = _EarleyOrder(text).run()
    if not order.reached[len(text)]:
        return None
    strays_from_start = len(text) - len(text.lstrip(_STRAY))
    segments = []
    end = len(text)
    while end > 0:
        founder = order.prompts_ending.get(end)
        if founder == 0:
            segments.append((0, end, True))
            break
        if end <= strays_from_start:
            segments.append((0, end, False))
            break
        if founder is not None and order.reached[founder]:
            segments.append((founder, end, True))
            end = founder
            continue
        start = order.first_run.get(end)
        segments.append((start, end, False))
        end = start
    return segments[::-1]


class _Order:
    """Items in the order lark added them to an Earley set; lark takes them back last-in-first-out, so
    the next set receives them reversed. A deque read from either end keeps each step O(1)."""

    def __init__(self, items=(), founder: int | None = None):
        self.items = deque(items)
        self.backwards = False
        self.founder = founder  # the earliest member: where the prompts of a block start

    def __len__(self) -> int:
        return len(self.items)

    def first_taken(self) -> int:
        return self.items[0] if self.backwards else self.items[-1]

    def taken_with(self, item: int | None, at: int | None) -> _Order:
        """The next set's order: this one reversed, with `item` arriving after `at` of them (if any)."""
        self.backwards = not self.backwards
        if item is not None:
            self.items.insert(len(self.items) - at if self.backwards else at, item)
        return self


@dataclass
class _Bracket:
    """An open "(" or "[" that can still close as emphasis, an edit or an alternation."""

    char: str
    waiting: _Order  # the prompts that continue after it closes, in their Earley order at the opener
    phase: str = "first"  # "(": first, second; "[": first, scheduled, alternation, number
    inner_start: int | None = 0  # where the prompt inside it now starts; None while a `when` is read
    number_close: int | None = None  # the "]" that the `when` number read after a colon reaches


@dataclass
class _Column:
    """What lark's Earley set at one position does, in the order it does it."""

    index: int
    expected: dict = field(default_factory=dict)  # char -> stray runs scanned before its bracket items
    runs_added: int = 0  # stray runs that have asked for the next character so far
    completed: bool = False  # the top-level rule reached this position
    predicted: bool = False  # a prompt starts here
    new_run_at: int | None = None
    new_member_at: int | None = None
    members_taken: int = 0

    def expect(self, char: str) -> None:
        self.expected.setdefault(char, self.runs_added)


class _EarleyOrder:
    """Follows lark's Earley sets position by position, keeping only what decides its choice.

    Two kinds of top-level derivation end at each position: prompts (all prompts alive at bracket depth
    0 end together after each element: a "block", founded by the earliest) and runs of stray characters.
    lark completes the items of a set last-in-first-out, so each block and the stray runs are taken back
    in reverse order at every step, and a newcomer is slotted in where the top-level rule first completed.
    That order decides which run lark keeps (`first_run`), and it depends on where each bracket's items
    sit among the runs' (`_Column.expected`), which this class tracks through every bracket.
    """

    def __init__(self, text: str):
        self.text = text
        self.reached = [False] * (len(text) + 1)  # the top-level rule has a derivation ending here
        self.prompts_ending: dict[int, int] = {}  # position -> founder of the block of prompts ending there
        self.first_run: dict[int, int] = {}  # position -> start of the stray run lark completes first there
        self.brackets: list[_Bracket] = []
        self.blocks: dict[int, _Order] = {0: _Order([0], founder=0)}  # prompts awaiting an element there
        self.element_ends: dict[int, int] = {}  # position -> the latest element start whose text ends there
        self.runs = _Order([0])  # stray runs awaiting a stray character at `self.last`
        self.expected = {"(": 1, "[": 1}  # at `self.last`
        self.last = 0
        self.reached[0] = True

    def run(self) -> _EarleyOrder:
        self._schedule_elements(0)
        for index in range(1, len(self.text) + 1):
            char = self.text[index - 1]
            if self.last == index - 1 and char in "[]():|":
                self._single_character(index, char)
            elif index in self.element_ends:
                self._element_end(index, self.element_ends.pop(index))
            elif self.brackets and self.brackets[-1].number_close == index:
                self.runs, self.expected, self.last = _Order(), {"]": 0}, index
        return self

    # 1. Columns -------------------------------------------------------------------------------------------
    def _element_end(self, index: int, start: int) -> None:
        """Plain text or whitespace from `start` ends here: the block that was waiting there completes."""
        column = _Column(index)
        block = self.blocks.pop(start)
        self._take_block(column, block)
        self._finish(column, _Order(), block.taken_with(index if column.predicted else None,
                                                        column.new_member_at))

    def _single_character(self, index: int, char: str) -> None:
        """A bracket, colon or bar: the stray runs and the one bracket item waiting for it, in lark's order."""
        column = _Column(index)
        runs = self.runs if char in _STRAY else _Order()
        ahead = self.expected.get(char)  # runs scanned before the bracket's items
        closing = self._enter(index, char, ahead is not None)
        if runs:
            self.first_run[index] = runs.first_taken()
        after = len(runs) - (ahead if ahead is not None else len(runs))
        self._take_runs(column, after)
        block = None
        if closing is not None:
            self._take_block(column, closing.waiting)
            block = closing.waiting.taken_with(index if column.predicted else None, column.new_member_at)
        elif ahead is not None and not column.predicted and self._inner_starts_here(index):
            self._predict(column)
        if char == "|" and ahead is not None:
            column.expect("]")  # an empty last option, `[a|]`
            column.expect("|")
        self._take_runs(column, len(runs) - after)
        if block is None and column.predicted:
            block = _Order([index], founder=index)
        new_runs = runs.taken_with(index, column.new_run_at) if column.completed else runs.taken_with(None, None)
        self._finish(column, new_runs, block)
