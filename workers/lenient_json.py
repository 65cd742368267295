"""Lenient JSON extraction from model text: the answer object, wherever and however written.

Language models wrap their JSON in reasoning, a MedGemma 1.5 thinking trace
(``<unused94>`` ... ``<unused95>``), "Final Answer:", code fences or nothing at all, and
write almost-JSON: Python literals, single or typographic quotes, comments, trailing or
missing commas, full-width punctuation, output cut off by the token limit. This module
finds and decodes that value and knows nothing about what it means; the pre-read parser
(:mod:`workers.parsing`) and the follow-up answer parsers interpret it.

Public API: :func:`extract_json` -> :class:`DecodedAnswer`, :func:`strip_thinking`,
:func:`strip_fences`. Nothing here raises on any ``str``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["NUMBER", "DecodedAnswer", "extract_json", "strip_fences", "strip_thinking"]

_MAX_DEPTH = 40
_MAX_BARE_STARTS = 24
_MAX_SEQUENCE = 200  # consecutive top-level objects read as one list


# --------------------------------------------------------------------------- cleaning

_THINK_OPEN = "<unused94>"
_THINK_CLOSE = "<unused95>"
_SPECIAL_TOKENS = re.compile(
    r"<start_of_turn>(?:model|user)?|<end_of_turn>|<eos>|<bos>|<pad>|"
    r"<start_of_image>|<end_of_image>|<image_soft_token>|<unused\d+>"
)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd\ufeff]")
_FINAL_ANSWER = re.compile(r"final\s*answer\s*\**\s*[:：]", re.IGNORECASE)


def strip_thinking(text: str, warnings: list[str] | None = None) -> str:
    """``text`` without its ``<unused94>…<unused95>`` thinking traces.

    An unterminated trace ends at the last "Final Answer:" after it when there is one,
    else it runs to the end of the text; a closing tag without an opening one drops the
    text before it. Each such repair adds a sentence to ``warnings`` when given.
    """
    if warnings is None:
        warnings = []
    out: list[str] = []
    pos = 0
    while True:
        start = text.find(_THINK_OPEN, pos)
        if start < 0:
            out.append(text[pos:])
            break
        out.append(text[pos:start])
        end = text.find(_THINK_CLOSE, start)
        if end >= 0:
            pos = end + len(_THINK_CLOSE)
            continue
        rest = text[start + len(_THINK_OPEN) :]
        answers = list(_FINAL_ANSWER.finditer(rest))
        if answers:
            warnings.append("thinking trace not terminated; answer taken from 'Final Answer:'")
            out.append(rest[answers[-1].start() :])
        else:
            warnings.append("thinking trace not terminated and no answer after it")
        break
    # A stray closing tag: everything before it was a trace whose opening tag was lost.
    joined = "".join(out)
    if _THINK_CLOSE in joined:
        warnings.append("thinking trace closed without opening; text before it dropped")
        joined = joined.rsplit(_THINK_CLOSE, 1)[1]
    return joined


def _clean(text: str, warnings: list[str]) -> str:
    """Thinking traces, special tokens and control characters removed; newlines as \\n."""
    text = strip_thinking(text, warnings)
    text = _SPECIAL_TOKENS.sub("", text)
    text = _CONTROL.sub("", text)
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


# ------------------------------------------------------------------ lenient decoding


class _SyntaxErr(Exception):
    pass


#: A number as the decoder reads it (also inside strings such as "612, 238").
NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_WORD = re.compile(r"[A-Za-z_\u4e00-\u9fff][A-Za-z0-9_\-\u4e00-\u9fff]*")
_CONSTANTS: dict[str, Any] = {
    "true": True,
    "false": False,
    "null": None,
    "none": None,
    "nan": None,
    "infinity": None,
    "undefined": None,
}
_CLOSING_QUOTE = {'"': '"', "'": "'", "“": "”", "‘": "’", "「": "」"}
_COMMAS = ",，、"
_COLONS = ":：="
_AFTER_STRING = ",:=}])\n\r#/\"'，：、；;"
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "/": "/"}


class _LenientDecoder:
    """A small recursive-descent reader for JSON as language models write it.

    Accepts JSON plus: single or typographic quotes, Python literals (True/False/None,
    tuples), unquoted keys and bare-word values, // # /* */ comments, trailing or missing
    commas, full-width commas and colons. At end of input it returns what it has with
    ``complete=False``: a list keeps only its complete elements, so a findings list cut
    mid-object keeps the objects before the cut.
    """

    def __init__(self, text: str, pos: int, stop: int) -> None:
        self.s = text if stop >= len(text) else text[:stop]
        self.i = pos
        self.n = len(self.s)
        self.dropped_partial = 0  # objects or lists cut by the end of input and dropped

    def _skip(self) -> None:
        s, n = self.s, self.n
        while self.i < n:
            c = s[self.i]
            if c.isspace():
                self.i += 1
            elif c == "#" or s.startswith("//", self.i):
                nl = s.find("\n", self.i)
                self.i = n if nl < 0 else nl + 1
            elif s.startswith("/*", self.i):
                end = s.find("*/", self.i + 2)
                self.i = n if end < 0 else end + 2
            else:
                return

    def value(self, depth: int = 0) -> tuple[Any, bool]:
        if depth > _MAX_DEPTH:
            raise _SyntaxErr("nested too deeply")
        self._skip()
        if self.i >= self.n:
            return None, False
        c = self.s[self.i]
        if c == "{":
            return self._object(depth)
        if c in "[(":
            return self._list(depth)
        if c in _CLOSING_QUOTE:
            return self._string()
        m = NUMBER.match(self.s, self.i)
        if m:
            self.i = m.end()
            text = m.group()
            number: float | int
            try:
                number = int(text)
            except ValueError:
                number = float(text)
            return number, self.i < self.n  # a number at the very end may have been cut
        m = _WORD.match(self.s, self.i)
        if m:
            self.i = m.end()
            word = m.group()
            if word.lower() in _CONSTANTS:
                return _CONSTANTS[word.lower()], True
            return word, self.i < self.n
        raise _SyntaxErr(f"unexpected {c!r} at {self.i}")

    def _string(self) -> tuple[str, bool]:
        quote = self.s[self.i]
        closing = _CLOSING_QUOTE[quote]
        if quote == "“":
            closing = '”"'
        self.i += 1
        out: list[str] = []
        s, n = self.s, self.n
        while self.i < n:
            c = s[self.i]
            if c in closing and (c not in "\"'" or self._ends_string(self.i + 1)):
                self.i += 1
                return "".join(out), True
            if c == "\\" and self.i + 1 < n:
                e = s[self.i + 1]
                if e == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", s[self.i + 2 : self.i + 6]):
                    out.append(chr(int(s[self.i + 2 : self.i + 6], 16)))
                    self.i += 6
                    continue
                out.append(_ESCAPES.get(e, e))
                self.i += 2
                continue
            out.append(c)
            self.i += 1
        return "".join(out), False

    def _ends_string(self, j: int) -> bool:
        """A straight quote closes a string only before a delimiter; otherwise it is an
        unescaped quote inside the text (``"a "coin" lesion"``, ``'patient's'``)."""
        while j < self.n and self.s[j] in " \t":
            j += 1
        return j >= self.n or self.s[j] in _AFTER_STRING

    def _object(self, depth: int) -> tuple[dict[str, Any], bool]:
        self.i += 1
        obj: dict[str, Any] = {}
        while True:
            self._skip()
            if self.i >= self.n:
                return obj, False
            c = self.s[self.i]
            if c == "}":
                self.i += 1
                return obj, True
            if c in _COMMAS:
                self.i += 1
                continue
            key, complete = self.value(depth + 1)
            if not complete:
                return obj, False
            if isinstance(key, dict | list):
                raise _SyntaxErr("container used as a key")
            self._skip()
            if self.i >= self.n:
                return obj, False
            if self.s[self.i] not in _COLONS:
                raise _SyntaxErr(f"expected ':' at {self.i}")
            self.i += 1
            val, complete = self.value(depth + 1)
            obj[str(key)] = val
            if not complete:
                return obj, False

    def _list(self, depth: int) -> tuple[list[Any], bool]:
        self.i += 1
        items: list[Any] = []
        while True:
            self._skip()
            if self.i >= self.n:
                return items, False
            c = self.s[self.i]
            if c in "])":  # either closer: models mix tuples and lists
                self.i += 1
                return items, True
            if c in _COMMAS:
                self.i += 1
                continue
            if c == "}":
                raise _SyntaxErr(f"unbalanced '}}' at {self.i}")
            val, complete = self.value(depth + 1)
            if not complete:
                if isinstance(val, dict | list):
                    self.dropped_partial += 1
                return items, False
            items.append(val)


def _decode_at(text: str, pos: int, stop: int) -> tuple[Any, bool, int, int]:
    """Decode one value at ``pos`` reading no further than ``stop``; consecutive
    top-level objects become a list.

    Returns (value, complete, end offset, number of partial objects dropped at a cut).
    """
    dec = _LenientDecoder(text, pos, stop)
    value, complete = dec.value()
    if complete and isinstance(value, dict):
        seq = [value]
        while len(seq) < _MAX_SEQUENCE:
            save = dec.i
            dec._skip()
            if dec.i < dec.n and dec.s[dec.i] in _COMMAS:
                dec.i += 1
                dec._skip()
            if dec.i < dec.n and dec.s[dec.i] == "{":
                try:
                    nxt, ok = dec.value()
                except _SyntaxErr:
                    dec.i = save
                    break
                if ok and isinstance(nxt, dict):
                    seq.append(nxt)
                    continue
                complete = False
                dec.dropped_partial += 1
                break
            dec.i = save
            break
        if len(seq) > 1:
            value = seq
    return value, complete, dec.i, dec.dropped_partial


# ---------------------------------------------------------------- where the answer starts

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)


