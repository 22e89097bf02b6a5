"""Chinese prompt normalisation.

Taiyi's Chinese models read prompts through a Chinese BERT tokenizer (the chinese-roberta-wwm-ext
vocabulary) and were trained on ordinary Chinese text, which writes full-width punctuation between
Chinese characters: to that tokenizer ``,`` (token 117) and ``，`` (token 8024) are different
words. The bilingual model's CLIP tokenizer, for its part, reads English best when it is plain
ASCII. So every prompt and negative prompt is normalised the same way before it is tokenised.

Normalisation is on by default; switch it off with ``--no-normalize`` on the command line or
``normalize=False`` in the Python API, and the prompt is used exactly as typed.

The rules, in the order they are applied:

1. **Clean-up.** Control characters and invisible zero-width characters (U+200B, U+2060, BOM)
   are removed, the text is put in Unicode NFC form, every run of whitespace (spaces, tabs,
   newlines, the ideographic space U+3000) becomes one ASCII space, and leading and trailing
   spaces are dropped.
2. **Traditional to Simplified Chinese** with OpenCC ``t2s`` (飛流直下三千尺 → 飞流直下三千尺).
   :func:`normalize_prompt` can skip this step with ``to_simplified=False``.
3. **Full-width letters and digits become ASCII** (ＳＤ１．５ → SD1.5), so English words and
   numbers are plain ASCII. The full-width full stop ``．`` is read as ``.``.
4. **Punctuation follows the text on its left.** A comma, full stop, colon, semicolon, question
   or exclamation mark, typed in either width (``, ，  . 。  : ：  ; ；  ? ？  ! ！``), takes the
   width of the script before it. Its left neighbour is the nearest character that is not a
   space, one of these marks, or a closing bracket or quote, so ``什么?!`` → ``什么？！`` and
   ``（水彩）,风景`` → ``（水彩），风景``:

   - after a Chinese character (a Han ideograph) it becomes full-width ``，。：；？！``;
   - after a letter or digit of an alphabetic script (Latin, Greek, Cyrillic …) it becomes
     half-width ``, . : ; ? !`` followed by one space when more text follows;
   - after anything else (the start of the prompt, kana, emoji …) it is left as typed.

   Some marks are never changed: ``.``, ``,`` and ``:`` (and ``：``) directly between two digits
   (3.5, 1,000, 12:30); a ``.`` inside a token, that is directly after a non-space character and
   directly before an ASCII letter or digit (v1.5, e.g., example.com, 山水.jpg); a ``.`` starting a number, after a
   space or at the start (.5, as in the weight ``(山水: .5)``; the space before it stays); two or more
   periods in a row (an ellipsis, ``...``); and anything inside a URL with a scheme
   (``https://…``). The enumeration comma ``、`` always stays.

   Full-width parentheses ``（…）`` become ASCII ``(…)`` when what they enclose contains a Latin
   letter and no Chinese, Japanese or Korean character (``（oil painting）`` → ``(oil
   painting)``); all other brackets are left as typed.
5. **Spacing around punctuation.** There is no space directly before or after a full-width
   punctuation mark (``，。：；？！、（）【】「」『』《》〈〉〔〕``) and no space before a half-width
   ``, . : ; ? !``. Other spaces are only collapsed, never added or removed: English words keep
   the single space between them and are never joined or split, and a space typed between two
   Chinese characters stays as a separator.

Normalising twice gives the same text as normalising once.

Examples::

    >>> normalize_prompt("飛流直下三千尺,油畫")
    '飞流直下三千尺，油画'
    >>> normalize_prompt("小桥流水人家, Van Gogh style")
    '小桥流水人家，Van Gogh style'
    >>> normalize_prompt("a cat，sitting")
    'a cat, sitting'
    >>> normalize_prompt("ＳＤ 1.5 模型")
    'SD 1.5 模型'
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, overload

from .errors import InvalidInputError

if TYPE_CHECKING:
    import opencc

    from .prompt_editing import ScheduledPrompt

__all__ = [
    "EMPHASIS_MODES",
    "WeightedPrompt",
    "check_emphasis",
    "check_prompt",
    "has_emphasis",
    "normalize_prompt",
    "normalize_prompts",
    "parameters_line",
    "prepare_prompt",
    "read_emphasis",
    "require_text",
]

# Invisible format characters that users paste in from web pages; left in, they would split or glue
# words for the tokenizer. ZWJ (U+200D) is kept because emoji sequences need it.
_INVISIBLE = frozenset("\u200b\u2060\ufeff")

# Ａ-Ｚ, ａ-ｚ, ０-９ and the full-width full stop sit exactly 0xFEE0 above their ASCII twins.
_FULLWIDTH_TO_ASCII = {
    code: code - 0xFEE0 for code in (*range(0xFF10, 0xFF1A), *range(0xFF21, 0xFF3B), *range(0xFF41, 0xFF5B), 0xFF0E)
}

_TO_FULL = {",": "，", ".": "。", ":": "：", ";": "；", "?": "？", "!": "！"}
_TO_HALF = {full: half for half, full in _TO_FULL.items()}
_HALF_MARKS = frozenset(_TO_FULL)
_MARKS = _HALF_MARKS | frozenset(_TO_HALF)
_PERIODS = frozenset(".。")
# Closing brackets and quotes are looked through when finding a mark's left neighbour. ASCII quotes
# are ambiguous, but one directly before a mark is almost always closing.
_CLOSERS = frozenset(")）]】」』》〉〕\"”'’")
_FULLWIDTH_PUNCT = frozenset("，。：；？！、（）【】「」『』《》〈〉〔〕")

_HAN_RE = re.compile(r"[\u3007\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
# Han, kana and Hangul: parentheses around any of these stay full-width.
_CJK_SCRIPT_RE = re.compile(
    r"[\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
    r"\uf900-\ufaff\U00020000-\U0003134f]"
)
_LATIN_LETTER_RE = re.compile(r"[A-Za-z]")
# Innermost pair only; _latin_parentheses repeats until nested pairs are done.
_FULLWIDTH_PARENS_RE = re.compile(r"（([^（）]*)）")
# A URL with a scheme runs to the next non-ASCII or space character; trailing punctuation belongs to
# the sentence, not the URL (as in "see https://example.com.").
_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[!-~]*")
_URL_TRAILING = ".,:;?!'\")]"
# AUTOMATIC1111's emphasis tokens: an escaped bracket or backslash, an opening bracket, ":WEIGHT)" closing a round
# bracket, a closing bracket, a run of plain text, a lone colon or backslash. A colon may be full-width: the prompt is
# normalised first, which makes the colon after a Chinese word "：".
_EMPHASIS_TOKEN_RE = re.compile(r"\\[()\[\]\\]|[(\[]|[:：]\s*([+-]?[\d.]+)\s*\)|[)\]]|[^\\()\[\]:：]+|[:：\\]")
# A full-width pair with an explicit weight, （山水：1.3）, as a Chinese input method types it (either bracket may be
# half-width, typed before or after switching the input method); a full-width pair without one is ordinary punctuation
# and stays text.
_FULLWIDTH_WEIGHTED_RE = re.compile(r"[（(]([^（）()]*?)[:：]\s*([+-]?[\d.]+)\s*[）)]")
_WEIGHT_SUFFIX_RE = re.compile(r"[:：]\s*[+-]?[\d.]+\s*$")  # the ":1.2" before a closing bracket
# BREAK between words, as A1111's \bBREAK\b (not beside a letter, digit or _ of an alphabetic script), but directly
# beside Chinese characters too (where \b sees no boundary).
_BREAK_RE = re.compile(r"\s*(?<![^\W\u2e80-\U0003134f])BREAK(?![^\W\u2e80-\U0003134f])\s*")
_ROUND, _SQUARE = 1.1, 1 / 1.1  # A1111's multipliers for (words) and [words]
MAX_WEIGHT = 10.0

EMPHASIS_MODES = {"original": "Original", "no-norm": "No norm", "none": "None"}
"""taiyi's names of A1111's emphasis modes → the names A1111 records ("Emphasis" in the ``parameters`` text).
``original``: weighted token embeddings, then scaled back to the chunk's unweighted mean (A1111's default);
``no-norm``: weighted, not scaled back; ``none``: brackets and numbers are words."""


@functools.lru_cache(maxsize=1)
def _t2s_converter() -> opencc.OpenCC:
    # Imported and built on first use: loading the dictionaries costs time that `import taiyi` should not pay.
    import opencc

    return opencc.OpenCC("t2s")


def _is_han(ch: str) -> bool:
    return _HAN_RE.match(ch) is not None


def _is_alphabetic(ch: str) -> bool:
    # Everything from U+2E80 up is CJK, symbols or emoji; below it, letters and digits belong to scripts that write
    # half-width punctuation.
    return ch.isalnum() and ord(ch) < 0x2E80


def _is_digit(ch: str) -> bool:
    return "0" <= ch <= "9"


def _is_ascii_alnum(ch: str) -> bool:
    return ch.isascii() and ch.isalnum()


def _clean(text: str) -> str:
    # Whitespace control characters (tab, newline …) are kept here so that split() turns them into separators.
    text = "".join(ch for ch in text if ch not in _INVISIBLE and (unicodedata.category(ch) != "Cc" or ch.isspace()))
    # Folding before NFC lets a folded letter compose with a following combining mark in one go.
    text = text.translate(_FULLWIDTH_TO_ASCII)
    return unicodedata.normalize("NFC", text)


def _latin_parentheses(text: str, escape: bool = False) -> str:
    """（oil painting） → (oil painting); with ``escape``, → \\(oil painting\\) unless it holds a weight, so that
    emphasis reads the brackets as typed: punctuation, not ×1.1."""

    def replace(match: re.Match[str]) -> str:
        content = match.group(1)
        if _LATIN_LETTER_RE.search(content) and not _CJK_SCRIPT_RE.search(content):
            if escape and not _WEIGHT_SUFFIX_RE.search(content):
                return f"\\({content}\\)"
            return f"({content})"
        return match.group(0)

    # Repeat so that nested pairs are converted in one call, which keeps normalisation idempotent.
    while True:
        converted = _FULLWIDTH_PARENS_RE.sub(replace, text)
        if converted == text:
            return text
        text = converted


def _is_fixed_mark(text: str, i: int) -> bool:
    """Whether the mark at ``text[i]`` is part of a number, token or ellipsis and must not be changed."""
    ch = text[i]
    prev = text[i - 1] if i > 0 else ""
    nxt = text[i + 1] if i + 1 < len(text) else ""
    if ch in ".,:：" and _is_digit(prev) and _is_digit(nxt):
        return True
    if ch == "." and prev and not prev.isspace() and _is_ascii_alnum(nxt):
        return True
    if _starts_number(text, i):
        return True
    return ch in _PERIODS and (prev in _PERIODS or nxt in _PERIODS)


def _starts_number(text: str, i: int) -> bool:
    """Whether ``text[i]`` is the point of a number written without its 0 (.5, as in the weight ``(山水: .5)``)."""
    return text[i] == "." and (i == 0 or text[i - 1].isspace()) and i + 1 < len(text) and _is_digit(text[i + 1])


def _left_script(text: str, i: int) -> str | None:
    """The script, ``"han"`` or ``"alphabetic"``, of the left neighbour of the mark at ``text[i]``; None for others."""
    j = i - 1
    while j >= 0 and (text[j].isspace() or text[j] in _MARKS or text[j] in _CLOSERS or _escapes_closer(text, j)):
        # An emphasis weight, "(流水:1.2)", is looked through with its bracket: the words it weights are the neighbour;
        # so is a prompt edit's step, "[山水:小桥:0.5]" (its last words are the neighbour). So is an escaped "\\)" (the
        # same text as words: emphasis is read after normalisation, so it must not decide).
        before = j - 1 if j > 0 and _escapes_closer(text, j - 1) else j
        weight = _WEIGHT_SUFFIX_RE.search(text, 0, before) if text[j] in ")）]" else None
        j = weight.start() - 1 if weight else j - 1
    if j < 0:
        return None
    if _is_han(text[j]):
        return "han"
    if _is_alphabetic(text[j]):
        return "alphabetic"
    return None


def _escapes_closer(text: str, j: int) -> bool:
    return text[j] == "\\" and j + 1 < len(text) and text[j + 1] in _CLOSERS  # the backslash of an escaped bracket


def _wants_space_after(ch: str) -> bool:
    # A mark, closing bracket or quote continues the punctuation run, and full-width punctuation never has a space
    # beside it.
    return not (ch.isspace() or ch in _MARKS or ch in _CLOSERS or ch in _FULLWIDTH_PUNCT)


def _normalize_punctuation(text: str, escape_brackets: bool = False) -> str:
    text = _latin_parentheses(text, escape_brackets)
    n = len(text)
    protected = [False] * n
    for match in _URL_RE.finditer(text):
        end = match.start() + len(match.group().rstrip(_URL_TRAILING))
        protected[match.start() : end] = [True] * (end - match.start())

    chars = list(text)
    spaced_after = [False] * n
    for i, ch in enumerate(text):
        if ch not in _MARKS or protected[i] or _is_fixed_mark(text, i):
            continue
        script = _left_script(text, i)
        if script == "han":
            chars[i] = _TO_FULL.get(ch, ch)
        elif script == "alphabetic":
            chars[i] = _TO_HALF.get(ch, ch)
            spaced_after[i] = True

    out: list[str] = []
    for i, ch in enumerate(chars):
        if ch == " ":
            # Step 1 left single spaces with a non-space character on each side.
            prev, nxt = chars[i - 1], chars[i + 1]
            mark_after = nxt in _HALF_MARKS and not protected[i + 1] and not _starts_number(text, i + 1)
            if prev in _FULLWIDTH_PUNCT or nxt in _FULLWIDTH_PUNCT or mark_after:
                continue
        out.append(ch)
        if spaced_after[i] and i + 1 < n and _wants_space_after(chars[i + 1]) and not _escapes_closer(text, i + 1):
            out.append(" ")
    return "".join(out)


def normalize_prompt(text: str, *, to_simplified: bool = True, escape_brackets: bool = False) -> str:
    """Normalise one Chinese, English or mixed prompt (or negative prompt) for tokenisation.

    The rules are listed in the module documentation. The result is stable: normalising it again
    returns it unchanged.

    Args:
        text: The prompt as typed by the user.
        to_simplified: Convert Traditional Chinese to Simplified Chinese with OpenCC ``t2s``.
        escape_brackets: write the full-width brackets made ASCII (``（oil painting）``) as ``\\( \\)``, so that
            emphasis (:func:`read_emphasis`) reads them as the punctuation typed, not as a weight of 1.1.

    Returns:
        The normalised prompt; an empty string stays empty.

    Raises:
        InvalidInputError: If ``text`` is not a string, or not text (undecodable bytes, lone surrogates).
    """
    require_text(text)
    text = _clean(text)
    if to_simplified:
        # NFC again: the converter's output is not guaranteed to be in normal form.
        text = unicodedata.normalize("NFC", _t2s_converter().convert(text))
    text = " ".join(text.split())
    return _normalize_punctuation(text, escape_brackets)


def require_text(text: object, what: str = "prompt") -> None:
    """A prompt must be a string that UTF-8 can encode: a command-line argument in another encoding reaches
    Python as lone surrogates (``\\udcff``), and so can a JSON ``"\\ud800"``; the tokenizers cannot take them."""
    if not isinstance(text, str):
        raise InvalidInputError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"{what} is not valid text: character {exc.start + 1} is not Unicode (bytes in an encoding other than "
            "UTF-8?); give it in UTF-8"
        ) from None


@overload
def normalize_prompts(prompts: str, *, enabled: bool = True) -> str: ...
@overload
def normalize_prompts(prompts: list[str], *, enabled: bool = True) -> list[str]: ...
@overload
def normalize_prompts(prompts: None, *, enabled: bool = True) -> None: ...
def normalize_prompts(prompts: str | list[str] | None, *, enabled: bool = True) -> str | list[str] | None:
    """Normalise a prompt or a batch of prompts with :func:`normalize_prompt`, keeping the shape.

    Args:
        prompts: One prompt, a list of prompts, or None (no prompt, e.g. no negative prompt).
        enabled: When False, ``prompts`` is returned as given (``--no-normalize`` / ``normalize=False``).

    Returns:
        A string for a string, a new list for a list, None for None.

    Raises:
        InvalidInputError: If ``prompts`` is not a string, a list of strings or None.
    """
    if prompts is None:
        return prompts
    if not enabled:  # returned as given, but only if it is text at all
        for prompt in prompts if isinstance(prompts, list) else [prompts]:
            require_text(prompt)
        return prompts
    if isinstance(prompts, str):
        return normalize_prompt(prompts)
    if isinstance(prompts, list):
        return [normalize_prompt(prompt) for prompt in prompts]
    raise InvalidInputError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")


@dataclass(frozen=True)
class WeightedPrompt:
    """A prompt read with emphasis: ``segments`` (the parts between ``BREAK``s, each encoded in windows of its
    own) of ``(text, weight)`` pieces; ``restore_mean`` scales each window's weighted embeddings back to their
    unweighted mean, as A1111's "Original" emphasis does."""

    segments: tuple[tuple[tuple[str, float], ...], ...]
    restore_mean: bool = True

    @property
    def text(self) -> str:
        """The words alone (every piece, BREAKs as spaces): what emptiness and vocabulary checks read."""
        return " ".join("".join(piece for piece, _ in segment) for segment in self.segments)


