"""Prompt → text-encoder embeddings, including prompts longer than the encoder's window.

- BERT text encoders (Taiyi Chinese) read 512 positions, as the checkpoint was trained: prompts are
  padded to ``tokenizer.model_max_length`` exactly as stock diffusers does, so outputs match it.
  A prompt longer than 510 tokens is truncated with a warning naming how many tokens were dropped.
- CLIP text encoders (77 positions) split a long prompt into chunks of 75 tokens, each encoded
  with its own start/end tokens, and concatenate the chunk embeddings along the sequence axis (the
  convention of AUTOMATIC1111 and ComfyUI): nothing is dropped. The negative prompt is padded with
  empty chunks to the same length. Prompts that fit one window are encoded exactly as diffusers does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import contextmanager

import torch

logger = logging.getLogger("taiyi")
TOKENIZER_LOGGER = "transformers.tokenization_utils_base"  # its "Token indices sequence length" warning


def is_bert(text_encoder) -> bool:
    return getattr(text_encoder.config, "model_type", "") == "bert"


def _token_count(tokenizer, text: str) -> int:
    # verbose=False: counting is not running it through the model, which transformers would warn about
    return len(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids)


@contextmanager
def _quiet_truncation(sd):
    """diffusers logs the dropped end of a long prompt token by token, and its untruncated tokenisation makes
    transformers warn too; :func:`warn_truncated` has said it in one line."""
    loggers = [logging.getLogger(type(sd).encode_prompt.__module__), logging.getLogger(TOKENIZER_LOGGER)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _window(tokenizer) -> int:
    return tokenizer.model_max_length - 2  # room left for [CLS]/[SEP] or <|startoftext|>/<|endoftext|>


def warn_truncated(tokenizer, texts: Iterable[str], window: int | None = None) -> None:
    """Warn, once per text, about each text longer than the text encoder reads (its end is dropped).

    Args:
        tokenizer: the encoder's tokenizer (counts the tokens).
        texts: the texts as they will be tokenised (already normalised).
        window: tokens the encoder reads between its start and end tokens (default: the tokenizer's length less 2).
    """
    window = _window(tokenizer) if window is None else window
    for text in dict.fromkeys(texts):
        n = _token_count(tokenizer, text)
        if n > window:
            dropped = _dropped_text(tokenizer, text, window)
            logger.warning(
                "prompt is %d tokens but the text encoder reads %d; the last %d were dropped: %r",
                n,
                window,
                n - window,
                dropped if len(dropped) <= 40 else dropped[:40] + "…",
            )


def _dropped_text(tokenizer, text: str, window: int) -> str:
    """The part of ``text`` past its first ``window`` tokens: what the encoder never reads."""
    if getattr(tokenizer, "is_fast", False):  # offsets give the text itself, spaces and all
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return text[encoded["offset_mapping"][window][0] :]
    ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
    return tokenizer.decode(ids[window:])


def unknown_words(tokenizer, text: str) -> list[str]:
    """The parts of ``text`` that ``tokenizer`` reads as its unknown token (emoji, rare characters), in order."""
    unk = tokenizer.unk_token_id
    if unk is None or not getattr(tokenizer, "is_fast", False):  # offsets need a fast tokenizer
        return []
    encoded = tokenizer(text, add_special_tokens=False, truncation=False, return_offsets_mapping=True, verbose=False)
    spans = [text[a:b] for i, (a, b) in zip(encoded.input_ids, encoded["offset_mapping"], strict=True) if i == unk]
    return list(dict.fromkeys(spans))


def warn_unknown(tokenizer, texts: Iterable[str]) -> None:
    """Warn, once per text, about the words a WordPiece vocabulary lacks: the encoder sees only "unknown" there."""
    for text in dict.fromkeys(texts):
        words = unknown_words(tokenizer, text)
        if not words:
            continue
        ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
        known = any(i != tokenizer.unk_token_id for i in ids)
        logger.warning(
            "the text encoder's vocabulary lacks %s in %r: %s",
            "、".join(words),
            text if len(text) <= 40 else text[:40] + "…",
            "read as an unknown token" if known else "nothing in this prompt is known; the picture will not follow it",
        )


def _encode_chunked(sd, texts: list[str], device: torch.device) -> list[torch.Tensor]:
    """Each text → (n_chunks, 77, D) embeddings of 75-token chunks."""
    tok, enc = sd.tokenizer, sd.text_encoder
    window, length = _window(tok), tok.model_max_length
    out = []
    for text in texts:
        ids = tok(text, add_special_tokens=False, truncation=False, verbose=False).input_ids  # chunked below
        chunks = [ids[i : i + window] for i in range(0, max(len(ids), 1), window)]
        rows = [[tok.bos_token_id, *c, tok.eos_token_id] + [tok.pad_token_id] * (length - len(c) - 2) for c in chunks]
        with torch.no_grad():
            hidden = enc(torch.tensor(rows, device=device))[0]  # (n_chunks, 77, D)
        out.append(hidden.to(dtype=enc.dtype))
    return out


class PromptCache:
    """Embeddings of recently encoded texts, so a repeated prompt (and the empty negative prompt of every
    classifier-free-guided image) is encoded once. Keyed by the text and a state tag (the LoRAs applied to
    the text encoder change its output); the oldest entries go first beyond ``size``.
    """

    def __init__(self, size: int = 64):
        from collections import OrderedDict

        self.size = size
        self._rows: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> torch.Tensor | None:
        row = self._rows.get(key)
        if row is not None:
            self._rows.move_to_end(key)
            self.hits += 1
        return row

    def put(self, key: tuple, row: torch.Tensor) -> None:
        self.misses += 1
        self._rows[key] = row
        self._rows.move_to_end(key)
        while len(self._rows) > self.size:
            self._rows.popitem(last=False)

    def clear(self) -> None:
        self._rows.clear()


def _encode_cached(sd, texts: list[str], device, cache: PromptCache, tag: tuple) -> torch.Tensor:
    """Rows of stock ``encode_prompt`` for ``texts`` (B, L, D), the uncached ones encoded in one batch."""
    missing = list(dict.fromkeys(t for t in texts if cache.get((tag, t)) is None))
    if missing:
        with torch.no_grad(), _quiet_truncation(sd):  # cached rows must not hold an autograd graph
            embeds, _ = sd.encode_prompt(missing, device, 1, False)
        for text, row in zip(missing, embeds, strict=True):
            cache.put((tag, text), row)
    return torch.stack([cache._rows[(tag, t)] for t in texts])


def encode_prompts(
    sd,
    prompts: list[str],
    negative_prompts: list[str],
    device: torch.device,
    guidance: float,
    *,
    cache: PromptCache | None = None,
    cache_tag: tuple = (),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode a batch of prompts (one per image) and their negatives.

    Args:
        sd: a diffusers Stable Diffusion pipeline (its tokenizer and text encoder are used).
        prompts: one prompt per image, already normalised.
        negative_prompts: same length as ``prompts``.
        device: where the embeddings go.
        guidance: classifier-free guidance scale; at ≤ 1 no negative embeddings are needed.
        cache: reuse embeddings of texts encoded before (prompts within the encoder's window).
        cache_tag: what else the embeddings depend on (e.g. the LoRAs applied); part of the cache key.

    Returns:
        ``(prompt_embeds, negative_embeds)``, each (B, L, D); ``negative_embeds`` is None without CFG.
    """
    do_cfg = guidance > 1.0
    tok = sd.tokenizer
    window = _window(tok)
    counts = {t: _token_count(tok, t) for t in set(prompts) | (set(negative_prompts) if do_cfg else set())}
    too_long = {t: n for t, n in counts.items() if n > window}
    if not too_long or is_bert(sd.text_encoder):
        warn_truncated(tok, too_long, window)
        if is_bert(sd.text_encoder):  # CLIP's byte-level BPE has no unknown token
            warn_unknown(tok, counts)
        # Exactly stock diffusers' encoding (padding to model_max_length, its attention-mask rule).
        if cache is not None:  # prompts and negatives not seen before: one text-encoder batch
            rows = _encode_cached(sd, prompts + (negative_prompts if do_cfg else []), device, cache, cache_tag)
            return rows[: len(prompts)], (rows[len(prompts) :] if do_cfg else None)
        with _quiet_truncation(sd):
            embeds, negative = sd.encode_prompt(
                prompts, device, 1, do_cfg, negative_prompt=negative_prompts if do_cfg else None
            )
        return embeds, negative
    # CLIP with a long prompt: chunks of 75 tokens, every row padded to the same chunk count.
    texts = prompts + (negative_prompts if do_cfg else [])
    encoded = _encode_chunked(sd, texts, device)
    n_chunks = max(e.shape[0] for e in encoded)
    empty = _encode_chunked(sd, [""], device)[0]
    rows = []
    for e in encoded:
        pad = empty.expand(n_chunks - e.shape[0], -1, -1)
        rows.append(torch.cat([e, pad]).reshape(1, -1, e.shape[-1]))  # (1, n_chunks*77, D)
    stacked = torch.cat(rows)
    if do_cfg:
        return stacked[: len(prompts)], stacked[len(prompts) :]
    return stacked, None