@dataclass(frozen=True)
class _Candidate:
    start: int  # where decoding starts, offset in the cleaned text
    stop: int  # where the input ends for it: a fence's end, else the end of the text
    fenced: bool
    after_final: bool


def _candidates(text: str) -> Iterator[_Candidate]:
    """Places where the answer JSON may start, most likely first."""
    finals = list(_FINAL_ANSWER.finditer(text))
    regions: list[tuple[int, bool]] = []
    if finals:
        regions.append((finals[-1].end(), True))
    regions.append((0, False))
    seen: set[int] = set()
    for region_start, after_final in regions:
        region = text[region_start:]
        fences = list(_FENCE.finditer(region))
        # json-labelled fences first, then unlabelled or other labels
        fences.sort(key=lambda m: (m.group(1).lower() != "json", m.start()))
        for m in fences:
            body_start = region_start + m.start(2)
            body = m.group(2)
            first = _first_open(body)
            if first is None:
                continue
            start = body_start + first
            if start not in seen:
                seen.add(start)
                yield _Candidate(start, region_start + m.end(2), True, after_final)
        count = 0
        for i in range(region_start, len(text)):
            if text[i] in "{[":
                if i not in seen:
                    seen.add(i)
                    yield _Candidate(i, len(text), False, after_final)
                count += 1
                if count >= _MAX_BARE_STARTS:
                    break