def check_emphasis(emphasis: str) -> str:
    """``emphasis`` as one of :data:`EMPHASIS_MODES` (A1111's recorded names are accepted too)."""
    by_label = {label.lower(): mode for mode, label in EMPHASIS_MODES.items()}
    mode = by_label.get(emphasis.lower(), emphasis.lower()) if isinstance(emphasis, str) else None
    if mode not in EMPHASIS_MODES:
        raise InvalidInputError(f"emphasis must be one of {', '.join(EMPHASIS_MODES)}, not {emphasis!r}")
    return mode


_AS_WORDS = r"to write brackets as words, escape them as \( \) or turn emphasis off (--emphasis none)"


def _weight(number: str, group: str) -> float:
    try:
        weight = float(number)
    except ValueError:
        raise InvalidInputError(f"prompt weight {number!r} in {group!r} is not a number; {_AS_WORDS}") from None
    if not 0 <= weight <= MAX_WEIGHT:
        raise InvalidInputError(
            f"prompt weight {number} in {group!r} is not between 0 and {MAX_WEIGHT:g} (above 1 strengthens, below 1 "
            f"weakens); {_AS_WORDS}"
        )
    return weight


def read_emphasis(text: str, emphasis: str = "original") -> str | WeightedPrompt:
    """Read AUTOMATIC1111's emphasis syntax in a prompt, as A1111 does.

    ``(words)`` multiplies their weight by 1.1, ``[words]`` divides it by 1.1, ``(words:1.3)`` multiplies it by
    1.3 (also written ``（words：1.3）`` in full width, either bracket; a full-width pair without a weight is
    punctuation);
    brackets nest and multiply; ``\\(`` ``\\)`` ``\\[`` ``\\]`` are the brackets themselves; a bracket never
    closed weights the rest of the prompt, a closing one never opened is text. ``BREAK`` starts a new window of
    the text encoder (the parts on either side are encoded apart).

    Args:
        text: the prompt (normalised, if it is to be).
        emphasis: one of :data:`EMPHASIS_MODES`; ``"none"`` returns ``text`` as it is.

    Returns:
        The words as a string when nothing in them is weighted or broken (escapes resolved), else a
        :class:`WeightedPrompt`.

    Raises:
        InvalidInputError: a weight that is not a number, or outside 0–10.
    """
    mode = check_emphasis(emphasis)
    if mode == "none":
        return text
    text = _FULLWIDTH_WEIGHTED_RE.sub(r"(\1:\2)", text)
    pieces: list[list] = []  # [text, weight]; a BREAK is [None, 1.0]
    rounds: list[tuple[int, int]] = []  # (first piece, where in the text) of each open bracket
    squares: list[tuple[int, int]] = []

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _EMPHASIS_TOKEN_RE.finditer(text):
        token, number = match.group(), match.group(1)
        if token[0] == "\\" and len(token) == 2:
            pieces.append([token[1], 1.0])
        elif token in "([":
            (rounds if token == "(" else squares).append((len(pieces), match.start()))
        elif number is not None and rounds:
            start, at = rounds.pop()
            multiply(start, _weight(number, text[at : match.end()]))
        elif token == ")" and rounds:
            multiply(rounds.pop()[0], _ROUND)
        elif token == "]" and squares:
            multiply(squares.pop()[0], _SQUARE)
        else:
            for i, part in enumerate(_BREAK_RE.split(token)):
                if i:
                    pieces.append([None, 1.0])
                pieces.append([part, 1.0])
    for start, _ in rounds:
        multiply(start, _ROUND)
    for start, _ in squares:
        multiply(start, _SQUARE)

    segments: list[list[tuple[str, float]]] = [[]]
    for piece, weight in pieces:
        if piece is None:
            segments.append([])
        elif piece:
            segment = segments[-1]
            if segment and segment[-1][1] == weight:  # one piece per run of equal weight
                segment[-1] = (segment[-1][0] + piece, weight)
            else:
                segment.append((piece, weight))
    if len(segments) > 1 and not "".join(piece for piece, _ in segments[-1]).strip():
        segments.pop()  # as A1111: a BREAK at the end opens no window; at the start, or twice in a row, an empty one
    if len(segments) == 1 and all(weight == 1.0 for _, weight in segments[0]):
        return "".join(piece for piece, _ in segments[0])
    return WeightedPrompt(tuple(tuple(s) for s in segments), restore_mean=mode == "original")


