"""Run pages: the Runs list (home), New run, a run's detail, Compare, and their live streams."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
import yaml
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from jinja2_fragments import render_block
from pydantic import ValidationError
from sqlalchemy import select
from sse_starlette import EventSourceResponse, ServerSentEvent

from app import charts, votes, workers
from app.datasets import store
from app.deps import FormDep, IdQuery, RunId, SessionDep, SettingsDep, WriteSessionDep, get_run_or_404
from app.model_registry import BUNDLED_ID, list_models
from app.models import MAX_ID, WITH_ADAPTER, Dataset, Run, RunMetric
from app.peft_methods import CHOICES, DEFAULT_METHOD, LABELS, METHODS
from app.playground import list_targets
from app.prompts import PROMPT_FORMATS
from app.routes.cluster_pages import cluster_context
from app.routes.export_pages import export_context
from app.routes.publish_pages import publish_context
from app.runs import evaluation, state
from app.runs.config import (
    OBJECTIVE_LABELS,
    PRESETS,
    InvalidRun,
    RunConfig,
    RunRequest,
)
from app.runs.estimate import run_estimate
from app.runs.events import latest_train_metric, list_stream, progress, run_events, tracked
from app.runs.folder import RunFolder
from app.runs.form import (
    OBJECTIVE_HELP,
    evaluation_fields,
    form_values,
    judge_fields,
    peft_fields,
    preference_fields,
    request_from_form,
    training_fields,
)
from app.runs.launch import build_run_config, enqueue_run
from app.web import hx_redirect, render

router = APIRouter(include_in_schema=False)

CLI_HIDDEN = ("run_id", "database_url", "output_dir")


def run_row_context(run: Run, latest: RunMetric | None) -> dict:
    return {"run": run, "p": progress(run, latest)}


@router.get("/", response_class=HTMLResponse)
def runs_page(request: Request, session: SessionDep):
    runs = session.scalars(select(Run).order_by(Run.id.desc())).all()
    rows = [run_row_context(r, latest_train_metric(session, r.id)) for r in runs]
    datasets = {d.id: d.name for d in session.scalars(select(Dataset))}
    block = "runs_table" if request.headers.get("HX-Request") else None
    return render(request, "runs.html", {"rows": rows, "datasets": datasets}, block=block)


@router.get("/runs/stream")
async def runs_stream(request: Request, count: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None):
    """One stream for the whole Runs page: a re-rendered row whenever a run changes."""
    templates, db = request.app.state.templates, request.app.state.db
    with db.session() as session:
        datasets = {d.id: d.name for d in session.scalars(select(Dataset))}

    def encode(run: Run, latest: RunMetric | None) -> ServerSentEvent:
        html = templates.get_template("_run_row.html").render(
            **run_row_context(run, latest), datasets=datasets
        )
        return ServerSentEvent(html, event=f"run-{run.id}")

    stream = list_stream(request.app.state.feeds, encode, known=count)
    return EventSourceResponse(tracked(request.app, stream), ping=15)


def objective_context(session, datasets: list[Dataset], values: dict) -> dict:
    """What the New run page offers a dataset: supervised fine-tuning for one answer per row; for pairs of
    answers DPO (the default), KTO or SFT on the chosen answers, from a new adapter or a finished run's."""
    chosen = next(
        (d for d in datasets if d.id == values.get("dataset_id")), datasets[0] if datasets else None
    )
    pairs = chosen is not None and chosen.format == "preference"
    objective = values.get("objective")
    if not pairs or objective not in OBJECTIVE_LABELS:
        objective = "dpo" if pairs else "sft"
    finished = session.scalars(select(Run).where(Run.status.in_(WITH_ADAPTER)).order_by(Run.id.desc())).all()
    start = next((r for r in finished if r.id == values.get("start_from_run")), None)
    return {
        "pairs": pairs,
        "objective": objective,
        "start_run": start if objective != "sft" else None,
        "objectives": {k: v for k, v in OBJECTIVE_LABELS.items() if pairs or k == "sft"},
        "objective_help": OBJECTIVE_HELP,
        "preference_fields": preference_fields(),
        "start_runs": finished,
        "dataset_name": chosen.name if chosen else None,
    }


