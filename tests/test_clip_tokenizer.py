"""The offline CLIP tokenizer built from open_clip's BPE vocabulary."""

import json

from backend import clip_tokenizer


def test_vocabulary_conversion(tmp_path):
    folder = clip_tokenizer.ensure_vocabulary_files(tmp_path)
    vocab = json.loads((folder / "vocab.json").read_text())
    merges = (folder / "merges.txt").read_text().splitlines()
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["a</w>"] == 256 + ord("a") - ord("!")
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894


def test_sd_token_ids(tmp_path):
    tokenizer = clip_tokenizer.load_clip_tokenizer(str(tmp_path))
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("A Photo  of a CAT").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("masterpiece, (best quality:1.2)", add_special_tokens=False).input_ids[:2] == [12066, 267]


def test_conversion_is_cached(tmp_path):
    folder = clip_tokenizer.ensure_vocabulary_files(tmp_path)
    stamp = (folder / "vocab.json").stat().st_mtime_ns
    clip_tokenizer.ensure_vocabulary_files(tmp_path)
    assert (folder / "vocab.json").stat().st_mtime_ns == stamp


def test_pad_tokens(tmp_path):
    assert clip_tokenizer.load_clip_tokenizer(str(tmp_path)).pad_token_id == 49407
    assert clip_tokenizer.load_clip_tokenizer(str(tmp_path), clip_tokenizer.PAD_EXCLAMATION).pad_token_id == 0
