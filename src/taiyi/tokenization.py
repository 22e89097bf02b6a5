"""Chinese tokenizer handling, with the transformers pitfalls that silently break Taiyi models.

- ``BertTokenizer(vocab_file=path)`` in transformers 5 builds a 5-token vocabulary and maps every
  Chinese character to ``[UNK]``; only ``from_pretrained(dir)`` / ``BertTokenizer(vocab=path)`` read
  the file. :func:`check_tokenizer` fails loudly when a tokenizer is smaller than its text encoder's
  embedding table.
- transformers 5 saves only ``tokenizer.json``; :func:`save_bert_tokenizer_folder` also writes
  ``vocab.txt`` so that older tooling (and the published layout) keeps working.
- A missing ``model_max_length`` defaults to 10**30; it is set from the text encoder's positions.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from .errors import ModelLoadError

VOCAB_PATH = Path(str(resources.files("taiyi") / "data" / "vocab.txt"))
CHINESE_VOCAB_SIZE = 21128


def save_bert_tokenizer_folder(folder: str | Path, *, vocab: str | Path = VOCAB_PATH, max_length: int = 512) -> Path:
    """Write a ``BertTokenizer`` folder in the published Taiyi layout (``vocab.txt`` + configs)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(vocab, folder / "vocab.txt")
    config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "tokenize_chinese_chars": True,
        "model_max_length": max_length,
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {k: config[k] for k in ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return folder


def save_tokenizer_as_folder(tokenizer, folder: str | Path, *, max_length: int = 512) -> Path:
    """Write a loaded BERT tokenizer's vocabulary (id order) as a published-layout tokenizer folder."""
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise ValueError("tokenizer ids are not contiguous; cannot write vocab.txt")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".vocab.txt.tmp"
    tmp.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    save_bert_tokenizer_folder(folder, vocab=tmp, max_length=max_length)
    tmp.unlink()
    return folder


def load_chinese_tokenizer(folder: str | Path | None = None, *, max_length: int = 512):
    """Load a Chinese ``BertTokenizer`` from a folder, or the shipped 21128-token vocabulary."""
    from transformers import BertTokenizer

    if folder is None:
        tokenizer = BertTokenizer(vocab=str(VOCAB_PATH), do_lower_case=True)
    else:
        tokenizer = BertTokenizer.from_pretrained(folder)
    tokenizer.model_max_length = min(tokenizer.model_max_length, max_length)
    return tokenizer


def check_tokenizer(tokenizer, text_encoder, where: str = "the checkpoint") -> None:
    """Check that a tokenizer fits its text encoder and fix an unset ``model_max_length``.

    Raises:
        ModelLoadError: the tokenizer's vocabulary is smaller than the encoder's embedding table
            (e.g. a Chinese vocabulary that was lost and maps everything to ``[UNK]``).
    """
    config = text_encoder.config
    n_tokens = len(tokenizer)
    vocab_size = getattr(config, "vocab_size", None)
    if (
        vocab_size
        and n_tokens < min(vocab_size, 1000)
        or (vocab_size == CHINESE_VOCAB_SIZE and n_tokens != CHINESE_VOCAB_SIZE)
    ):
        raise ModelLoadError(
            f"the tokenizer of {where} has {n_tokens} tokens but its text encoder has {vocab_size}: the vocabulary "
            "was lost (is tokenizer/vocab.txt missing or unreadable?)"
        )
    positions = getattr(config, "max_position_embeddings", None)
    if positions and tokenizer.model_max_length > positions:
        tokenizer.model_max_length = positions
