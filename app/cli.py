"""The `tuneboard` command: serve (web + worker), web, worker, migrate."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from app.config import Settings, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        k: v for k, v in (("host", args.host), ("port", args.port), ("data_dir", args.data_dir)) if v
    }
    return load_settings(**overrides)


def cmd_migrate(settings: Settings) -> None:
    from app.migrate import upgrade

    upgrade(settings)
    print(f"Database is up to date: {settings.sqlalchemy_url}")


def cmd_web(settings: Settings) -> None:
    import uvicorn

    from app.main import create_app
    from app.migrate import upgrade

    settings.check_exposure()
    upgrade(settings)
    # Uploads are checked on worker threads (CPU-bound Python). A shorter GIL switch interval lets the
    # event loop answer other requests within milliseconds meanwhile (measured: /healthz p50 62 → 14 ms
    # during a 1,000,000-row upload), at no measurable cost to the upload.
    sys.setswitchinterval(0.0005)
    print(f"Tuneboard is listening on http://{settings.host}:{settings.port}", flush=True)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )


def cmd_worker(settings: Settings, only_run: int | None = None) -> None:
    from worker.main import run_worker

    # exit code 0, also when the Workers page stopped it: it stays down
    sys.exit(run_worker(settings, only_run=only_run))


def cmd_train(config: Path) -> int:
    from worker.train import main as train_main

    return train_main([str(config)])


def cmd_eval(settings: Settings, run_id: int, step: int | None, base: bool) -> int:
    """Answers scored as at a checkpoint (worker.evaluate), stored with the run's other evaluations."""
    from worker.evaluate import evaluate_run

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = evaluate_run(settings, run_id, step, base=base)
    for entry in result["steps"]:
        parts = [
            f"{split}: chrF {entry[split]['chrf']:.1f}, ROUGE-L {entry[split]['rouge_l']:.1f}, "
            f"exact {entry[split]['exact']:.0f}% ({entry[split]['rows']} rows)"
            for split in ("validation", "train")
            if split in entry
        ]
        label = "base model" if entry["step"] == 0 else f"step {entry['step']}"
        best = "  ← best" if entry["step"] == result["best_step"] else ""
        print(f"{label:>12}  " + "; ".join(parts) + best)
    return 0


def cmd_serve(settings: Settings) -> None:
    """Web server and one worker together: the embedded default. The worker is restarted (with backoff)
    whenever it dies, and stopped when the web server stops."""
    from app.migrate import upgrade
    from app.processes import ChildKeeper

    settings.check_exposure()
    if settings.server_url:  # its worker shares this server's data folder: files must not travel
        raise SystemExit(
            "TUNEBOARD_SERVER_URL is for a worker on another machine (`tuneboard worker`); `tuneboard serve` "
            "runs its worker beside the web server, sharing its data folder. Unset it here."
        )
    upgrade(settings)  # before the worker starts, so both see the same schema
    # uvicorn re-raises the signal that stopped it once it has shut down; turn that into SystemExit
    # so that the `finally` below still stops the worker.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    worker = ChildKeeper("the worker", [sys.executable, "-m", "worker"], settings.child_env())
    try:
        cmd_web(settings)
    finally:
        worker.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="tuneboard", description="Fine-tune language models from your browser."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", help="address to listen on (default 127.0.0.1; TUNEBOARD_HOST)")
    common.add_argument("--port", type=int, help="port to listen on (default 8000; TUNEBOARD_PORT)")
    common.add_argument(
        "--data-dir", type=Path, help="where the database, datasets and models live (TUNEBOARD_DATA_DIR)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "serve", parents=[common], help="web server and a worker together (what `make run` starts)"
    )
    commands.add_parser("web", parents=[common], help="the web server alone")
    worker = commands.add_parser("worker", parents=[common], help="a worker alone")
    worker.add_argument(
        "--run", type=int, metavar="N", help="train run N only, then exit (a cluster's scheduler job)"
    )
    commands.add_parser("migrate", parents=[common], help="apply database migrations and exit")
    train = commands.add_parser("train", help="run one fine-tuning from a run.yaml, without the web app")
    train.add_argument("config", type=Path, help="a run.yaml (every run folder has one)")
    evaluate = commands.add_parser(
        "eval", parents=[common], help="score a run's answers again (its final adapter or a checkpoint)"
    )
    evaluate.add_argument("run", type=int, help="the run's number")
    evaluate.add_argument("--checkpoint", type=int, metavar="STEP", help="a complete checkpoint's step")
    evaluate.add_argument("--base", action="store_true", help="score the base model's answers too")
    args = parser.parse_args(argv)
    if args.command == "train":
        sys.exit(cmd_train(args.config))
    if args.command == "eval":
        sys.exit(cmd_eval(_settings(args), args.run, args.checkpoint, args.base))

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per call to the generation host
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # a line per plugin at start
    settings = _settings(args)
    if args.command == "worker":
        cmd_worker(settings, args.run)
        return
    {"serve": cmd_serve, "web": cmd_web, "migrate": cmd_migrate}[args.command](settings)


if __name__ == "__main__":
    main()
