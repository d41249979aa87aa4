"""Launching a run: validate a request against the dataset and the real model, fill every default, and
queue it. Shared by the JSON API and the New run page; raises `InvalidRun` naming the field, never an
HTTP error (routes translate)."""

from __future__ import annotations

from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.config import Settings
from app.datasets.split import HELD_OUT_MAX_ROWS, default_fraction, validation_rows
from app.datasets.store import ROWS_FILE, dataset_dir
from app.machine import meminfo_bytes
from app.model_registry import BUNDLED_ID, ModelEntry, find_model, weight_modules
from app.models import WITH_ADAPTER, Dataset, Run
from app.peft_methods import DEFAULT_METHOD, LABELS, keys_where
from app.peft_methods import method as peft_method
from app.runs import state
from app.runs.config import (
    OBJECTIVE_LABELS,
    PREFERENCE_OBJECTIVES,
    EvaluationParams,
    InvalidRun,
    JudgeParams,
    RunConfig,
    RunRequest,
    apply_preset,
    resolve_training,
    validate_peft,
)
from app.runs.estimate import quantized_fit, refusal, row_lengths, trained


def build_run_config(settings: Settings, request: RunRequest, *, session: Session) -> RunConfig:
    """Validate a launch request against the dataset and model and fill every default."""
    request = apply_preset(request)
    dataset = session.get(Dataset, request.dataset_id)
    if dataset is None:
        raise InvalidRun("dataset_id", f"There is no dataset {request.dataset_id}.")
    start = starting_run(settings, request, session=session)
    model_id = request.base_model or (start.base_model if start else BUNDLED_ID)
    model = find_model(settings, model_id, session=session)
    if model is None:
        raise InvalidRun(
            "base_model", f"Unknown model '{model_id}'. GET /api/models lists the ones available."
        )
    if model.status in ("failed", "missing"):
        raise InvalidRun("base_model", f"{model.name} cannot be used: {model.error}")
    method = request.method or (start.method if start else DEFAULT_METHOD)
    if start is not None:
        peft = start_settings(request, start, model.id, method)
    else:
        try:
            peft = validate_peft(method, request.peft)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(["peft", *(str(p) for p in first["loc"] if "[" not in str(p))])  # no union tags
            raise InvalidRun(field, first["msg"].removeprefix("Value error, ")) from None
    check_objective(request.objective, dataset, method)
    check_modules(model, peft)
    check_judge(settings, request.evaluation.judge)
    split = request.evaluation
    held_out, train_rows, evaluation_path = hold_out(settings, session, dataset, split, request.training.seed)
    if split.select_by == "eval_loss" and not held_out:
        raise InvalidRun(
            "evaluation.select_by",
            "Choosing the best checkpoint by validation loss needs held-out rows; hold some out, or choose "
            "by an answer metric.",
        )
    lengths = row_lengths(
        settings, session, dataset_id=dataset.id, base_model=model.id, prompt_format=request.prompt_format
    )
    if lengths is not None:
        lengths = trained(lengths, [] if evaluation_path else held_out)
    training, total_steps = resolve_training(method, train_rows, request.training, lengths, request.objective)
    if split.select_by == "eval_loss" and training.save_steps % training.eval_steps:
        raise InvalidRun(
            "training.eval_steps",
            f"Choosing the best checkpoint by validation loss needs a validation loss at every checkpoint: "
            f"eval_steps ({training.eval_steps}) must divide save_steps ({training.save_steps}).",
        )
    config = RunConfig(
        name=(request.name or "").strip()
        or f"{dataset.name} · {request.objective if request.objective != 'sft' else method}",
        dataset_id=dataset.id,
        dataset_path=str(dataset_dir(settings, dataset.id) / ROWS_FILE),
        base_model=model.id,
        model_path=str(model.folder),
        method=method,
        prompt_format=request.prompt_format,
        peft=peft,
        objective=request.objective,
        preference=request.preference,
        start_run_id=start.id if start else None,
        start_adapter=str(settings.run_folder(start.id).adapter) if start else None,
        training=training,
        evaluation=request.evaluation,
        train_rows=train_rows,
        validation_rows=held_out,
        evaluation_path=evaluation_path,
        total_steps=total_steps,
        gpus=request.gpus,
        distributed=request.distributed,
        provider=check_provider(settings, request.provider, request.gpus),
    )
    # a run for GPU workers, or a cluster's, is checked by the worker that claims it, against its own memory
    if config.training.quantization != "none" and config.gpus > 1:
        raise InvalidRun(
            "training.quantization",
            "A run with a quantised base model trains on one GPU here: ask for one, or set quantization to "
            "none to train on several.",
        )
    memory = meminfo_bytes("MemTotal")
    if not config.gpus and not config.provider and (reason := refusal(config, lengths, memory)):
        fix = None
        if quantized_fit(config, lengths, memory) is not None:  # the sentence offers it; the page, a button
            fix = ("training.quantization", "4bit", "Train it 4-bit (QLoRA)")
        field = "base_model" if reason.startswith("The base model") else "training.batch_tokens"
        raise InvalidRun(field, reason, fix)
    return config