def _form_context(settings, session, values: dict, *, problems=None) -> dict:
    method = values.get("method") or DEFAULT_METHOD
    simple_training, advanced_training = training_fields()
    simple_peft, advanced_peft = peft_fields(method if method in METHODS else DEFAULT_METHOD)
    datasets = store.list_datasets(session=session)
    return {
        **objective_context(session, datasets, values),
        "datasets": datasets,
        "models": list_models(settings, session=session),
        "methods": CHOICES,
        "prompt_formats": PROMPT_FORMATS,
        "values": values,
        "method": method,
        "simple_training": simple_training,
        "advanced_training": advanced_training,
        "simple_peft": simple_peft,
        "advanced_peft": advanced_peft,
        "evaluation_fields": evaluation_fields(),
        "judge_fields": judge_fields(),
        "problems": problems or [],
        "bundled": BUNDLED_ID,
        "providers": configured_providers(settings),
    }


def configured_providers(settings) -> list:
    """The compute providers New run offers (none when the operator's file is missing or unusable)."""
    from app.providers.config import ProviderProblem, load

    try:
        return list(load(settings).values())
    except ProviderProblem:
        return []


def _preset_values(preset: str | None) -> dict:
    """Form values for a preset: `training.x` / `peft.x` keys."""
    if preset not in PRESETS:
        return {}
    values = {"method": PRESETS[preset]["method"]}
    for group in ("training", "peft"):
        for key, value in PRESETS[preset][group].items():
            values[f"{group}.{key}"] = ", ".join(value) if isinstance(value, list) else value
    return values


@router.get("/runs/new", response_class=HTMLResponse)
def new_run_page(
    request: Request,
    settings: SettingsDep,
    session: SessionDep,
    dataset: Annotated[int | None, IdQuery] = None,
    dataset_id: Annotated[int | None, IdQuery] = None,  # the form's own name, as its fields send it
    preset: str | None = None,
    method: str | None = None,
    objective: str | None = None,
    start_from_run: str | None = None,  # a run id, or empty for a new adapter
    from_run: Annotated[int | None, Query(alias="from", ge=1, le=MAX_ID)] = None,
):
    values = {"dataset_id": dataset or dataset_id, **_preset_values(preset)}
    if objective:
        values["objective"] = objective
    if start_from_run and start_from_run.isdigit() and len(start_from_run) < 19:
        values["start_from_run"] = int(start_from_run)
    if from_run is not None:  # another run's settings, with any setting the link changes
        source = get_run_or_404(session, from_run)
        values = form_values(RunConfig.model_validate(source.config)) | {
            key: value for key, value in request.query_params.items() if key.split(".")[0] in CHANGEABLE
        }
    if method:
        values["method"] = method
    block = request.headers.get("HX-Target", "") if request.headers.get("HX-Request") else ""
    # presets fetch the whole page and select the form
    blocks = {"peft-fields": "peft_fields", "objective-fields": "objective_fields"}
    return render(request, "run_new.html", _form_context(settings, session, values), block=blocks.get(block))


