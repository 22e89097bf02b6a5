"""AUTOMATIC1111's prompt editing and alternation: a prompt whose words change with the denoising step.

- ``[from:to:when]`` draws with ``from`` up to step ``when`` and with ``to`` after it; ``[to:when]`` adds ``to``
  after ``when``, ``[from::when]`` removes ``from`` after it. ``when`` written with a point (``0.25``) is a
  fraction of the steps, a whole number (``10``) a step number (A1111's rule since 1.6). In the hires fix's second
  pass, as in A1111 since 1.6, a fraction from 1 to 2 is of the second pass's steps (``[a:b:1.5]`` changes halfway
  through it, ``[a:b:0.5]`` has changed before it) and a whole number counts on from the first pass's steps.
- ``[a|b|c]`` alternates: ``a`` at step 1, ``b`` at step 2, … (steps counted from 1).

Everything else — emphasis ``(words:1.3)``, ``[words]``, escapes — stays text in each step's prompt, read later by
:func:`taiyi.prompts.read_emphasis`. A colon may be full-width (``：``), as Chinese normalisation writes it after a
Chinese word. A bracket that closes nothing, or whose content is none of these forms, is text.

>>> schedule = read_schedule("[山水:小桥:0.5]，夜晚")
>>> schedule.at_step(1, 10), schedule.at_step(6, 10)
('山水，夜晚', '小桥，夜晚')
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidInputError

__all__ = ["ScheduledPrompt", "read_schedule"]

_NUMBER_RE = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*")  # A1111's (lark's) SIGNED_NUMBER
_COLONS = ":："
MAX_NESTING = 32
_OPEN_CLOSE = {"[": "]", "(": ")"}


@dataclass(frozen=True)
class _Scheduled:
    before: tuple | None  # None: [to:when], nothing before
    after: tuple
    when: str  # as written: a point makes it a fraction of the steps


@dataclass(frozen=True)
class _Alternate:
    options: tuple[tuple, ...]


@dataclass(frozen=True)
class ScheduledPrompt:
    """A prompt with prompt editing or alternation; :meth:`at_step` gives its words at a step, :meth:`item_at` them
    read with ``emphasis`` (one of :data:`taiyi.prompts.EMPHASIS_MODES`), as the text encoder takes them."""

    parts: tuple  # text pieces (str), _Scheduled and _Alternate nodes
    emphasis: str = "original"

    def at_step(self, step: int, steps: int, first_pass: int | None = None) -> str:
        """The prompt at ``step`` (1 … ``steps``) of a run of ``steps``, as A1111's ``at_step``; ``first_pass`` is
        the first pass's steps when the run is the hires fix's second pass."""
        return _render(self.parts, step, steps, first_pass)

    def item_at(self, step: int, steps: int, first_pass: int | None = None):
        """:meth:`at_step` read with the prompt's emphasis: a string or a :class:`~taiyi.prompts.WeightedPrompt`."""
        from .prompts import read_emphasis

        return read_emphasis(self.at_step(step, steps, first_pass), self.emphasis)

    def texts(self, steps: int) -> list[str]:
        """The prompt at each step 1 … ``steps`` (index 0 is step 1)."""
        return [self.at_step(step, steps) for step in range(1, steps + 1)]

    def variants(self) -> list[str]:
        """Prompts that hold every word the prompt can take at some step of some run (each edit before and after its
        step, each alternation at each of its options): to check them all before drawing."""
        turns = range(_most_options(self.parts))
        return list(dict.fromkeys(_fixed(self.parts, before, turn) for before in (True, False) for turn in turns))


def _when(node: _Scheduled, steps: int, first_pass: int | None = None) -> int:
    """The last step of ``before`` (0 or less: none), as A1111's ``collect_steps``."""
    value = float(node.when)
    if "." in node.when:  # a fraction: of the first pass from 0 to 1, of the hires fix's second pass from 1 to 2
        at = (value - (first_pass is not None)) * steps
    else:  # a step number, counted on over both passes
        at = value - (first_pass or 0)
    return int(max(-1.0, min(float(steps), at)))  # clamped first: "[a:b:1e999]" is infinite


def _render(parts: tuple, step: int, steps: int, first_pass: int | None) -> str:
    out = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
        elif isinstance(part, _Scheduled):
            chosen = (part.before or ()) if step <= _when(part, steps, first_pass) else part.after
            out.append(_render(chosen, step, steps, first_pass))
        else:
            out.append(_render(part.options[(step - 1) % len(part.options)], step, steps, first_pass))
    return "".join(out)