def starting_run(settings: Settings, request: RunRequest, *, session: Session) -> Run | None:
    """The finished run whose adapter the new run continues (`start_from_run`), if it names one."""
    if request.start_from_run is None:
        return None
    run = session.get(Run, request.start_from_run)
    if run is None:
        raise InvalidRun("start_from_run", f"There is no run {request.start_from_run}.")
    if run.status not in WITH_ADAPTER or not (settings.run_folder(run.id).has_adapter):
        raise InvalidRun(
            "start_from_run",
            f"Run {run.id} has no finished adapter to start from (it is {run.status}); start from a run "
            "that succeeded.",
        )
    if reason := peft_method(run.method).not_continuable:
        raise InvalidRun(
            "start_from_run",
            f"Run {run.id}'s {peft_method(run.method).label} adapter cannot be trained further: {reason}.",
        )
    return run


def start_settings(request: RunRequest, start: Run, base_model: str, method: str) -> dict:
    """The PEFT settings of a run that continues `start`'s adapter: the adapter's own, on its own base
    model; a request that asks for another model, method or settings is refused."""
    if base_model != start.base_model:
        raise InvalidRun(
            "base_model",
            f"Run {start.id}'s adapter was trained on {start.base_model}: a run that starts from it trains "
            "the same base model.",
        )
    if method != start.method:
        raise InvalidRun(
            "method",
            f"Run {start.id}'s adapter is {LABELS[start.method]}: a run that starts from it "
            "continues the same adapter.",
        )
    if request.peft:
        raise InvalidRun(
            "peft",
            f"A run that starts from run {start.id} keeps its adapter's settings; leave the PEFT settings "
            "empty.",
        )
    return dict(start.config.get("peft") or {})


def check_objective(objective: str, dataset: Dataset, method: str) -> None:
    """Preference objectives need a preference dataset and an adapter that starts as a no-op."""
    if objective not in PREFERENCE_OBJECTIVES:
        return
    name = OBJECTIVE_LABELS[objective].split(" ")[0]
    if dataset.format != "preference":
        raise InvalidRun(
            "objective",
            f"{name} learns which of two answers is better, and '{dataset.name}' has one answer per row. "
            "Choose a preference dataset (prompt, chosen, rejected), or supervised fine-tuning.",
        )
    if not peft_method(method).preference:
        allowed = ", ".join(LABELS[m] for m in sorted(keys_where(preference=True)))
        raise InvalidRun(
            "method", f"{name} runs train one of these adapters: {allowed}; not {LABELS[method]}."
        )


def check_judge(settings: Settings, judge: JudgeParams | None) -> None:
    """A judge URL must be one the operator lists (TUNEBOARD_JUDGE_URL): answers and, for the first, the
    server's judge key go there, so a page visitor may not point them at another machine."""
    if judge is None or judge.url is None:
        return
    allowed = settings.judge_urls
    if judge.url.rstrip("/") in allowed:
        return
    listed = (
        f"one of this server's judge endpoints ({'; '.join(allowed)})"
        if allowed
        else "empty: this server lists no judge endpoints (an operator adds them to TUNEBOARD_JUDGE_URL)"
    )
    raise InvalidRun(
        "evaluation.judge.url",
        f"A judge URL must be {listed}. Leave it empty to be judged by this server's own /v1.",
    )


