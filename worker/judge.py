"""The optional LLM judge: each scored answer is graded against its reference by a model behind an
OpenAI-compatible chat API (this server's own /v1 serving a bigger registered model, or another endpoint;
only TUNEBOARD_JUDGE_URL's gets TUNEBOARD_JUDGE_API_KEY), with a stated rubric. The score (1-10) and the
judge's one-line reason are stored with the answer.

Judging runs in a background thread of the training process: training goes on while the judge answers
(a remote judge costs this machine nothing but the wait; this server's own /v1 shares its CPU or GPU with
training). A judge that cannot be reached or whose reply cannot be read leaves a reason saying so and no
score; it never fails the run.
"""

from __future__ import annotations

import json
import logging
import re
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.config import WILDCARD_HOSTS, Settings
from app.runs.config import JudgeParams
from worker.sink import Sink

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

log = logging.getLogger("tuneboard.train")

RUBRIC = """You grade an answer to a question against the reference answer.
Score it from 1 to 10 for how far it states the reference's facts correctly:
10 = every fact of the reference, nothing contradicting it;
7 = the main fact right, some details missing;
4 = partly right, or right facts mixed with wrong ones;
1 = wrong, unrelated or empty.
Wording, style and length do not matter; facts do. Facts the reference does not mention neither add nor
subtract, unless they contradict it."""

REPLY = 'Reply with JSON only, on one line: {"score": <1-10>, "reason": "<one short sentence>"}'
REPLY_TOKENS = 120
TIMEOUT_SECONDS = 120


@dataclass(frozen=True)
class Verdict:
    score: float | None  # None: no score could be read
    reason: str


def messages(rubric: str, question: str, reference: str, answer: str) -> list[ChatCompletionMessageParam]:
    graded = f"Question:\n{question}\n\nReference answer:\n{reference}\n\nAnswer to grade:\n{answer}"
    return [
        {"role": "system", "content": f"{rubric}\n\n{REPLY}"},
        {"role": "user", "content": graded},
    ]


def parse(reply: str) -> Verdict:
    """The score and reason in a judge's reply: its JSON object, or failing that a "score: N" it wrote;
    a score outside 1-10 or none at all is no score, with the reply quoted as the reason."""
    found = re.search(r"\{.*?\}", reply, re.DOTALL)
    if found:
        try:
            data = json.loads(found.group(0))
        except ValueError:
            data = None
        if isinstance(data, dict):
            score, reason = data.get("score"), str(data.get("reason") or "").strip()
            if isinstance(score, int | float) and not isinstance(score, bool) and 1 <= score <= 10:
                return Verdict(float(score), _line(reason) or "(no reason given)")
    loose = re.search(r"score\W{0,3}(\d+(?:\.\d+)?)", reply, re.IGNORECASE)
    if loose and 1 <= float(loose.group(1)) <= 10:
        return Verdict(float(loose.group(1)), _line(reply))
    return Verdict(None, _line(f"The judge's reply had no score from 1 to 10: {reply.strip()!r}"))


def _line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def endpoint(params: JudgeParams, settings: Settings) -> tuple[str, str]:
    """(base URL, API key): the run's URL, with the server's judge key only when it is the server's judge
    endpoint (a run cannot send the key anywhere else); or this server's own /v1 with its token."""
    if params.url:
        url = params.url.rstrip("/")
        configured = (settings.judge_url or "").rstrip("/")
        secret = settings.judge_api_key if url == configured else None
        return url, secret.get_secret_value() if secret else "none"
    host = "127.0.0.1" if settings.host in WILDCARD_HOSTS else settings.host
    host = f"[{host}]" if ":" in host else host
    return (
        f"http://{host}:{settings.port}/v1",
        settings.token.get_secret_value() if settings.token else "none",
    )


class Judge:
    """Grades answers in a background thread and hands each verdict to the sink."""

    def __init__(self, params: JudgeParams, settings: Settings, sink: Sink, client=None):
        from openai import OpenAI

        url, key = endpoint(params, settings)
        self.params, self.sink, self.url = params, sink, url
        self.rubric = params.rubric or RUBRIC
        self.client = client or OpenAI(base_url=url, api_key=key, timeout=TIMEOUT_SECONDS, max_retries=2)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge")
        self.pending: list[Future] = []

    def submit(self, *, step: int, split: str, items: list[tuple[int, str, str, str]]) -> None:
        """Grade (row, question, reference, answer) items of one evaluation, in the background."""
        self.pending = [f for f in self.pending if not f.done()]
        self.pending.append(self.pool.submit(self._grade, step, split, items))

    def _grade(self, step: int, split: str, items: list[tuple[int, str, str, str]]) -> None:
        verdicts = {}
        for row, question, reference, answer in items:
            verdicts[row] = self.grade(question, reference, answer)
        scores = [v.score for v in verdicts.values() if v.score is not None]
        log.info(
            "judge at step %d, %s rows: %d of %d scored, mean %s",
            step,
            split,
            len(scores),
            len(verdicts),
            f"{sum(scores) / len(scores):.2f}" if scores else "—",
        )
        self.sink.judged(
            step=step, split=split, verdicts={r: (v.score, v.reason) for r, v in verdicts.items()}
        )

    def grade(self, question: str, reference: str, answer: str) -> Verdict:
        try:
            response = self.client.chat.completions.create(
                model=self.params.model,
                messages=messages(self.rubric, question, reference, answer),
                temperature=0,
                max_tokens=REPLY_TOKENS,
            )
        except Exception as exc:  # the judge is optional: its failure is recorded, never raised
            return Verdict(None, _line(f"The judge at {self.url} could not answer: {exc}"))
        return parse(response.choices[0].message.content or "")

    def close(self, timeout: float | None = None) -> None:
        """Wait for the verdicts still being written (at most `timeout` seconds), then stop."""
        wait(self.pending, timeout=timeout)
        self.pool.shutdown(wait=False, cancel_futures=True)