def prepare_prompt(
    text: str,
    *,
    normalize: bool = True,
    emphasis: str = "original",
    what: str = "prompt",
    required: bool = True,
    steps: int = 9,
) -> str | WeightedPrompt | ScheduledPrompt:
    """A prompt as the text encoder reads it: normalised (:func:`normalize_prompt`) when ``normalize``, then read
    for A1111's prompt editing and alternation (:func:`taiyi.prompt_editing.read_schedule`) and with ``emphasis``
    (:func:`read_emphasis`; after normalisation, which keeps brackets and weights).

    Args:
        text: the prompt as given.
        normalize: apply :func:`normalize_prompt` first.
        emphasis: one of :data:`EMPHASIS_MODES`.
        what: what the text is, for messages ("negative prompt").
        required: refuse a text without words (:func:`check_prompt`).
        steps: the run's steps, over which an edited prompt's words are judged (its weights at every step of any
            run).

    Returns:
        A string or a :class:`WeightedPrompt`; a :class:`~taiyi.prompt_editing.ScheduledPrompt` when the words change
        with the step (each step's read with ``emphasis`` as it comes).

    Raises:
        InvalidInputError: not text, a malformed weight, or (when required) no words.
    """
    from .prompt_editing import ScheduledPrompt, read_schedule

    require_text(text, what)
    emphasis = check_emphasis(emphasis)
    # Full-width brackets without a weight are punctuation, also once normalisation has made them ASCII.
    text = normalize_prompt(text, escape_brackets=emphasis != "none") if normalize else text
    schedule = read_schedule(text, emphasis)
    steps_read = [schedule.item_at(step, steps) for step in range(1, steps + 1)] if schedule != text else []
    if isinstance(schedule, ScheduledPrompt):  # the words of later steps too (the hires fix's second pass)
        for variant in schedule.variants():
            read_emphasis(variant, emphasis)
    read = schedule if isinstance(schedule, ScheduledPrompt) else read_emphasis(text, emphasis)
    if required:
        words = [item.text if isinstance(item, WeightedPrompt) else item for item in steps_read or [read]]
        check_prompt(" ".join(words))
    return read


