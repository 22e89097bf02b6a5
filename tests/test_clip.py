"""Chinese CLIP model: the model cards' similarity for both text-head styles, encode, save/load, export,
pickled weights, feature-size mismatch, zero-shot and retrieval — on tiny random checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from taiyi.clip import ChineseCLIP, load_clip
from taiyi.errors import InvalidInputError, ModelLoadError
from taiyi.prompts import normalize_prompt
from taiyi.testing import make_tiny_clip_image_tower, make_tiny_taiyi_clip_text

TEXTS = ["一只猫", "小桥流水人家，水墨", "海边的日落，油画风格", "狗"]  # unchanged by prompt normalisation


def noise_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.RandomState(seed)
    sizes = [(40, 48), (32, 32), (64, 40), (50, 50), (36, 60)]
    return [Image.fromarray(rng.randint(0, 256, (*sizes[i % 5], 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip-towers")
    return {
        "image": make_tiny_clip_image_tower(root / "image", dim=16),
        "image24": make_tiny_clip_image_tower(root / "image24", dim=24),
        "logits": make_tiny_taiyi_clip_text(root / "logits", head="logits", dim=16),
        "pooler": make_tiny_taiyi_clip_text(root / "pooler", head="pooler", dim=16),
        "pickled": make_tiny_taiyi_clip_text(root / "pickled", head="logits", dim=16, safe_serialization=False),
    }


@pytest.fixture(scope="module")
def clip_logits(towers) -> ChineseCLIP:
    return load_clip(towers["logits"], image_tower=towers["image"], device="cpu")


def model_card_similarity(text_folder, image_folder, head: str, images, text: str) -> torch.Tensor:
    """The Taiyi-CLIP model cards' computation, with transformers only: (n_images,) for one text."""
    from transformers import BertForSequenceClassification, BertModel, BertTokenizer, CLIPImageProcessor, CLIPModel

    tokenizer = BertTokenizer.from_pretrained(text_folder)
    text_encoder = (BertForSequenceClassification if head == "logits" else BertModel).from_pretrained(text_folder)
    clip_model = CLIPModel.from_pretrained(image_folder)
    processor = CLIPImageProcessor.from_pretrained(image_folder)
    text_encoder.eval(), clip_model.eval()
    with torch.no_grad():
        ids = tokenizer([text], return_tensors="pt", padding=True)["input_ids"]
        out = text_encoder(ids)
        text_features = out.logits if head == "logits" else out[1]
        image_features = clip_model.get_image_features(**processor(images=images, return_tensors="pt"))
        if not isinstance(image_features, torch.Tensor):  # transformers 5 returns the output object
            image_features = image_features.pooler_output
        image_features = image_features / image_features.norm(dim=1, keepdim=True)
        text_features = text_features / text_features.norm(dim=1, keepdim=True)
        return (clip_model.logit_scale.exp() * image_features @ text_features.t())[:, 0]


@pytest.mark.parametrize("head", ["logits", "pooler"])
def test_similarity_matches_the_model_card(towers, head):
    model = load_clip(towers[head], image_tower=towers["image"], device="cpu")
    assert model.text_head == head
    images = noise_images(3)
    ours = model.similarity(images, TEXTS)  # (3, T), texts batched with padding
    assert ours.shape == (3, len(TEXTS))
    for j, text in enumerate(TEXTS):
        assert normalize_prompt(text) == text
        reference = model_card_similarity(towers[head], towers["image"], head, images, text)
        torch.testing.assert_close(ours[:, j], reference, atol=1e-5, rtol=0)
    # Similarity is the cosine times the image CLIP model's logit scale.
    cosine = model.encode_image(images) @ model.encode_text(TEXTS).T
    torch.testing.assert_close(ours, model.scale() * cosine, atol=1e-6, rtol=0)


