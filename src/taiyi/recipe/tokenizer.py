"""An English CLIP BPE tokenizer learned from captions (recipe stage (a): the stand-in for OpenAI CLIP's).

:func:`train_clip_tokenizer` learns byte-level BPE merges with the ``tokenizers`` library under exactly
the normalisation and pre-tokenisation of ``transformers.CLIPTokenizer`` (NFC, whitespace folded,
lower-cased; CLIP's word regex; the GPT-2 byte alphabet; ``</w>`` marks the end of a word), then writes
the files OpenAI CLIP ships, in CLIP's vocabulary order::

    vocab.json                the 256 byte symbols, the same with </w>, one token per merge, then
                              <|startoftext|> and <|endoftext|> (the last two ids)
    merges.txt                "#version: 0.2" and one merge a line, in the order they apply
    tokenizer.json            the same tokenizer for the tokenizers library
    tokenizer_config.json     CLIPTokenizer, model_max_length, special tokens (pad = <|endoftext|>)
    special_tokens_map.json

Every byte sequence encodes (nothing is ever unknown), the result depends only on the captions and
the settings, and ``CLIPTokenizer.from_pretrained(dir)`` / ``CLIPTokenizerFast.from_pretrained(dir)``
load it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import InvalidInputError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's word pattern (transformers' CLIPTokenizer, from OpenAI's simple_tokenizer).
WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
MIN_VOCAB_SIZE = 514  # the 512 byte symbols and the two special tokens


def byte_symbols() -> list[str]:
    """The GPT-2 / CLIP byte alphabet in CLIP's vocabulary order (the values of :func:`bytes_to_unicode`)."""
    return list(bytes_to_unicode().values())


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 / CLIP byte alphabet: printable bytes as themselves, the rest mapped to U+0100 onwards,
    in CLIP's vocabulary order."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _pipeline(tokenizer) -> None:
    """Give a ``tokenizers.Tokenizer`` CLIPTokenizer's normaliser and pre-tokeniser."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()


def learn_merges(captions: Iterable[str], vocab_size: int = 1024, *, min_frequency: int = 2) -> list[tuple[str, str]]:
    """BPE merges learned from ``captions``, in the order they apply: at most ``vocab_size - 514`` of them.

    BPE is greedy, so the first k merges of a longer run are the merges of a run asked for k: the list
    is learned with room to spare and cut, which makes the vocabulary size exact.

    Args:
        captions: training texts (any language; English in the recipe).
        vocab_size: the whole vocabulary: 512 byte symbols + merges + 2 special tokens.
        min_frequency: a pair seen fewer times is never merged.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise InvalidInputError(f"a CLIP BPE vocabulary holds at least {MIN_VOCAB_SIZE} tokens, not {vocab_size}")
    tokenizer = Tokenizer(models.BPE(end_of_word_suffix=END_OF_WORD, continuing_subword_prefix=""))
    _pipeline(tokenizer)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + 1024,  # room for the alphabet the trainer counts in; the list is cut below
        min_frequency=min_frequency,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix=END_OF_WORD,
        continuing_subword_prefix="",
        special_tokens=[],
    )
    tokenizer.train_from_iterator(captions, trainer=trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    return merges[: vocab_size - MIN_VOCAB_SIZE]


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary order: byte symbols, byte symbols with ``</w>``, merge results, then BOS and EOS."""
    symbols = byte_symbols()
    tokens = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("the merges produce a token twice; they are not a BPE merge list")
    return vocab


def write_clip_tokenizer(
    vocab: dict[str, int], merges: list[tuple[str, str]], folder: str | os.PathLike, *, max_length: int = 77
) -> Path:
    """Write CLIP's tokenizer files (see the module docstring) for ``vocab`` and ``merges`` into ``folder``."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    # transformers builds the tokenizers pipeline from vocab.json + merges.txt; saving it adds tokenizer.json.
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return folder


def save_clip_tokenizer(tokenizer, folder: str | os.PathLike, *, max_length: int | None = None) -> Path:
    """Write a loaded ``CLIPTokenizer`` as CLIP's files (transformers 5 alone would write only tokenizer.json).

    Args:
        tokenizer: a byte-level BPE ``CLIPTokenizer`` (e.g. from :func:`train_clip_tokenizer`).
        folder: the target folder (created if missing).
        max_length: ``model_max_length`` to record (default: the tokenizer's own).
    """
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    vocab = dict(model["vocab"])
    for token in (BOS, EOS):
        vocab.setdefault(token, tokenizer.convert_tokens_to_ids(token))
    length = max_length if max_length is not None else tokenizer.model_max_length
    return write_clip_tokenizer(vocab, merges, folder, max_length=int(length))


def train_clip_tokenizer(
    captions: Iterable[str],
    folder: str | os.PathLike,
    *,
    vocab_size: int = 1024,
    max_length: int = 77,
    min_frequency: int = 2,
):
    """Learn a CLIP-style BPE tokenizer from ``captions``, save it in ``folder`` and return it loaded.

    Args:
        captions: the training captions.
        folder: where vocab.json, merges.txt and the tokenizer configs go (created if missing).
        vocab_size: tokens in all, at least 514 (fewer when the captions hold fewer mergeable pairs).
        max_length: the tokenizer's ``model_max_length`` (SD v1 pads prompts to 77).
        min_frequency: pairs seen fewer times are not merged.

    Returns:
        ``transformers.CLIPTokenizer`` loaded from ``folder``.
    """
    from transformers import CLIPTokenizer

    captions = [c for c in captions if isinstance(c, str) and c.strip()]
    if not captions:
        raise InvalidInputError("no captions to learn a tokenizer from")
    if max_length < 3:
        raise InvalidInputError(f"the tokenizer's max length must be at least 3, not {max_length}")
    merges = learn_merges(captions, vocab_size, min_frequency=min_frequency)
    write_clip_tokenizer(clip_vocab(merges), merges, folder, max_length=max_length)
    return CLIPTokenizer.from_pretrained(folder)


__all__ = [
    "byte_symbols",
    "bytes_to_unicode",
    "clip_vocab",
    "learn_merges",
    "save_clip_tokenizer",
    "train_clip_tokenizer",
    "write_clip_tokenizer",
]