def has_emphasis(text: str) -> bool:
    """Whether ``text`` reads otherwise with emphasis than as plain words (weights, ``BREAK`` or escapes)."""
    try:
        return read_emphasis(text) != text
    except InvalidInputError:  # a malformed weight is syntax too
        return True


# A line of an A1111 ``parameters`` text: the negative prompt's, or the settings' ("Steps: 20, Sampler: ...")
_PARAMETERS_LINE_RE = re.compile(r"^(Negative prompt:|Steps: *\d+ *,)", re.MULTILINE)


def parameters_line(text: str) -> str | None:
    """How a line of ``text`` starts when it is a line of an A1111 ``parameters`` text (``Negative prompt:``, or
    ``Steps: 20,`` of the settings), as a prompt pasted with its parameters holds; None when none is.

    A prompt with such a line is drawn with it as words, and cannot be recorded as itself: the PNG's ``parameters``
    text would read back with that line as the negative prompt or the settings.
    """
    pasted = _PARAMETERS_LINE_RE.search(text)
    return pasted.group(1) if pasted else None


def check_prompt(text: str) -> str:
    """Reject a prompt that says nothing: empty, or only whitespace and punctuation once normalised.

    Args:
        text: The prompt, normalised or not.

    Returns:
        ``text`` unchanged, so the call can wrap the value it checks.

    Raises:
        InvalidInputError: If the prompt is empty or not a string.
    """
    # Traditional or Simplified makes no difference to emptiness, so skip the OpenCC pass.
    normalized = normalize_prompt(text, to_simplified=False)
    if all(ch.isspace() or unicodedata.category(ch).startswith("P") for ch in normalized):
        raise InvalidInputError("prompt is empty; give a description of the image, e.g. 小桥流水人家")
    return text
