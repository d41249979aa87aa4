"""Where a training process reports: the database (run by a worker) or just the log (run by hand)."""

from __future__ import annotations

import logging
from datetime import timedelta

from app.models import RunStatus, utcnow

log = logging.getLogger("tuneboard.train")


class Sink:
    """Reports to the log only: `tuneboard train run.yaml` without a database."""

    def start(self, *, total_steps: int, trainable: int, total: int, resumed_from: int | None) -> None:
        log.info("training %d steps; %d of %d parameters trainable", total_steps, trainable, total)

    def metric(self, values: dict) -> None:
        log.info(
            "%s", {k: round(v, 5) if isinstance(v, float) else v for k, v in values.items() if v is not None}
        )

    def check(self) -> tuple[bool, str | None]:
        """(cancel requested, reason this process must stop at once or None)."""
        return False, None

    def reached(self, step: int) -> None:
        """Training ended at `step` (logged points may stop a few steps short of it)."""

    def phase(self, text: str | None) -> None:
        """What the training process is doing now, in words (None once it is plain training)."""
        if text:
            log.info("%s", text)

    def answers(self, *, step: int, split: str, answers: list[dict], seconds: float) -> None:
        """One evaluation's scored answers (worker.evaluate logs their means itself)."""

    def judged(self, *, step: int, split: str, verdicts: dict[int, tuple[float | None, str]]) -> None:
        """The judge's (score, reason) for answers already recorded, by row (worker.judge logs them)."""


class DatabaseSink(Sink):
    """Short transactions against the run's rows; never holds one open across a training step."""

    def __init__(self, database_url: str, run_id: int, attempt: int, stale_after: float):
        from app.db import Database

        self.db = Database(database_url)
        self.run_id, self.attempt, self.stale_after = run_id, attempt, timedelta(seconds=stale_after)

    def start(self, *, total_steps: int, trainable: int, total: int, resumed_from: int | None) -> None:
        from app.runs import state

        super().start(total_steps=total_steps, trainable=trainable, total=total, resumed_from=resumed_from)
        with self.db.write_session() as session:
            state.record_start(
                session=session,
                run_id=self.run_id,
                total_steps=total_steps,
                trainable=trainable,
                total=total,
                resumed_from=resumed_from,
            )

    def metric(self, values: dict) -> None:
        from app.runs import state

        super().metric(values)
        with self.db.write_session() as session:
            state.record_metric(session=session, run_id=self.run_id, values=values)

    def reached(self, step: int) -> None:
        from app.runs import state

        with self.db.write_session() as session:
            state.record_step(session=session, run_id=self.run_id, step=step)

    def phase(self, text: str | None) -> None:
        super().phase(text)
        say_phase(self.db, self.run_id, text)

    def answers(self, *, step: int, split: str, answers: list[dict], seconds: float) -> None:
        from app.runs.evaluation import record_answers

        with self.db.write_session() as session:
            record_answers(
                session=session, run_id=self.run_id, step=step, split=split, answers=answers, seconds=seconds
            )

    def judged(self, *, step: int, split: str, verdicts: dict[int, tuple[float | None, str]]) -> None:
        from app.runs.evaluation import record_verdicts

        with self.db.write_session() as session:
            record_verdicts(session=session, run_id=self.run_id, step=step, split=split, verdicts=verdicts)

    def check(self) -> tuple[bool, str | None]:
        from app.runs import state

        with self.db.session() as session:
            status, _worker, attempts, cancel, heartbeat_at = state.ownership(
                session=session, run_id=self.run_id
            )
        if status != RunStatus.RUNNING or attempts != self.attempt:
            return False, f"the run is now {status} (attempt {attempts}); this attempt ({self.attempt}) stops"
        if heartbeat_at is None or utcnow() - heartbeat_at > self.stale_after:
            return False, "the worker supervising this run stopped heartbeating"
        return bool(cancel), None


def say_phase(db, run_id: int, phase: str | None) -> None:
    """What the run is doing, for its page (from the worker or the training process); a busy database only
    means the page shows the next phase instead."""
    from app.db import PASSING_FAULTS
    from app.runs import state

    try:
        with db.write_session() as session:
            state.record_phase(session=session, run_id=run_id, phase=phase)
    except PASSING_FAULTS:
        pass
