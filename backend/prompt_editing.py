"""Which `[from:to:when]`, `[to:when]`, `[from::when]` and `[a|b]` of a prompt take effect, as A1111 decides.

A1111 parses them with lark's Earley parser on a grammar where a bracket or colon that starts nothing stands
for itself; where a prompt parses several ways, lark's choice is what this module reproduces, in linear
time (`parse_prompt_editing`): lark >= 1.1.8's choice, which is stable (lark 1.1.2, which A1111 pins, breaks
those ties by hash order, so there A1111's answer varies from run to run). Rendering is `prompt_parser`'s.
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
    """The prompt as pieces, or None where it is used literally. A piece is text, an `Edit`, an
    `Alternation` or a list of pieces (what an emphasis bracket holds, kept as a group so that deep
    nesting costs no copying)."""
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
        return ["(", parts[0], ":", parts[1], ")"] if kinds else ["(", parts[0], ")"]
    if char != "]":
        return None
    if not kinds:
        return ["[", parts[0], "]"]
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
    inner_start: int | None  # where the prompt inside it now starts; None while a `when` is read
    phase: str = "first"  # "(": first, second; "[": first, scheduled, alternation, number
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
    """Follows lark's Earley sets position by position, keeping only what decides lark's choice.

    Two kinds of derivation of the top-level rule end at a position: prompts and runs of stray characters.
    A prompt starts wherever the top-level rule has reached (and inside each bracket); the prompts alive at
    the same bracket depth end together after each element, so they move as one "block", founded by the
    earliest. lark completes the items of an Earley set last-in-first-out: a block and the set of stray
    runs are taken back in reverse order at every step, and the newcomer of a step (a new prompt, a new
    run) is slotted in where the top-level rule first completed in it. That order is what lark's forest
    lists first (`first_run`). It depends on whether a bracket's closer, colon or opener was asked for
    before or after each stray run (`_Column.expected`), which is why every bracket is followed.

    Only a block's founder can be a prompt the top-level rule never reached (one that starts after "|"
    or after a bracket that is not a stray), and such a founder is alone in its block: nothing inside that
    bracket is reachable from the top level either.

    Checked, item order for item order, against lark's own Earley sets on random prompts; the tests
    compare the results with lark.
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
        runs = _Order().taken_with(index if column.completed else None, column.new_run_at)
        self._finish(column, runs, block.taken_with(index if column.predicted else None, column.new_member_at))

    def _single_character(self, index: int, char: str) -> None:
        """A bracket, colon or bar: the stray runs and the one bracket item waiting for it, in lark's order."""
        column = _Column(index)
        runs = self.runs if char in _STRAY else _Order()
        ahead = self.expected.get(char)  # how many runs were scanned before the bracket's items
        closing = self._enter(index, char, ahead is not None)
        if runs:
            self.first_run[index] = runs.first_taken()
        taken_first = len(runs) - min(ahead, len(runs)) if ahead is not None else len(runs)
        self._take_runs(column, taken_first)
        block = None
        if closing is not None:
            self._take_block(column, closing.waiting)
            block = closing.waiting.taken_with(index if column.predicted else None, column.new_member_at)
        elif ahead is not None:
            if char == "|":
                column.expect("]")  # an empty last option, `[a|]`
                column.expect("|")
            if not column.predicted and self._inner_starts_here(index):
                self._predict(column)
        self._take_runs(column, len(runs) - taken_first)
        if block is None and column.predicted:
            block = _Order([index], founder=index)
        self._finish(column, runs.taken_with(index if column.completed else None, column.new_run_at), block)

    def _enter(self, index: int, char: str, expected: bool) -> _Bracket | None:
        """Open, advance or close the innermost bracket on `char`; the bracket that closes, if one does."""
        if not expected:
            self.brackets.clear()  # the innermost bracket cannot take it: every open bracket is dead
            return None
        if char in "([":
            self.brackets.append(_Bracket(char, self.blocks.pop(index - 1), index))
            return None
        if char in ")]":
            return self.brackets.pop()
        bracket = self.brackets[-1]
        if char == "|":
            bracket.phase, bracket.inner_start = "alternation", index
        elif bracket.char == "(":
            bracket.phase, bracket.inner_start = "second", index
        elif bracket.phase == "first":  # `[a:` goes on as `[a:b:when]`, and as `[a:when]` if a number follows
            bracket.phase, bracket.inner_start = "scheduled", index
            bracket.number_close = self._number_close(index)
        else:  # `[a:b:` reads its `when`
            bracket.phase, bracket.inner_start = "number", None
            bracket.number_close = self._number_close(index)
            if bracket.number_close is None:
                self.brackets.clear()
        return None

    def _finish(self, column: _Column, runs: _Order, block: _Order | None) -> None:
        index = column.index
        if self.brackets and self.brackets[-1].number_close == index:
            column.expected["]"] = 0  # scanned straight after the number, before this set's own items
        self.runs, self.expected, self.last = runs, column.expected, index
        if block:
            self.blocks[index] = block
            self._schedule_elements(index)

    # 2. What one Earley item does when lark takes it ----------------------------------------------------
    def _take_runs(self, column: _Column, count: int) -> None:
        """`count` stray runs complete here one after the other; each asks for the next character."""
        if count:
            column.runs_added += 1
            if not column.completed:
                self._complete(column)
            column.runs_added += count - 1

    def _take_block(self, column: _Column, block: _Order) -> None:
        """The prompts of `block` complete here, in reverse order. Only the first does anything beyond
        asking for its next element: it predicts what may follow, and if it is a top-level prompt, the
        top-level rule completes, which brings a new stray run and a new prompt. The prompt inside the
        innermost bracket (the block's founder) lets that bracket ask for its closer or separator."""
        first = block.first_taken()
        self.prompts_ending[column.index] = block.founder
        column.expect("[")
        column.expect("(")
        inner = self.brackets[-1] if self.brackets and self.brackets[-1].inner_start is not None else None
        column.members_taken = 1
        if inner is not None and inner.inner_start == first:
            self._inner_prompt_done(column, inner)
            inner = None
        if self.reached[first] and not column.completed:
            self._complete(column)
        if inner is not None:
            self._inner_prompt_done(column, inner)
        column.members_taken = len(block)

    def _complete(self, column: _Column) -> None:
        """The top-level rule reaches this position for the first time."""
        column.completed = True
        self.reached[column.index] = True
        column.new_run_at = column.runs_added
        column.runs_added += 1
        if not column.predicted:
            self._predict(column)

    def _predict(self, column: _Column) -> None:
        """A prompt starts here: it expects brackets, and an inner prompt may already be complete (empty)."""
        column.predicted = True
        column.new_member_at = column.members_taken
        column.expect("(")
        column.expect("[")
        if self._inner_starts_here(column.index):
            self._inner_prompt_done(column, self.brackets[-1])

    @staticmethod
    def _inner_prompt_done(column: _Column, bracket: _Bracket) -> None:
        """The prompt inside `bracket` is complete: the bracket expects what may follow it."""
        if bracket.char == "(":
            column.expect(")")
            if bracket.phase == "first":
                column.expect(":")
        elif bracket.phase == "first":
            column.expect("]")
            column.expect(":")
            column.expect("|")
        elif bracket.phase == "scheduled":
            column.expect(":")
        else:
            column.expect("]")
            column.expect("|")

    # 3. Helpers -------------------------------------------------------------------------------------------
    def _inner_starts_here(self, index: int) -> bool:
        return bool(self.brackets) and self.brackets[-1].inner_start == index

    def _number_close(self, index: int) -> int | None:
        when = _when_number(self.text, index)
        return when[1] if when else None

    def _schedule_elements(self, start: int) -> None:
        """The block at `start` waits for plain text and, where it starts with blanks, whitespace."""
        for pattern in (_WHITESPACE, _PLAIN):
            match = pattern.match(self.text, start)
            if match:
                self.element_ends[match.end()] = max(self.element_ends.get(match.end(), start), start)