def _first_open(body: str) -> int | None:
    for i, c in enumerate(body):
        if c in "{[(":
            return i
        if not c.isspace() and i > 40:
            return None
    return None


def strip_fences(text: str) -> str:
    """``text`` without its fenced code blocks (an unclosed fence runs to the end)."""
    return _FENCE.sub("", text)


# ---------------------------------------------------------------- entry point


@dataclass(frozen=True)
class DecodedAnswer:
    """What :func:`extract_json` found in one model answer.

    found: False when no accepted JSON value could be recovered (``value`` is then None).
    value: the decoded value (dicts, lists, str, int, float, bool, None).
    warnings: one sentence per repair: an unterminated thinking trace, malformed JSON
        skipped before the value that was read.
    truncated: the value was cut off by the end of the text (or of its fence); lists keep
        only their complete elements.
    dropped_partial: objects or lists cut by the end and dropped.
    text: the cleaned text (traces, special tokens and control characters removed).
    text_outside: ``text`` without the decoded value and without code fences: the prose
        around the answer.
    """

    found: bool
    value: Any
    warnings: tuple[str, ...]
    truncated: bool
    dropped_partial: int
    text: str
    text_outside: str


def _any_container(value: Any) -> bool:
    return isinstance(value, dict | list)


def extract_json(text: str, accept: Callable[[Any], bool] = _any_container) -> DecodedAnswer:
    """The answer value in a model's ``text``: the first decodable value that ``accept``
    takes, trying a fenced block after the last "Final Answer:" first, then bare JSON after
    it, then the same in the whole text. An empty list counts only when it is fenced or
    follows "Final Answer:" (a bare ``[]`` in reasoning prose is not an answer).
    """
    warnings: list[str] = []
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    elif not isinstance(text, str):
        text = str(text)
    cleaned = _clean(text, warnings)
    first_error: str | None = None
    decoded_until = -1  # bare starts inside a value already decoded are not retried
    for cand in _candidates(cleaned):
        if not cand.fenced and cand.start < decoded_until:
            continue
        try:
            value, complete, end, dropped = _decode_at(cleaned, cand.start, cand.stop)
        except _SyntaxErr as exc:
            first_error = first_error or str(exc)
            continue
        if not accept(value):
            decoded_until = max(decoded_until, end)
            continue
        if isinstance(value, list) and not value and not (cand.fenced or cand.after_final):
            continue
        if first_error is not None:
            warnings.append(f"malformed JSON ({first_error}); recovered the readable part")
        outside = strip_fences(cleaned[: cand.start] + "\n" + cleaned[end:])
        return DecodedAnswer(True, value, tuple(warnings), not complete, dropped, cleaned, outside)
    return DecodedAnswer(False, None, tuple(warnings), False, 0, cleaned, strip_fences(cleaned))
