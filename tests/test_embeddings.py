"""Textual inversion: A1111 .pt, .safetensors (emb_params, SDXL clip_l/clip_g), their place in chunks,
and their effect on generation only where their name appears."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from safetensors.torch import save_file

from backend import conditioning
from backend.generation import generate
from backend.infotext import parse_infotext
from backend.model_manager import ModelManager
from backend.request import GenerationRequest
from tests.conftest import install


def token_rows(model, encoder_index: int, text: str) -> torch.Tensor:
    """The input embeddings of `text`'s tokens: an embedding made of them must encode like the text."""
    ids = model.tokenizers[encoder_index](text, add_special_tokens=False).input_ids
    return model.text_encoders[encoder_index].get_input_embeddings().weight[ids].detach().clone()


def save_a1111_pt(path, vectors: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.clone().requires_grad_(False)},
                "name": path.stem, "step": 1200, "sd_checkpoint": "0123456789", "sd_checkpoint_name": "base"}, path)


def pair_encoding(model, manager, prompt: str) -> conditioning.PromptEmbedding:
    manager.embeddings.refresh()
    return conditioning.encode_prompt(model, prompt, embeddings=manager.embeddings.for_model(model))


def test_an_embedding_of_word_vectors_encodes_exactly_like_the_words(sd1_manager):
    model = sd1_manager.activate()
    folder = sd1_manager.settings.model_dir("embeddings")
    save_a1111_pt(folder / "redstar.pt", token_rows(model, 0, "red star"))
    (folder / "sub").mkdir()
    save_file({"emb_params": token_rows(model, 0, "blue")}, folder / "sub" / "Bluish.safetensors")
    with_embedding = pair_encoding(model, sd1_manager, "a redstar on a bluish background")
    with_words = conditioning.encode_prompt(model, "a red star on a blue background")
    assert torch.equal(with_embedding.context, with_words.context)
    # Matched as a whole word only, case-insensitively, and not inside other words.
    assert torch.equal(pair_encoding(model, sd1_manager, "a REDSTAR").context,
                       conditioning.encode_prompt(model, "a red star").context)
    assert torch.equal(pair_encoding(model, sd1_manager, "a redstars").context,
                       conditioning.encode_prompt(model, "a redstars").context)


def test_attention_weights_apply_to_an_embeddings_vectors(sd1_manager):
    model = sd1_manager.activate()
    save_a1111_pt(sd1_manager.settings.model_dir("embeddings") / "redstar.pt", token_rows(model, 0, "red star"))
    embeddings = sd1_manager.embeddings.for_model(model)
    chunks, count = conditioning.chunk_prompt(model.tokenizers[0], "a (redstar:1.5)",
                                              vocabulary=embeddings.per_encoder[0])
    assert count == 3
    assert chunks[0].tokens[2:4] == [conditioning.EMBEDDING_PLACEHOLDER] * 2
    assert chunks[0].weights[1:4] == [1.0, 1.5, 1.5]
    assert [(position, len(vectors)) for position, vectors in chunks[0].fixes] == [(2, 2)]
    weighted = pair_encoding(model, sd1_manager, "a (redstar:1.5)")
    assert torch.equal(weighted.context, conditioning.encode_prompt(model, "a (red star:1.5)").context)


def test_an_embedding_is_never_split_across_chunks(sd1_manager):
    model = sd1_manager.activate()
    save_a1111_pt(sd1_manager.settings.model_dir("embeddings") / "trio.pt", torch.randn(3, 32))
    vocabulary = sd1_manager.embeddings.for_model(model).per_encoder[0]
    chunks, count = conditioning.chunk_prompt(model.tokenizers[0], "a " * 74 + "trio", vocabulary=vocabulary)
    assert len(chunks) == 2
    assert chunks[0].fixes == [] and chunks[0].tokens[75] == model.tokenizers[0].eos_token_id
    assert [(position, len(vectors)) for position, vectors in chunks[1].fixes] == [(1, 3)]
    assert count == 75 + 3


def test_embedding_changes_the_image_only_when_named_and_is_recorded(sd1_manager):
    sd1_manager.activate()

    def image(prompt: str):
        result = generate(sd1_manager, GenerationRequest(prompt=prompt, negative_prompt="blurry", steps=3, seed=3,
                                                         width=64, height=64, save_images=False))
        return np.array(result.images[0].image), result.images[0].infotext

    plain, _ = image("a red star")
    literal, _ = image("a glowing star")
    path = sd1_manager.settings.model_dir("embeddings") / "glowing.pt"
    save_a1111_pt(path, torch.randn(2, 32, generator=torch.Generator().manual_seed(1)))
    sd1_manager.refresh()
    again, infotext = image("a red star")
    assert np.array_equal(again, plain) and "TI hashes" not in infotext
    named, infotext = image("a glowing star")
    assert not np.array_equal(named, literal)
    assert parse_infotext(infotext)["TI hashes"] == f"glowing: {hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
    result = generate(sd1_manager, GenerationRequest(prompt="a red star", negative_prompt="glowing", steps=3, seed=3,
                                                     width=64, height=64, save_images=False))
    assert not np.array_equal(np.array(result.images[0].image), plain)
    assert "glowing: " in parse_infotext(result.images[0].infotext)["TI hashes"]


def test_sdxl_embeddings_with_clip_l_and_clip_g(settings, model_files):
    install(settings, model_files["sdxl"])
    manager = ModelManager(settings)
    model = manager.activate()
    folder = settings.model_dir("embeddings")
    folder.mkdir(parents=True)
    save_file({"clip_l": token_rows(model, 0, "red star"), "clip_g": token_rows(model, 1, "red star")},
              folder / "xlstar.safetensors")
    save_file({"emb_params": torch.randn(2, 32)}, folder / "sd1only.safetensors")
    (folder / "damaged.pt").write_bytes(b"not a pickle")
    embeddings = manager.embeddings.for_model(model)
    assert embeddings.skipped == ["sd1only"]
    assert "damaged" in manager.embeddings.errors
    encoded = conditioning.encode_prompt(model, "a xlstar", embeddings=embeddings)
    words = conditioning.encode_prompt(model, "a red star")
    assert torch.equal(encoded.context, words.context) and torch.equal(encoded.pooled, words.pooled)
    # The SD 1.x embedding's name stays plain text on SDXL.
    assert torch.equal(conditioning.encode_prompt(model, "a sd1only", embeddings=embeddings).context,
                       conditioning.encode_prompt(model, "a sd1only").context)


def test_the_embedding_set_is_reused_until_a_file_changes(sd1_manager):
    library, model = sd1_manager.embeddings, sd1_manager.activate()
    folder = library.folder
    folder.mkdir(parents=True, exist_ok=True)
    width = model.text_encoders[0].get_input_embeddings().embedding_dim
    torch.save({"string_to_param": {"*": torch.ones(2, width)}}, folder / "twovec.pt")
    first = library.for_model(model)
    assert library.for_model(model) is first and "twovec" in first.embeddings
    torch.save({"string_to_param": {"*": torch.ones(3, width)}}, folder / "threevec.pt")
    second = library.for_model(model)
    assert second is not first and {"twovec", "threevec"} <= set(second.embeddings)
    (folder / "twovec.pt").unlink()
    assert "twovec" not in library.for_model(model).embeddings
