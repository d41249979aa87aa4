"""The optional LLM judge: each scored answer is graded against its reference by a model behind an
OpenAI-compatible chat API (this server's own /v1 serving a bigger registered model, or an endpoint the
operator lists in TUNEBOARD_JUDGE_URL; only the first listed gets TUNEBOARD_JUDGE_API_KEY), with a stated
rubric. The score (1-10) and the judge's one-line reason are stored with the answer.

Judging runs in a background thread of the training process: training goes on while the judge answers
(a remote judge costs this machine nothing but the wait; this server's own /v1 shares its CPU or GPU with
training). A judge that cannot be reached or whose reply cannot be read leaves a reason saying so and no
score; it never fails the run. A failure's reason is our own sentence, never the endpoint's reply text.
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
    """(base URL, API key): the run's URL when the operator lists it (TUNEBOARD_JUDGE_URL), with the key
    only for the first listed; or, for a run naming none, the web server's own /v1 with its token, at the
    address the worker was given (TUNEBOARD_SERVER_URL on another machine, else the host and port the
    server passes to its worker). ValueError for a URL not listed (a run made under other settings)."""
    if params.url:
        url = params.url.rstrip("/")
        allowed = settings.judge_urls
        if url not in allowed:
            raise ValueError(f"The judge URL {url} is not among this server's judge endpoints.")
        secret = settings.judge_api_key if url == allowed[0] else None
        return url, secret.get_secret_value() if secret else "none"
    token = settings.token.get_secret_value() if settings.token else "none"
    if settings.server_url:
        return settings.server_url.rstrip("/") + "/v1", token
    host = "127.0.0.1" if settings.host in WILDCARD_HOSTS else settings.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.port}/v1", token


def failure(exc: Exception) -> str:
    """What went wrong, in words of our own: the endpoint's reply text is not repeated (it may be any
    service's page); the worker's log keeps it for the operator."""
    from openai import APIConnectionError, APIStatusError, APITimeoutError

    if isinstance(exc, APIStatusError):
        return f"it answered HTTP {exc.status_code}"
    if isinstance(exc, APITimeoutError):
        return f"no answer within {TIMEOUT_SECONDS} s"
    if isinstance(exc, APIConnectionError):
        return "it could not be reached"
    return f"its reply could not be read: {type(exc).__name__}"


class Judge:
    """Grades answers in a background thread and hands each verdict to the sink."""

    def __init__(self, params: JudgeParams, settings: Settings, sink: Sink, client=None):
        from openai import OpenAI

        self.params, self.sink, self.refused = params, sink, None
        try:
            self.url, key = endpoint(params, settings)
        except ValueError as exc:  # every answer gets this sentence; nothing is sent anywhere
            self.url, key, self.refused = params.url or "", "none", str(exc)
        self.rubric = params.rubric or RUBRIC
        self.client = client or OpenAI(
            base_url=self.url or None, api_key=key, timeout=TIMEOUT_SECONDS, max_retries=2
        )
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
        if self.refused:
            return Verdict(None, self.refused)
        try:
            response = self.client.chat.completions.create(
                model=self.params.model,
                messages=messages(self.rubric, question, reference, answer),
                temperature=0,
                max_tokens=REPLY_TOKENS,
            )
        except Exception as exc:  # the judge is optional: its failure is recorded, never raised
            log.warning("the judge at %s could not answer: %s", self.url, _line(str(exc)))
            return Verdict(None, f"The judge at {self.url} could not answer ({failure(exc)}).")
        return parse(response.choices[0].message.content or "")

    def close(self, timeout: float | None = None) -> None:
        """Wait for the verdicts still being written (at most `timeout` seconds), then stop."""
        wait(self.pending, timeout=timeout)
        self.pool.shutdown(wait=False, cancel_futures=True)