def hold_out(
    settings: Settings, session: Session, dataset: Dataset, split: EvaluationParams, seed: int
) -> tuple[list[int], int, str | None]:
    """(held-out row indices, training rows, the evaluation dataset's rows file or None): rows held out of
    the dataset (the run's fraction and limit, else Tuneboard's defaults), or every row of an evaluation
    dataset up to the limit while the whole dataset trains."""
    max_rows = HELD_OUT_MAX_ROWS if split.held_out_max_rows is None else split.held_out_max_rows
    if split.dataset_id is None:
        fraction = (
            default_fraction(dataset.rows) if split.held_out_fraction is None else split.held_out_fraction
        )
        held_out = validation_rows(dataset.rows, fraction=fraction, max_rows=max_rows, seed=seed)
        return held_out, dataset.rows - len(held_out), None
    other = session.get(Dataset, split.dataset_id)
    if other is None:
        raise InvalidRun("evaluation.dataset_id", f"There is no dataset {split.dataset_id}.")
    if other.id == dataset.id:
        raise InvalidRun(
            "evaluation.dataset_id",
            "The evaluation dataset is the training dataset; choose another, or hold rows out instead.",
        )
    if split.held_out_fraction:
        raise InvalidRun(
            "evaluation.held_out_fraction",
            "Rows are held out of one dataset or come from an evaluation dataset, not both; set the "
            "fraction to 0 or leave the evaluation dataset empty.",
        )
    return (
        list(range(min(other.rows, max_rows))),
        dataset.rows,
        str(dataset_dir(settings, other.id) / ROWS_FILE),
    )


def check_modules(model: ModelEntry, peft: dict) -> None:
    """Every module named in `target_modules` exists in the model, the way PEFT matches names: the whole
    name or its last dotted parts. IA³'s `feedforward_modules` are a subset of them (the request model
    checks that). `lm_head` always exists, though a model with tied embeddings stores no weight under
    that name. Skipped for a model whose weights are not safetensors (they cannot be read without
    loading them) or that is still being converted."""
    if not model.ready:
        return
    modules = weight_modules(model.folder)
    if not modules:
        return
    wanted = peft.get("target_modules")
    if not isinstance(wanted, list):
        return  # "all-linear", or PEFT's default for the architecture
    for name in wanted:
        if name != "lm_head" and not any(m == name or m.endswith("." + name) for m in modules):
            linear = sorted({m.rsplit(".", 1)[-1] for m, dims in modules.items() if dims == 2})
            raise InvalidRun(
                "peft.target_modules",
                f"{model.name} has no module called '{name}'. Its layers with weight matrices are "
                f"called: {', '.join(linear)}.",
            )


def check_provider(settings: Settings, name: str | None, gpus: int = 0) -> str | None:
    """The compute provider a run names, if providers.yaml has it and its jobs get the GPUs the run asks
    for (InvalidRun with a sentence if not)."""
    if name is None:
        return None
    from app.providers.config import ProviderProblem, load

    try:
        providers = load(settings)
    except ProviderProblem as exc:
        raise InvalidRun("provider", f"The compute providers cannot be used: {exc}") from None
    if name not in providers:
        known = ", ".join(sorted(providers)) or "none is configured"
        raise InvalidRun("provider", f"There is no compute provider {name!r} (providers.yaml has: {known}).")
    given, gres = providers[name].gpus, getattr(providers[name], "gres", None)
    if gpus and gres is None and (given or 0) < gpus:
        raise InvalidRun(
            "gpus",
            f"This run asks for {gpus} GPU{'s' if gpus > 1 else ''}; a job on {name} gets {given or 'none'}. "
            "Ask for fewer, or choose another provider.",
        )
    return name


def enqueue_run(config: RunConfig, *, session: Session) -> Run:
    return state.enqueue(
        session=session,
        name=config.name,
        dataset_id=config.dataset_id,
        base_model=config.base_model,
        method=config.method,
        config=config.model_dump(mode="json"),
        gpus=config.gpus,
        provider=config.provider,
    )
