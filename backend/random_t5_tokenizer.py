"""A small T5-style tokenizer trained here (a unigram model over metaspace pieces, T5's special tokens at T5's
ids), written where `backend.t5_tokenizer` looks for T5 v1.1's, so tests run FLUX.1 and SD 3.5 offline."""

from __future__ import annotations

import json
from pathlib import Path

from backend import t5_tokenizer

SPECIAL = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2, as in T5
CORPUS = [
    "a photo of a cat sitting on a red chair", "a painting of a mountain lake at sunset, highly detailed",
    "portrait of an old man with a beard, studio lighting", "a blue car parked in front of a house",
    "green trees, white clouds and a small boat on the river", "masterpiece, best quality, 4k, sharp focus",
    "low quality, blurry, watermark, text", "an astronaut riding a horse on the moon",
]


def write_t5_tokenizer(cache_dir: Path, vocab_size: int = 300) -> Path:
    """Train and write the tokenizer's four files into `cache_dir`'s T5 folder; returns the folder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, unk_token="<unk>")
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    folder = t5_tokenizer.tokenizer_folder(Path(cache_dir))
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
              "extra_ids": 0, "model_max_length": 512}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps({k: config[k] for k in ("eos_token", "pad_token",
                                                                                        "unk_token")}))
    (folder / "spiece.model").write_bytes(b"")  # the fast tokenizer reads tokenizer.json only
    return folder
