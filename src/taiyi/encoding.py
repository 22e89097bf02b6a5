"""Prompt → text-encoder embeddings, including prompts longer than the encoder's window.

- BERT text encoders (Taiyi Chinese) read 512 positions, as the checkpoint was trained: prompts are
  padded to ``tokenizer.model_max_length`` exactly as stock diffusers does, so outputs match it.
  A prompt longer than 510 tokens is truncated with a warning naming how many tokens were dropped.
- CLIP text encoders (77 positions) split a long prompt into chunks of 75 tokens, each encoded
  with its own start/end tokens, and concatenate the chunk embeddings along the sequence axis (the
  convention of ComfyUI; A1111 also ends a chunk at its last comma): nothing is dropped. The negative prompt is
  padded with empty chunks to the same length. Prompts that fit one window are encoded exactly as diffusers does.
- Emphasis (:func:`taiyi.prompts.read_emphasis`, A1111's ``(words:1.3)``): each window is encoded as above, then
  every token's embedding is multiplied by its weight and, for A1111's default "Original" emphasis, the window is
  scaled back to its unweighted mean (per prompt; A1111 takes the mean over its batch, which for a batch of one
  prompt is the same). ``BREAK`` ends a window: the parts on either side are encoded apart and concatenated, for
  BERT as for CLIP.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import contextmanager

import torch

from .prompts import WeightedPrompt

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


def _windows(tok, item: str | WeightedPrompt, bert: bool) -> list[tuple[list[int], list[float]]]:
    """``item``'s token ids and weights in windows of the encoder (no start/end tokens yet): each BREAK part on
    its own, split every 75 tokens for CLIP; a BERT encoder reads one window of a part (the rest was warned of)."""
    segments = item.segments if isinstance(item, WeightedPrompt) else (((item, 1.0),),)
    window = _window(tok)
    out = []
    for segment in segments:
        ids: list[int] = []
        weights: list[float] = []
        for text, weight in segment:  # each piece tokenised alone, as A1111 does
            piece = tok(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
            ids += piece
            weights += [weight] * len(piece)
        if bert:
            ids, weights = ids[:window], weights[:window]
        out += [(ids[i : i + window], weights[i : i + window]) for i in range(0, max(len(ids), 1), window)]
    return out


def window_count(sd, item: str | WeightedPrompt) -> int:
    """How many encoder windows ``item`` takes: 1, or more with BREAKs, or for a long prompt on a CLIP encoder."""
    return len(_windows(sd.tokenizer, item, is_bert(sd.text_encoder)))


def _encode_windows(sd, item: str | WeightedPrompt, device: torch.device, clip_skip: int = 1) -> torch.Tensor:
    """One prompt → (n_windows, L, D): each window padded and encoded as stock diffusers encodes a prompt (start and
    end tokens, padding to ``model_max_length``, its attention-mask rule), then weighted as A1111 does (each token's
    embedding × its weight; for "Original" emphasis scaled back to the window's unweighted mean)."""
    tok, enc = sd.tokenizer, sd.text_encoder
    length = tok.model_max_length
    bert = is_bert(enc)
    first, last = (tok.cls_token_id, tok.sep_token_id) if bert else (tok.bos_token_id, tok.eos_token_id)
    rows, multipliers = [], []
    for ids, weights in _windows(tok, item, bert):
        row = [first, *ids, last]  # [CLS] … [SEP] or <|startoftext|> … <|endoftext|>
        weight_row = [1.0] * length  # the start, end and padding tokens keep theirs
        weight_row[1 : 1 + len(weights)] = weights
        rows.append(row + [tok.pad_token_id] * (length - len(row)))
        multipliers.append(weight_row)
    ids = torch.tensor(rows, device=device)
    use_mask = getattr(enc.config, "use_attention_mask", False)
    mask = (ids != tok.pad_token_id).long() if use_mask else None
    with torch.no_grad():
        if clip_skip == 1:
            hidden = enc(ids, attention_mask=mask)[0]  # (n, L, D)
        else:  # A1111's "Clip skip": an earlier layer's output; CLIP's then through its final LayerNorm, as A1111
            hidden = enc(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-clip_skip]
            if not bert:
                hidden = getattr(enc, "text_model", enc).final_layer_norm(hidden)
    weighted = isinstance(item, WeightedPrompt) and any(w != 1.0 for row in multipliers for w in row)
    if weighted:
        z = hidden.float()
        mean = z.mean(dim=(1, 2), keepdim=True)
        weights = torch.tensor(multipliers, device=device)  # (n, L)
        z = z * weights[..., None]
        if item.restore_mean:
            z = z * _mean_restoring_factor(mean, z.mean(dim=(1, 2), keepdim=True), weights)
        hidden = z
    return hidden.to(dtype=enc.dtype)


def _mean_restoring_factor(mean: torch.Tensor, weighted_mean: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's scale back to the unweighted mean, per window (n, 1, 1) — or 1 where it is noise.

    When every token's embedding averages to one sign (trained encoders: a final LayerNorm's bias), the weighted
    mean is a weighted average of the token means, so the factor lies within [1/max weight, 1/min weight]. Outside
    that range the token means cancel (an encoder whose embeddings average to about zero): the factor is a ratio of
    two near-zeros, any size or sign, and A1111's rule would scale the whole window by it; such a window is left
    unscaled ("No norm"), with a warning.
    """
    factor = mean / weighted_mean
    low, high = weights.amin(dim=1)[:, None, None], weights.amax(dim=1)[:, None, None]
    sound = torch.isfinite(factor) & (factor * high >= 1 - 1e-6) & (factor * low <= 1 + 1e-6)
    if not bool(sound.all()):
        logger.warning(
            "the text encoder's embeddings average to about zero, so A1111's rescale to their mean is noise; "
            "the weights are applied without it (as --emphasis no-norm)"
        )
    return torch.where(sound, factor, torch.ones_like(factor))


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
    prompts: list[str | WeightedPrompt],
    negative_prompts: list[str | WeightedPrompt],
    device: torch.device,
    guidance: float,
    *,
    cache: PromptCache | None = None,
    cache_tag: tuple = (),
    clip_skip: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode a batch of prompts (one per image) and their negatives.

    Args:
        sd: a diffusers Stable Diffusion pipeline (its tokenizer and text encoder are used).
        prompts: one prompt per image, already normalised; a :class:`~taiyi.prompts.WeightedPrompt` is read
            with its weights and BREAKs (A1111's emphasis).
        negative_prompts: same length as ``prompts``.
        device: where the embeddings go.
        guidance: classifier-free guidance scale; at ≤ 1 no negative embeddings are needed.
        cache: reuse embeddings of texts encoded before (prompts within the encoder's window).
        cache_tag: what else the embeddings depend on (e.g. the LoRAs applied); part of the cache key.
        clip_skip: A1111's "Clip skip": 1 reads the encoder's last layer (stock), 2 the one before, and so on.

    Returns:
        ``(prompt_embeds, negative_embeds)``, each (B, L, D); ``negative_embeds`` is None without CFG.
    """
    do_cfg = guidance > 1.0
    tok = sd.tokenizer
    window = _window(tok)
    bert = is_bert(sd.text_encoder)
    items = prompts + (negative_prompts if do_cfg else [])
    counts = {t: _token_count(tok, t) for item in dict.fromkeys(items) for t in _part_texts(item)}
    too_long = {t: n for t, n in counts.items() if n > window}
    if bert:  # CLIP reads a long prompt in windows; its byte-level BPE has no unknown token
        warn_truncated(tok, too_long, window)
        warn_unknown(tok, counts)
    if clip_skip == 1 and all(isinstance(item, str) for item in items) and (not too_long or bert):
        # Exactly stock diffusers' encoding (padding to model_max_length, its attention-mask rule).
        if cache is not None:  # prompts and negatives not seen before: one text-encoder batch
            rows = _encode_cached(sd, prompts + (negative_prompts if do_cfg else []), device, cache, cache_tag)
            return rows[: len(prompts)], (rows[len(prompts) :] if do_cfg else None)
        with _quiet_truncation(sd):
            embeds, negative = sd.encode_prompt(
                prompts, device, 1, do_cfg, negative_prompt=negative_prompts if do_cfg else None
            )
        return embeds, negative
    # Weighted prompts, BREAKs, or CLIP with a long prompt: windows, every row padded to the same count.
    texts = prompts + (negative_prompts if do_cfg else [])
    encoded = [_cached_windows(sd, t, device, cache, cache_tag, clip_skip) for t in texts]
    n_windows = max(e.shape[0] for e in encoded)
    empty = _cached_windows(sd, "", device, cache, cache_tag, clip_skip)
    rows = []
    for e in encoded:
        pad = empty.expand(n_windows - e.shape[0], -1, -1)
        rows.append(torch.cat([e, pad]).reshape(1, -1, e.shape[-1]))  # (1, n_windows*L, D)
    stacked = torch.cat(rows)
    if do_cfg:
        return stacked[: len(prompts)], stacked[len(prompts) :]
    return stacked, None


def _part_texts(item: str | WeightedPrompt) -> list[str]:
    """The texts an encoder window reads: the prompt, or each BREAK part of a weighted one."""
    if isinstance(item, WeightedPrompt):
        return ["".join(text for text, _ in segment) for segment in item.segments]
    return [item]


def _cached_windows(sd, item, device, cache: PromptCache | None, tag: tuple, clip_skip: int = 1) -> torch.Tensor:
    key = (tag, "windows", clip_skip, item)
    rows = cache.get(key) if cache is not None else None
    if rows is None:
        rows = _encode_windows(sd, item, device, clip_skip)
        if cache is not None:
            cache.put(key, rows)
    return rows