def _most_options(parts: tuple) -> int:
    most = 1
    for part in parts:
        if isinstance(part, _Scheduled):
            most = max(most, _most_options(part.before or ()), _most_options(part.after))
        elif isinstance(part, _Alternate):
            most = max(most, len(part.options), *(_most_options(option) for option in part.options))
    return most


def _fixed(parts: tuple, before: bool, turn: int) -> str:
    """``parts`` with every edit ``before`` its step or after it, every alternation at option ``turn`` (cycled)."""
    out = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
        elif isinstance(part, _Scheduled):
            out.append(_fixed((part.before or ()) if before else part.after, before, turn))
        else:
            out.append(_fixed(part.options[turn % len(part.options)], before, turn))
    return "".join(out)


def _unescaped(text: str, start: int = 0):
    """``(index, character)`` of ``text`` from ``start``, escaped characters (``\\x``) left out."""
    i = start
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        yield i, text[i]
        i += 1


def _closing(text: str, start: int) -> int | None:
    """Where the bracket opened at ``text[start]`` closes (nested pairs and escapes skipped); None if it never does."""
    opener, closer = text[start], _OPEN_CLOSE[text[start]]
    depth = 0
    for i, ch in _unescaped(text, start):
        if ch == opener:
            depth += 1
        elif ch == closer:
            depth -= 1
            if depth == 0:
                return i
    return None


def _split_top(text: str, separators: str) -> list[str]:
    """``text`` split at the separators outside brackets and escapes."""
    parts, depth, start = [], 0, 0
    for i, ch in _unescaped(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth = max(0, depth - 1)
        elif ch in separators and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _parse(text: str) -> tuple:
    parts: list = []
    plain = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            plain.append(text[i : i + 2])
            i += 2
            continue
        end = _closing(text, i) if ch in _OPEN_CLOSE else None
        if end is None:
            plain.append(ch)
            i += 1
            continue
        inner = text[i + 1 : end]
        node = _node(inner) if ch == "[" else None
        if node is None:  # emphasis, or brackets of words: kept as text, with what they hold parsed
            inside = _parse(inner)
            if all(isinstance(p, str) for p in inside):
                plain.append(text[i : end + 1])
            else:
                parts += ["".join(plain) + ch, *inside]
                plain = [_OPEN_CLOSE[ch]]
        else:
            parts += ["".join(plain), node]
            plain = []
        i = end + 1
    parts.append("".join(plain))
    return tuple(p for p in parts if p != "")


def _node(inner: str) -> _Scheduled | _Alternate | None:
    """The node ``[inner]`` is: an alternation (a ``|`` outside brackets), a schedule (``:`` then a number at the
    end), or None (emphasis ``[words]``)."""
    options = _split_top(inner, "|")
    if len(options) > 1:
        return _Alternate(tuple(_parse(option) for option in options))
    pieces = _split_top(inner, _COLONS)
    if len(pieces) in (2, 3):
        number = _NUMBER_RE.fullmatch(pieces[-1])
        if number is not None:
            before = _parse(pieces[0]) if len(pieces) == 3 else None
            return _Scheduled(before, _parse(pieces[-2]), number.group(1))
    return None


def _depth(text: str) -> int:
    """How deep brackets of either kind nest in ``text`` (escapes skipped, closers of nothing ignored)."""
    depth = most = 0
    for _, ch in _unescaped(text):
        if ch in "([":
            depth += 1
            most = max(most, depth)
        elif ch in ")]":
            depth = max(0, depth - 1)
    return most


def read_schedule(text: str, emphasis: str = "original") -> str | ScheduledPrompt:
    """Read A1111's prompt editing and alternation in ``text``.

    Args:
        text: a prompt (normalised, if it is to be).
        emphasis: how each step's prompt is read (kept in the result).

    Returns:
        ``text`` itself when it holds neither, else a :class:`ScheduledPrompt`.

    Raises:
        InvalidInputError: brackets nested more than :data:`MAX_NESTING` deep.
    """
    if "[" not in text:
        return text
    if (depth := _depth(text)) > MAX_NESTING:  # the parser recurses per level (and rescans what each level holds)
        raise InvalidInputError(f"the prompt nests brackets {depth} deep; at most {MAX_NESTING} are read")
    parts = _parse(text)
    if all(isinstance(part, str) for part in parts):
        return text
    return ScheduledPrompt(parts, emphasis)
