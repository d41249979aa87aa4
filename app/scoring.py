"""Scores of a generated answer against the reference answer, in any language: chrF (sacrebleu; character
n-grams, right for Chinese), ROUGE-L F1 (rouge-score, over words, or characters for CJK scripts) and
normalised exact match. No torch: the training process scores its answers with it, tests recompute them.
"""

from __future__ import annotations

import re
import unicodedata
from functools import cache
from typing import Literal, NotRequired, TypedDict

Metric = Literal["chrf", "rouge_l", "exact"]
METRICS: tuple[Metric, ...] = ("chrf", "rouge_l", "exact")
METRIC_LABELS = {"chrf": "chrF", "rouge_l": "ROUGE-L", "exact": "exact match"}

# One token per CJK character (those scripts do not separate words with spaces), else runs of letters/digits.
_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]|\w+")


class Scores(TypedDict):
    chrf: float  # 0-100
    rouge_l: float  # 0-100
    exact: float  # 0 or 100
    # chrF of the answer's first sentence against the reference's: where a long answer names what it is
    # about (a leaflet's product), which whole-answer chrF barely weighs
    opening: NotRequired[float]


def normalise(text: str) -> str:
    """Case, width, punctuation and spacing do not count."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_TOKEN.findall(text))


class _Tokenizer:
    """rouge-score's tokenizer interface; its default one drops every non-ASCII character."""

    def tokenize(self, text: str) -> list[str]:
        return normalise(text).split()


@cache
def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()


@cache
def _rouge():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"], tokenizer=_Tokenizer())


_SENTENCE_END = re.compile(r"[.!?。！？]\s|[。！？]|\n")
OPENING_CHARS = 200


def opening(text: str) -> str:
    """A text's first sentence, at most OPENING_CHARS characters."""
    text = text.strip()[: OPENING_CHARS + 1]
    end = _SENTENCE_END.search(text)
    return (text[: end.end()] if end else text[:OPENING_CHARS]).strip()


def score(answer: str, reference: str) -> Scores:
    return {
        "chrf": round(_chrf().sentence_score(answer, [reference]).score, 2),
        "rouge_l": round(100 * _rouge().score(reference, answer)["rougeL"].fmeasure, 2),
        "exact": 100.0 if normalise(answer) == normalise(reference) and normalise(reference) else 0.0,
        "opening": round(_chrf().sentence_score(opening(answer), [opening(reference)]).score, 2),
    }


def mean(scores: list[Scores]) -> Scores | None:
    if not scores:
        return None

    def average(metric: Metric) -> float:
        return round(sum(s[metric] for s in scores) / len(scores), 2)

    return Scores(chrf=average("chrf"), rouge_l=average("rouge_l"), exact=average("exact"))