def _validate_form(settings, session, form: dict[str, str]):
    """(config, problems): problems are {"field", "message"} dicts."""
    body = request_from_form(form)
    try:
        request = RunRequest.model_validate(body)
        return build_run_config(settings, request, session=session), []
    except ValidationError as exc:
        return None, [
            {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"].removeprefix("Value error, ")}
            for e in exc.errors()
        ]
    except InvalidRun as exc:
        fix = dict(zip(("field", "value", "label"), exc.fix, strict=True)) if exc.fix else None
        return None, [{"field": exc.field, "message": exc.message, "fix": fix}]


@router.post("/runs/estimate", response_class=HTMLResponse)
def estimate_fragment(request: Request, settings: SettingsDep, session: SessionDep, form: FormDep):
    config, problems = _validate_form(settings, session, form)
    cost = None
    if config is not None:
        cost = run_estimate(settings, session, config)
    context = {"cost": cost, "problems": problems, "config": config, "held_out": [], "held_out_from": None}
    if cost is not None and "seconds" not in cost:  # the page asks again until the trial has a figure
        context["measuring"] = workers.measuring(session=session, stale_after=settings.stale_after_seconds)
    if config is not None:
        context["held_out"] = evaluation.held_out_questions(config, HELD_OUT_SHOWN)
        other = config.evaluation.dataset_id and session.get(Dataset, config.evaluation.dataset_id)
        context["held_out_from"] = other.name if other else None
    return render(request, "run_new.html", context, block="estimate")


HELD_OUT_SHOWN = 12
# held-out rows listed under the estimate


@router.post("/runs", response_class=HTMLResponse)
def launch_from_page(request: Request, settings: SettingsDep, session: WriteSessionDep, form: FormDep):
    config, problems = _validate_form(settings, session, form)
    if config is None:
        return render(
            request, "run_new.html", {"problems": problems, "cost": None}, block="estimate", status=422
        )
    run = enqueue_run(config, session=session)
    return hx_redirect(f"/runs/{run.id}")


def checkpoints(folder: RunFolder) -> list[dict]:
    return [
        {"name": c.path.name, "step": c.step, "bytes": c.size(), "complete": c.complete}
        for c in folder.checkpoints()
    ]


def cli_yaml(run: Run) -> str:
    config = {k: v for k, v in run.config.items() if k not in CLI_HIDDEN}
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(request: Request, run_id: RunId, settings: SettingsDep, session: SessionDep):
    run = get_run_or_404(session, run_id)
    folder = settings.run_folder(run_id)
    target = request.headers.get("HX-Target", "") if request.headers.get("HX-Request") else ""
    block = {"run-summary": "summary", "run-log": "log", "run-checkpoints": "checkpoints"}.get(target)
    if block == "log":  # polled every 2 s while the run is active: only the log
        # 286 tells htmx to stop polling the log once the run has finished.
        status = 286 if run.status in state.FINISHED else 200
        return render(request, "run.html", {"run": run, "log": folder.tail()}, block="log", status=status)
    context = (
        summary_context(settings, session, run)
        | {
            "p": progress(run, latest_train_metric(session, run_id)),
            "checkpoints": checkpoints(folder),
            "log": folder.tail(),
            "cli_yaml": cli_yaml(run),
            "evaluation": evaluation.report(settings, session=session, run=run),
            "charts": charts.spec(charts.charts_for(run.config.get("objective", "sft"))),
        }
        | export_context(settings, session, run)
        | publish_context(settings, session, run)
        | cluster_context(settings, run)
    )
    return render(request, "run.html", context, block=block)


def summary_context(settings, session, run: Run) -> dict:
    """What the page's summary block shows (the page and its stream both render it)."""
    folder = settings.run_folder(run.id)
    return {
        "run": run,
        "dataset": session.get(Dataset, run.dataset_id),
        "methods": LABELS,
        "objectives": OBJECTIVE_LABELS,
        "has_adapter": folder.has_adapter,
        "adapter_source": folder.adapter_source(),
        "waiting": None
        if run.provider  # its scheduler job's worker takes it
        else workers.waiting_reason(session=session, run=run, stale_after=settings.stale_after_seconds),
    }


@router.get("/runs/{run_id}/stream")
async def run_page_stream(request: Request, run_id: RunId, settings: SettingsDep):
    """The run page's one stream: `metric` events (JSON) for its charts, and the page's `progress`,
    `summary` and `checkpoints` blocks re-rendered whenever they change; `done` once the run has finished
    (the page closes the stream on it)."""
    env, db = request.app.state.templates.env, request.app.state.db

    def blocks(p: dict, with_answers: bool) -> dict[str, str]:
        with db.session() as session:
            run = session.get(Run, run_id)
            if run is None:
                return {}
            folder = settings.run_folder(run_id)
            parts = {
                "progress": render_block(env, "run.html", "progress", p=p),
                "summary": render_block(env, "run.html", "summary", summary_context(settings, session, run)),
                "checkpoints": render_block(env, "run.html", "checkpoints", checkpoints=checkpoints(folder)),
            }
            if with_answers or parts["checkpoints"] != sent.get("checkpoints"):  # scored at each checkpoint
                report = evaluation.report(settings, session=session, run=run)
                parts["evaluation"] = render_block(env, "run.html", "evaluation", run=run, evaluation=report)
            return parts

    sent: dict[str, str] = {}

    async def events() -> AsyncIterator[ServerSentEvent]:
        async for kind, payload, _ in run_events(request.app.state.feeds, run_id, 0):
            if kind == "metric":
                yield ServerSentEvent(json.dumps(payload), event="metric")
                continue
            if "status" in payload:  # not the `done` of a run that does not exist
                parts = await anyio.to_thread.run_sync(blocks, payload, kind == "done")
                for name, html in parts.items():
                    if sent.get(name) != html:
                        sent[name] = html
                        yield ServerSentEvent(html, event=name)
            if kind == "done":
                yield ServerSentEvent(json.dumps(payload), event="done")

    return EventSourceResponse(tracked(request.app, events()), ping=15)


CHANGEABLE = ("training", "peft", "evaluation", "name")


@router.post("/runs/{run_id}/relaunch", response_class=HTMLResponse)
async def relaunch_from_page(
    request: Request, run_id: RunId, settings: SettingsDep, session: WriteSessionDep
):
    """The run again with the posted settings changed (the evaluation's suggestion): one click."""
    run = get_run_or_404(session, run_id)
    posted = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    change = {k: v for k, v in posted.items() if k.split(".")[0] in CHANGEABLE}
    values = {k: _form_text(v) for k, v in form_values(RunConfig.model_validate(run.config)).items()}
    config, problems = _validate_form(settings, session, values | change)
    if config is None:
        sentence = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        raise HTTPException(422, f"This run cannot be launched again with that change: {sentence}")
    new = enqueue_run(config, session=session)
    return hx_redirect(f"/runs/{new.id}")


def _form_text(value) -> str:
    """A setting as a form sends it (checkboxes as true/false)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


@router.post("/runs/{run_id}/cancel", response_class=HTMLResponse)
def cancel_from_page(request: Request, run_id: RunId, settings: SettingsDep, session: WriteSessionDep):
    try:
        state.request_cancel(session=session, run_id=run_id)
    except LookupError:
        raise HTTPException(404, f"There is no run {run_id}.") from None
    except state.TransitionError:
        pass  # finished meanwhile: the summary below shows how
    return run_page(request, run_id, settings, session)


def target_labels(settings, session) -> dict[str, str]:
    """What the playground calls each target (base models, runs, checkpoints), by id."""
    return {t.id: t.label for t in list_targets(settings, session=session)}


@router.get("/leaderboard", response_class=HTMLResponse)
def leaderboard_page(request: Request, settings: SettingsDep, session: SessionDep):
    table, counted = votes.leaderboard(session=session)
    context = {
        "table": table,
        "vote_count": counted,
        "labels": target_labels(settings, session),
    }
    return render(request, "leaderboard.html", context)


@router.get("/compare", response_class=HTMLResponse)
def compare_page(
    request: Request,
    settings: SettingsDep,
    session: SessionDep,
    runs: Annotated[list[int] | None, Query()] = None,
):
    all_runs = session.scalars(select(Run).order_by(Run.id.desc())).all()
    chosen = [r for r in all_runs if r.id in set(runs or [])]
    curves = {}
    for run in chosen:
        points = session.scalars(
            select(RunMetric).where(RunMetric.run_id == run.id).order_by(RunMetric.id)
        ).all()
        scored = evaluation.summary(session=session, run=run)
        curves[run.id] = {
            "name": f"#{run.id} {run.name}",
            "train": [[p.step, p.get("loss")] for p in points if p.kind == "train"],
            "eval": [[p.step, p.get("eval_loss")] for p in points if p.kind == "eval"],
            # the selecting split's mean chrF by step; step 0 is the base model
            "answers": [
                [e["step"], e[scored["split"]]["chrf"]] for e in scored["steps"] if scored["split"] in e
            ],
        }
    compared = {f"run-{r.id}" for r in chosen} | {r.base_model for r in chosen}
    board = [s for s in votes.leaderboard(session=session)[0] if s.target in compared] if chosen else []
    context = {
        "board": board,
        "labels": target_labels(settings, session),
        "all_runs": all_runs,
        "chosen": chosen,
        "curves": json.dumps(curves),
        "any_answers": any(c["answers"] for c in curves.values()),
        "differences": differences(chosen),
    }
    return render(request, "compare.html", context)


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{name}.")
        elif key not in ("validation_rows", "dataset_path", "model_path", "name", *CLI_HIDDEN):
            flat[name] = ", ".join(value) if isinstance(value, list) else value
    return flat


def differences(runs: list[Run]) -> list[tuple[str, list[object]]]:
    """The settings that are not the same across the chosen runs."""
    if len(runs) < 2:
        return []
    flats = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flats))
    return [
        (k, [f.get(k, "—") for f in flats]) for k in keys if len({json.dumps(f.get(k)) for f in flats}) > 1
    ]
