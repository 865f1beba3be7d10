"""Wildcards and variants in prompts, through the `dynamicprompts` library (what A1111's Dynamic
Prompts extension uses): `__color__` picks a line of `wildcards/color.txt`, `__dir/name__` reads
subfolders, `{a|b}`, `{2$$a|b|c}` and `{0.5::a|1::b}` pick variants; wildcard files may nest both.

Expansion is seeded: the same seed gives the same text. A1111's own syntax (`[a|b]`, `(x:1.2)`,
`<lora:...>`) passes through untouched. A missing wildcard stays as written and is reported; a
wildcard that refers back to itself is refused with the chain that loops.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from backend.errors import InputError

_REFERENCE = re.compile(r"__([^\s_][^\s]*?)__")
MAX_DEPTH = 20


class WildcardError(InputError):
    """A wildcard cannot be expanded (a cycle, or nesting too deep); the message names the files."""


@dataclass
class Expansion:
    text: str
    warnings: list[str] = field(default_factory=list)


@dataclass
class WildcardFile:
    name: str  # as written between the underscores: "color", "dir/name"
    path: Path
    lines: int


class Wildcards:
    def __init__(self, folder: Path):
        from dynamicprompts.wildcards import WildcardManager

        self.folder = Path(folder)
        self._manager = WildcardManager(self.folder)

    def refresh(self) -> None:
        self._manager.clear_cache()

    def files(self) -> list[WildcardFile]:
        """Every wildcard file (for the UI's browser), sorted by name."""
        found = []
        if self.folder.is_dir():
            for path in sorted(self.folder.rglob("*.txt")):
                name = path.relative_to(self.folder).with_suffix("").as_posix()
                lines = sum(1 for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                            if line.strip() and not line.lstrip().startswith("#"))
                found.append(WildcardFile(name, path, lines))
        return found

    def _values(self, name: str) -> list[str]:
        return [str(v) for v in self._manager.get_values(name)]

    def _check(self, text: str, chain: tuple[str, ...], missing: set[str]) -> None:
        """Walk the wildcard references depth first: cycles and runaway nesting are errors."""
        for name in _REFERENCE.findall(text):
            if name in chain:
                loop = " -> ".join(f"__{n}__" for n in (*chain[chain.index(name):], name))
                raise WildcardError(f"wildcard cycle {loop}; edit {self.folder / (name + '.txt')} so it stops "
                                    "referring back")
            if len(chain) >= MAX_DEPTH:
                raise WildcardError(f"wildcards nest deeper than {MAX_DEPTH} levels at __{name}__")
            values = self._values(name)
            if not values:
                missing.add(name)
                continue
            for value in values:
                self._check(value, (*chain, name), missing)

    def expand(self, text: str, seed: int) -> Expansion:
        """`text` with its wildcards and variants resolved, the same for the same seed."""
        if "__" not in text and "{" not in text:
            return Expansion(text)
        from dynamicprompts.generators import RandomPromptGenerator

        missing: set[str] = set()
        self._check(text, (), missing)
        generator = RandomPromptGenerator(wildcard_manager=self._manager, seed=seed)
        try:
            expanded = str(generator.generate(text, 1)[0])
        except RecursionError as exc:
            raise WildcardError(f"wildcards in {text!r} nest too deeply") from exc
        except Exception as exc:  # the library's parse errors: keep the text, say why
            return Expansion(text, [f"could not expand wildcards/variants in {text!r} ({exc}); used as written"])
        warnings = [f"wildcard __{name}__ not found in {self.folder}; left as written" for name in sorted(missing)]
        return Expansion(expanded, warnings)