def test_encodings_are_unit_norm_and_batch_equals_singles(clip_logits):
    images = noise_images(5)
    image_embeds = clip_logits.encode_image(images, batch_size=2)  # (5, 16)
    text_embeds = clip_logits.encode_text(TEXTS, batch_size=3)  # (4, 16)
    assert image_embeds.shape == (5, 16) and text_embeds.shape == (4, 16)
    assert image_embeds.dtype == text_embeds.dtype == torch.float32
    torch.testing.assert_close(image_embeds.norm(dim=-1), torch.ones(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(text_embeds.norm(dim=-1), torch.ones(4), atol=1e-6, rtol=0)
    singles_i = torch.cat([clip_logits.encode_image(im) for im in images])
    singles_t = torch.cat([clip_logits.encode_text(t) for t in TEXTS])
    torch.testing.assert_close(image_embeds, singles_i, atol=1e-5, rtol=0)
    torch.testing.assert_close(text_embeds, singles_t, atol=1e-5, rtol=0)


def test_save_pretrained_loads_back_without_flags(clip_logits, towers, tmp_path):
    out = clip_logits.save_pretrained(tmp_path / "own")
    assert not list(out.rglob("*.bin")) and list(out.rglob("*.safetensors"))
    for loaded in (ChineseCLIP.from_pretrained(out), load_clip(out)):
        loaded = loaded.to("cpu")
        assert loaded.text_head == "logits" and loaded.scale() == pytest.approx(clip_logits.scale())
        torch.testing.assert_close(loaded.encode_text(TEXTS), clip_logits.encode_text(TEXTS), atol=0, rtol=0)
        images = noise_images(2)
        torch.testing.assert_close(loaded.encode_image(images), clip_logits.encode_image(images), atol=0, rtol=0)
    with pytest.raises(InvalidInputError, match="drop --image-tower"):  # it would be silently ignored
        load_clip(out, image_tower=towers["image"])
    pooler = load_clip(towers["pooler"], image_tower=towers["image"], device="cpu")
    again = load_clip(pooler.save_pretrained(tmp_path / "own-pooler"), device="cpu")
    assert again.text_head == "pooler"
    torch.testing.assert_close(again.encode_text(TEXTS), pooler.encode_text(TEXTS), atol=0, rtol=0)


def test_export_taiyi_round_trip(clip_logits, towers, tmp_path):
    from transformers import BertForSequenceClassification

    exported = clip_logits.export_taiyi(tmp_path / "taiyi-layout")
    assert (exported / "vocab.txt").is_file() and (exported / "config.json").is_file()
    assert isinstance(BertForSequenceClassification.from_pretrained(exported), BertForSequenceClassification)
    back = ChineseCLIP.from_taiyi(exported, towers["image"], device="cpu")
    torch.testing.assert_close(back.encode_text(TEXTS), clip_logits.encode_text(TEXTS), atol=0, rtol=0)


def test_pickled_text_tower_needs_allow_pickle(towers, clip_logits):
    with pytest.raises(ModelLoadError, match="allow-pickle"):
        load_clip(towers["pickled"], image_tower=towers["image"], device="cpu")
    model = load_clip(towers["pickled"], image_tower=towers["image"], allow_pickle=True, device="cpu")
    # Same seed as the safetensors tower: same weights, same embeddings.
    torch.testing.assert_close(model.encode_text(TEXTS), clip_logits.encode_text(TEXTS), atol=0, rtol=0)


def test_feature_size_mismatch_is_refused(towers):
    with pytest.raises(ModelLoadError, match="16-d features but the image tower 24-d"):
        load_clip(towers["logits"], image_tower=towers["image24"], device="cpu")


def test_zero_shot_probabilities(clip_logits):
    images = noise_images(3)
    probs = clip_logits.zero_shot(images, ["猫", "狗", "鸟"])
    assert probs.shape == (3, 3) and bool((probs >= 0).all())
    torch.testing.assert_close(probs.sum(-1), torch.ones(3), atol=1e-6, rtol=0)
    custom = clip_logits.zero_shot(images, ["猫", "狗"], templates=["一张{}的照片。"])
    labels = clip_logits.encode_text(["一张猫的照片。", "一张狗的照片。"])
    expected = (clip_logits.scale() * clip_logits.encode_image(images) @ labels.T).softmax(-1)
    torch.testing.assert_close(custom, expected, atol=1e-6, rtol=0)


def test_retrieve_ranks_a_gallery(clip_logits):
    generator = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(20, 16, generator=generator), dim=-1)
    query_image = noise_images(1)[0]
    gallery[7] = clip_logits.encode_image(query_image)[0]
    gallery[12] = clip_logits.encode_text("一只猫")[0]
    rows, scores = clip_logits.retrieve(query_image, gallery, k=3)
    assert rows[0] == 7 and scores[0] == pytest.approx(1.0, abs=1e-5)
    assert scores == sorted(scores, reverse=True) and len(rows) == 3
    assert clip_logits.retrieve("一只猫", gallery, k=1)[0] == [12]
    rows, _ = clip_logits.retrieve(gallery[3], gallery, k=50)  # k past the gallery size: all rows
    assert rows[0] == 3 and sorted(rows) == list(range(20))


# ---------------------------------------------------------------------------------------------------- English CLIP
# The recipe's stage (a) tokenizer and a CLIP text tower in the same class.

CAPTIONS = [
    "twilight, a bright moon, mountain peaks, watercolor painting",
    "a scene under a crescent moon, with cottages, photo",
    "a photograph of towering peaks at dusk, with a village & pines",
    "An ink painting of a waterfall at dawn",
    "rolling hills beside a lake at noon, oil painting",
] * 4


def reference_clip_bpe(folder, text: str) -> list[int]:
    """OpenAI CLIP's simple_tokenizer algorithm (the "slow" tokenizer), in plain Python, on a folder's
    vocab.json and merges.txt: lower-case, CLIP's word regex, byte symbols, lowest-rank merge first."""
    import json

    import regex

    from taiyi.recipe.tokenizer import WORD_PATTERN, bytes_to_unicode

    encoder = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    ranks = {tuple(line.split()): i for i, line in enumerate(lines)}
    symbols = bytes_to_unicode()
    ids = [encoder["<|startoftext|>"]]
    for word in regex.findall(WORD_PATTERN, " ".join(text.split()).lower()):
        parts = [symbols[b] for b in word.encode("utf-8")]
        parts[-1] += "</w>"
        while len(parts) > 1:
            pairs = [
                (ranks.get((a, b), float("inf")), i)
                for i, (a, b) in enumerate(zip(parts[:-1], parts[1:], strict=True))
            ]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        ids += [encoder[p] for p in parts]
    return ids + [encoder["<|endoftext|>"]]


@pytest.fixture(scope="module")
def english_tokenizer(tmp_path_factory):
    from taiyi.recipe.tokenizer import train_clip_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    train_clip_tokenizer(CAPTIONS, folder, vocab_size=600, max_length=32)
    return folder


def test_learned_tokenizer_loads_slow_and_fast_alike_and_round_trips(english_tokenizer, tmp_path):
    import shutil

    from transformers import CLIPTokenizer, CLIPTokenizerFast

    slow, fast = CLIPTokenizer.from_pretrained(english_tokenizer), CLIPTokenizerFast.from_pretrained(english_tokenizer)
    # vocab.json + merges.txt alone (OpenAI CLIP's files) give the same tokenizer as tokenizer.json.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(english_tokenizer / name, bare / name)
    from_files = CLIPTokenizer.from_pretrained(bare)
    texts = [*CAPTIONS[:5], "A  Zebra crossing the Yangtze 长江, 3 times!", "don't"]
    for text in texts:
        ids = slow(text)["input_ids"]
        assert ids == fast(text)["input_ids"] == from_files(text)["input_ids"] == reference_clip_bpe(bare, text), text
        assert "".join(slow.decode(ids, skip_special_tokens=True).split()) == "".join(text.lower().split())
    assert len(slow) <= 600 and slow.model_max_length == 32
    assert slow.convert_ids_to_tokens([len(slow) - 2, len(slow) - 1]) == ["<|startoftext|>", "<|endoftext|>"]
    assert slow.pad_token == "<|endoftext|>"
    assert slow.convert_ids_to_tokens(slow("moon")["input_ids"]) == ["<|startoftext|>", "moon</w>", "<|endoftext|>"]


def test_learned_tokenizer_is_deterministic_and_sized(english_tokenizer, tmp_path):
    from taiyi.recipe.tokenizer import train_clip_tokenizer

    again = train_clip_tokenizer(list(CAPTIONS), tmp_path / "again", vocab_size=600, max_length=32)
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        assert (tmp_path / "again" / name).read_bytes() == (english_tokenizer / name).read_bytes(), name
    small = train_clip_tokenizer(CAPTIONS, tmp_path / "small", vocab_size=520, min_frequency=1)
    assert len(small) == 520 and len(again) > 520
    with pytest.raises(InvalidInputError, match="at least 514"):
        train_clip_tokenizer(CAPTIONS, tmp_path / "tiny", vocab_size=100)
    with pytest.raises(InvalidInputError, match="no captions"):
        train_clip_tokenizer(["", "  "], tmp_path / "none")


@pytest.fixture(scope="module")
def english_clip(english_tokenizer):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(english_tokenizer)
    torch.manual_seed(0)
    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 32,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return ChineseCLIP.from_clip_model(CLIPModel(config).eval(), tokenizer, processor)


def test_english_clip_round_trips_through_a_standard_clip_folder(english_clip, tmp_path):
    from transformers import CLIPModel

    images = noise_images(3)
    folder = english_clip.save_pretrained(tmp_path / "clip")
    assert (folder / "preprocessor_config.json").is_file() and (folder / "vocab.json").is_file()
    loaded = load_clip(folder, device="cpu")
    assert loaded.text_head == "projection" and loaded.max_length == 32
    assert torch.allclose(
        loaded.similarity(images, CAPTIONS[:2]), english_clip.similarity(images, CAPTIONS[:2]), atol=1e-4
    )
    assert torch.allclose(ChineseCLIP.from_pretrained(folder).encode_text("moon"), english_clip.encode_text("moon"))
    clip_model = CLIPModel.from_pretrained(folder)
    assert float(clip_model.logit_scale.detach()) == pytest.approx(float(english_clip.logit_scale.detach()))
    # Batches equal singles; zero-shot uses English templates by default.
    batch = english_clip.encode_text(CAPTIONS[:3])
    singles = torch.cat([english_clip.encode_text(c) for c in CAPTIONS[:3]])
    assert torch.allclose(batch, singles, atol=1e-5)
    assert english_clip.templates[1] == "a photo of {}."
    assert torch.allclose(
        english_clip.label_embeddings(["moon"]), english_clip.label_embeddings(["moon"], english_clip.templates)
    )
    with pytest.raises(InvalidInputError, match="no Taiyi-CLIP layout"):
        english_clip.export_taiyi(tmp_path / "taiyi")


def test_clip_folder_without_tokenizer_is_refused_with_a_hint(towers):
    with pytest.raises(ModelLoadError, match="--image-tower"):
        load_clip(towers["image"], device="cpu")
