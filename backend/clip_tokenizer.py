"""CLIP BPE tokenizers built offline from the vocabulary that the open_clip package ships.

SD 1.x, SD 2.x and SDXL all use OpenAI's CLIP BPE (49408 tokens, BOS 49406, EOS 49407). The
vocabulary is converted once from `open_clip/bpe_simple_vocab_16e6.txt.gz` into the standard
`vocab.json` + `merges.txt` pair and cached, so no hub download is ever needed.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
import tempfile
from functools import lru_cache
from pathlib import Path

from backend.errors import UnavailableError

logger = logging.getLogger(__name__)

BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
VOCAB_SIZE = 49408
_NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # byte tokens, byte tokens with </w>, BOS and EOS

# SD 1.x pads with the end-of-text token; OpenCLIP models (SD 2.x, SDXL's second encoder) pad with "!".
PAD_END_OF_TEXT = "<|endoftext|>"
PAD_EXCLAMATION = "!"


class TokenizerUnavailableError(UnavailableError):
    pass


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character table of GPT-2 / CLIP BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def find_bpe_vocabulary() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerUnavailableError(
            "the CLIP vocabulary comes from the open-clip-torch package, which is not installed; "
            "run `pip install -r requirements.txt`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise TokenizerUnavailableError(f"{path} is missing; reinstall open-clip-torch")
    return path


def convert_bpe_vocabulary(gz_path: Path) -> tuple[dict[str, int], list[str]]:
    """Turn open_clip's gzipped merge list into the vocab dict and merge lines of CLIP's tokenizer."""
    lines = gzip.open(gz_path, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : _NUM_MERGES + 1]  # the first line is a version header
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != VOCAB_SIZE:
        raise TokenizerUnavailableError(f"{gz_path} gave {len(tokens)} tokens, expected {VOCAB_SIZE}")
    return {token: index for index, token in enumerate(tokens)}, merges


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def ensure_vocabulary_files(cache_dir: Path) -> Path:
    """Return a folder holding `vocab.json` and `merges.txt`, converting them on first use."""
    folder = Path(cache_dir) / "clip-bpe"
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if vocab_file.is_file() and merges_file.is_file():
        return folder
    logger.info("Building the CLIP tokenizer vocabulary in %s", folder)
    vocab, merges = convert_bpe_vocabulary(find_bpe_vocabulary())
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(merges_file, "#version: 0.2\n" + "\n".join(merges) + "\n")
    _write_atomic(vocab_file, json.dumps(vocab, ensure_ascii=False))
    return folder


@lru_cache(maxsize=4)
def load_clip_tokenizer(cache_dir: str, pad_token: str = PAD_END_OF_TEXT, max_length: int = 77):
    """A `transformers.CLIPTokenizer` with SD's ids, built without any network access."""
    from transformers import CLIPTokenizer

    folder = ensure_vocabulary_files(Path(cache_dir))
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split()) for line in merges if line]
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=max_length)
