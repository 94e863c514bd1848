"""Reading the judge: scores and boxes from free text, and the expected score from digit-token probabilities.

The text parsers never raise: anything they cannot read is `None`, which the judge scores 0 and counts.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

import torch

MAX_ANSWER_CHARS = 4096  # judge answers are a few dozen tokens; longer text is cut before scanning
_NUM = r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"  # JSON's number grammar, leading zeros allowed
_SCORE_KEY_RE = re.compile(rf"""["']?score["']?\s*[:=]\s*["']?({_NUM})""", re.IGNORECASE)
_PLAIN_RE = re.compile(rf"(?:score\s*[:=]?\s*)?({_NUM})\s*(?:/\s*10|out of 10)?\s*\.?", re.IGNORECASE)
_BRACKET_BOX_RE = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")
_POINTS_BOX_RE = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")
BOX_KEYS = ("bbox_2d", "bbox", "box")

Box = tuple[float, float, float, float]


def _json_values(text: str) -> Iterator[Any]:
    """Every JSON object or array embedded in `text` (code fences, prose around it), left to right."""
    decoder = json.JSONDecoder()
    i = 0
    while (i := _next_open(text, i)) >= 0:
        try:
            value, end = decoder.raw_decode(text, i)
        except (ValueError, RecursionError):
            i += 1
            continue
        yield value
        i = end


def _next_open(text: str, start: int) -> int:
    hits = [p for p in (text.find("{", start), text.find("[", start)) if p >= 0]
    return min(hits) if hits else -1


def _number(value: Any) -> float | None:
    """A finite real from a JSON number or numeric string; booleans are not numbers here."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        if not re.fullmatch(_NUM, value):
            return None
    if isinstance(value, (int, float, str)):
        out = float(value)
        return out if math.isfinite(out) else None
    return None


def _find_key(value: Any, keys: tuple[str, ...]) -> Iterator[Any]:
    """Depth-first values stored under any of `keys` (case-insensitive) in nested dicts/lists."""
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and k.lower() in keys:
                yield v
        for v in value.values():
            yield from _find_key(v, keys)
    elif isinstance(value, list):
        for v in value:
            yield from _find_key(v, keys)


def parse_score(text: str, lo: int, hi: int) -> float | None:
    """The judge's score in [lo, hi] from `text`, or None.

    Accepted shapes, first match wins: a JSON object anywhere with a `score` key (nested or not, number or numeric
    string; e.g. ```json {"reasoning": "...", "score": 8}```), a truncated or single-quoted `"score": 8`, or a
    plain answer `8`, `8/10`, `Score: 8`. A value outside [lo, hi] is a wrong answer, hence None.
    """
    text = text[:MAX_ANSWER_CHARS]
    candidates: list[float | None] = []
    for value in _json_values(text):
        candidates.extend(_number(v) for v in _find_key(value, ("score",)))
        if candidates:
            break
    if not candidates and (m := _SCORE_KEY_RE.search(text)):
        candidates.append(_number(m.group(1)))
    if not candidates and (m := _PLAIN_RE.fullmatch(text.strip())):
        candidates.append(_number(m.group(1)))
    score = candidates[0] if candidates else None
    return score if score is not None and lo <= score <= hi else None


def _box(values: Any) -> Box | None:
    if not isinstance(values, (list, tuple)) or len(values) != 4:
        return None
    nums = [_number(v) for v in values]
    if any(v is None for v in nums):
        return None
    x1, y1, x2, y2 = nums  # type: ignore[misc]
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def parse_box(text: str) -> Box | None:
    """The first box of a grounding answer as `(x1, y1, x2, y2)` with x1<=x2, y1<=y2, in the judge's frame.

    Qwen2.5-VL answers ```json [{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}]```; also accepted: a bare
    `{"bbox_2d": ...}`, keys `bbox`/`box`, a bare `[x1, y1, x2, y2]` anywhere (also inside truncated JSON) and
    `(x1,y1),(x2,y2)`. Corners given in reverse are the same rectangle, so they are sorted, not rejected.
    """
    text = text[:MAX_ANSWER_CHARS]
    for value in _json_values(text):
        for candidate in _find_key(value, BOX_KEYS):
            if (box := _box(candidate)) is not None:
                return box
        if (box := _box(value)) is not None:
            return box
    for pattern in (_BRACKET_BOX_RE, _POINTS_BOX_RE):
        for m in pattern.finditer(text):
            if (box := _box(list(m.groups()))) is not None:
                return box
    return None


def expected_score(logp_first: torch.Tensor, logp_after_one: torch.Tensor, lo: int) -> torch.Tensor:
    """E[score] over the valid answers lo..10 from digit-token log-probabilities; NaN (unparsable) where a row
    holds a NaN or +inf, or puts no mass on the valid first digits lo..9.

    `logp_first[:, d]` is log P(first answer token = "d") and `logp_after_one[:, d]` is log P(next token = "d" |
    first token "1"), both over the full vocabulary (shape `[N, 10]`). With digits tokenised one by one (Qwen),
    every valid answer but 10 is one digit, and "1" is ambiguous: it is 10 when followed by "0" and 1 when followed
    by a non-digit. So the first-token mass over the valid first digits lo..9 is renormalised, and the mass of "1"
    is split by p10 = P("0" | "1") / (P("0" | "1") + P(non-digit | "1")); "1" followed by 1..9 (11..19) is
    invalid and dropped. Exact under the assumption that the other first digits end the answer (the only valid
    continuation for them). A log-prob of -inf is a probability of 0 (a judge that masks tokens, a 16-bit
    underflow), not a broken answer.
    """
    if lo not in (0, 1):
        raise ValueError(f"score scales start at 0 or 1, got {lo}")
    first = logp_first.double()[:, lo:].softmax(-1)  # P(first digit = lo..9 | a valid first digit)
    after = logp_after_one.double()
    p_zero = after[:, 0].exp()
    p_end = (1 - after.exp().sum(-1)).clamp_min(0)
    p10 = p_zero / (p_zero + p_end).clamp_min(1e-300)
    digits = torch.arange(lo, 10, dtype=torch.float64)
    one = 1 - lo  # column of "1" in `first`
    value = (first * digits).sum(-1) + first[:, one] * 9 * p10  # "1" -> 10 adds 9 to the 1 already counted
    broken = (logp_first.isnan() | logp_first.isposinf()).any(-1) \
        | (logp_after_one.isnan() | logp_after_one.isposinf()).any(-1)
    no_mass = logp_first[:, lo:].isneginf().all(-1)  # the softmax above is 0/0 there
    return torch.where(broken | no_mass, torch.nan, value)


def scale_score(score: torch.Tensor | float, lo: int, hi: int) -> torch.Tensor:
    """A score on lo..hi mapped linearly onto [0, 1] (R_spa's 1..10 -> (s-1)/9, 0..10 -> s/10)."""
    return ((torch.as_tensor(score, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
