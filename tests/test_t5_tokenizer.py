"""T5 v1.1's tokenizer taken from a wheel on the package index: files checked against pinned sha256s,
written all or none, then loaded offline. Tests build a small T5-style tokenizer and a wheel holding it
(nothing is fetched)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from backend import t5_tokenizer
from backend.t5_tokenizer import T5TokenizerUnavailableError

TEXT = ["a large red star on a blue background", "a small green circle, top left", "yellow square on purple",
        "an orange cross in the center", "white diamond on black"] * 20


def tiny_tokenizer_files() -> dict[str, bytes]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.train_from_iterator(TEXT, trainers.UnigramTrainer(vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"],
                                                                unk_token="<unk>"))
    config = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "extra_ids": 0,
              "model_max_length": 512, "tokenizer_class": "T5Tokenizer"}
    return {"tokenizer.json": tokenizer.to_str().encode(), "tokenizer_config.json": json.dumps(config).encode(),
            "special_tokens_map.json": json.dumps({k: config[k] for k in ("eos_token", "pad_token", "unk_token")}).encode(),
            "spiece.model": b"a sentencepiece model"}


def wheel_with(files: dict[str, bytes], path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(t5_tokenizer.INSIDE_WHEEL + name, data)
        archive.writestr("diffsynth/__init__.py", "")
    return path


def pins(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def test_the_pins_name_the_four_files_of_the_real_tokenizer():
    assert set(t5_tokenizer.FILES) == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                       "spiece.model"}
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in [*t5_tokenizer.FILES.values(), t5_tokenizer.WHEEL_SHA256])


def test_files_from_the_wheel_are_checked_written_and_load(tmp_path):
    files = tiny_tokenizer_files()
    wheel = wheel_with(files, tmp_path / t5_tokenizer.WHEEL_FILE)
    folder = t5_tokenizer.extract_from_wheel(wheel, tmp_path / "cache" / "t5-v1_1", pins(files), wheel_sha256=None)
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)
    assert (folder / "tokenizer.json").read_bytes() == files["tokenizer.json"]
    tokenizer = t5_tokenizer.load_t5_tokenizer(tmp_path / "cache", allow_fetch=False)  # offline from now on
    ids = tokenizer("a red star").input_ids
    assert ids[-1] == tokenizer.eos_token_id == 1 and tokenizer.pad_token_id == 0 and len(ids) > 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red star"


def test_a_file_that_differs_from_its_pin_is_never_written(tmp_path):
    files = tiny_tokenizer_files()
    expected = pins(files)
    files["tokenizer.json"] += b" "  # one byte more
    wheel = wheel_with(files, tmp_path / "w.whl")
    with pytest.raises(T5TokenizerUnavailableError, match="tokenizer.json differ from the pinned sha256"):
        t5_tokenizer.extract_from_wheel(wheel, tmp_path / "out", expected, wheel_sha256=None)
    assert not (tmp_path / "out").exists()
    with pytest.raises(T5TokenizerUnavailableError, match="not the pinned diffsynth==1.1.9 wheel"):
        t5_tokenizer.extract_from_wheel(wheel, tmp_path / "out", expected)


def test_fetching_on_first_use_and_the_offline_error(tmp_path, monkeypatch):
    files = tiny_tokenizer_files()
    monkeypatch.setattr(t5_tokenizer, "FILES", pins(files))
    fetched = []

    def fetch(into: Path) -> Path:
        fetched.append(into)
        return wheel_with(files, into / t5_tokenizer.WHEEL_FILE)

    with pytest.raises(T5TokenizerUnavailableError) as refused:
        t5_tokenizer.ensure_files(tmp_path / "cache", allow_fetch=False, fetch=fetch)
    message = str(refused.value)
    assert str(tmp_path / "cache" / "t5-v1_1") in message and "pip download diffsynth==1.1.9 --no-deps" in message
    assert "--no-download" in message and fetched == []
    monkeypatch.setattr(t5_tokenizer, "WHEEL_SHA256", None)
    monkeypatch.setattr(t5_tokenizer.extract_from_wheel, "__defaults__", (pins(files), None, t5_tokenizer.INSIDE_WHEEL))
    folder = t5_tokenizer.ensure_files(tmp_path / "cache", fetch=fetch)
    assert len(fetched) == 1 and (folder / "spiece.model").read_bytes() == b"a sentencepiece model"
    t5_tokenizer.ensure_files(tmp_path / "cache", fetch=fetch)
    assert len(fetched) == 1  # cached: fetched once


def test_a_failed_download_says_what_to_do(tmp_path, monkeypatch):
    def fail(into: Path) -> Path:
        raise T5TokenizerUnavailableError("`pip download diffsynth==1.1.9` failed: no network")

    with pytest.raises(T5TokenizerUnavailableError, match="could not be fetched: `pip download diffsynth==1.1.9` "
                                                          "failed: no network. Try again where the package index"):
        t5_tokenizer.ensure_files(tmp_path / "cache", fetch=fail)
