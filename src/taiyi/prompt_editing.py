"""AUTOMATIC1111's prompt editing and alternation: a prompt whose words change with the denoising step.

- ``[from:to:when]`` draws with ``from`` up to step ``when`` and with ``to`` after it; ``[to:when]`` adds ``to``
  after ``when``, ``[from::when]`` removes ``from`` after it. ``when`` written with a point (``0.25``) is a
  fraction of the steps, a whole number (``10``) a step number (A1111's rule since 1.6).
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

__all__ = ["ScheduledPrompt", "read_schedule"]

_NUMBER_RE = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*")
_COLONS = ":："
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

    def at_step(self, step: int, steps: int) -> str:
        """The prompt at ``step`` (1 … ``steps``) of a run of ``steps``, as A1111's ``at_step``."""
        return _render(self.parts, step, steps)

    def item_at(self, step: int, steps: int):
        """:meth:`at_step` read with the prompt's emphasis: a string or a :class:`~taiyi.prompts.WeightedPrompt`."""
        from .prompts import read_emphasis

        return read_emphasis(self.at_step(step, steps), self.emphasis)

    def texts(self, steps: int) -> list[str]:
        """The prompt at each step 1 … ``steps`` (index 0 is step 1)."""
        return [self.at_step(step, steps) for step in range(1, steps + 1)]


def _when(node: _Scheduled, steps: int) -> int:
    value = float(node.when)
    at = value * steps if "." in node.when else value
    return min(steps, int(at))


def _render(parts: tuple, step: int, steps: int) -> str:
    out = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
        elif isinstance(part, _Scheduled):
            chosen = (part.before or ()) if step <= _when(part, steps) else part.after
            out.append(_render(chosen, step, steps))
        else:
            out.append(_render(part.options[(step - 1) % len(part.options)], step, steps))
    return "".join(out)


def _closing(text: str, start: int) -> int | None:
    """Where the bracket opened at ``text[start]`` closes (nested pairs and escapes skipped); None if it never does."""
    opener, closer = text[start], _OPEN_CLOSE[text[start]]
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == opener:
            depth += 1
        elif ch == closer:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _split_top(text: str, separators: str) -> list[str]:
    """``text`` split at the separators outside brackets and escapes."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth = max(0, depth - 1)
        elif ch in separators and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
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


def read_schedule(text: str, emphasis: str = "original") -> str | ScheduledPrompt:
    """Read A1111's prompt editing and alternation in ``text``.

    Args:
        text: a prompt (normalised, if it is to be).
        emphasis: how each step's prompt is read (kept in the result).

    Returns:
        ``text`` itself when it holds neither, else a :class:`ScheduledPrompt`.
    """
    if "[" not in text:
        return text
    parts = _parse(text)
    if all(isinstance(part, str) for part in parts):
        return text
    return ScheduledPrompt(parts, emphasis)
