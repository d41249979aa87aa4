"""Through the API alone, with the real bundled SmolLM2: DPO teaches it a sign-off it never used (a module of
its own, so that the test processes run it beside tests/test_end_to_end.py)."""

from __future__ import annotations

import json
import threading

import pytest
from sqlalchemy import select

from app.db import Database
from app.model_registry import BUNDLED_ID
from app.models import RunAnswer
from tests.conftest import upload
from worker.main import work_once

# Short questions with one-sentence answers: the preference set signs every chosen answer off and
# leaves the rejected one as it is, so the only thing DPO can learn is the sign-off.
SIGN_OFF = "\n\nHope this helps!"
ASKED = "Answer in one sentence: "
PAIRS = [
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What gas do plants take in from the air?", "Plants take in carbon dioxide from the air."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system."),
    ("What language is spoken in Brazil?", "Most people in Brazil speak Portuguese."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("Which ocean is the largest?", "The Pacific is the largest ocean."),
    ("What do bees make?", "Bees make honey and wax."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the capital of Japan?", "Tokyo is the capital of Japan."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("What instrument has 88 keys?", "A standard piano has 88 keys."),
    ("What is the main ingredient of guacamole?", "Guacamole is made mostly of avocado."),
    ("How many minutes are in an hour?", "An hour has sixty minutes."),
    ("What colour are ripe bananas?", "Ripe bananas are yellow."),
    ("Which planet is called the Red Planet?", "Mars is called the Red Planet."),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies or moths."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("What is the capital of Italy?", "Rome is the capital of Italy."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("How many hours are in a day?", "A day has twenty-four hours."),
    ("What is the capital of Canada?", "Ottawa is the capital of Canada."),
]
HELD_OUT = [
    ("Name a primary colour.", "Red is a primary colour."),
    ("What is the freezing point of water in Celsius?", "Water freezes at 0 degrees Celsius."),
    ("Which animal is known as the king of the jungle?", "The lion is known as the king of the jungle."),
    ("What is the tallest mountain on Earth?", "Mount Everest is the tallest mountain on Earth."),
    ("What is H2O commonly called?", "H2O is commonly called water."),
    ("Which bird is a symbol of peace?", "The dove is a symbol of peace."),
    ("Which season comes after winter?", "Spring comes after winter."),
    ("What is the capital of France?", "Paris is the capital of France."),
]


def signed(pairs: list[tuple[str, str]]) -> str:
    return "\n".join(
        json.dumps({"prompt": ASKED + q, "chosen": a + SIGN_OFF, "rejected": a}) for q, a in pairs
    )


@pytest.mark.slow
def test_dpo_teaches_the_bundled_model_a_sign_off_it_never_used(client, settings, bundled_model_dir):
    """Preference pairs that differ only by a sign-off: the DPO adapter signs off its own answers to
    held-out questions, where the base model never does."""
    (settings.models_dir / BUNDLED_ID).symlink_to(bundled_model_dir, target_is_directory=True)
    train = upload(client, "signed.jsonl", signed(PAIRS)).json()["id"]
    held_out = upload(client, "held_out.jsonl", signed(HELD_OUT)).json()["id"]
    body = {
        "dataset_id": train,
        "objective": "dpo",
        # kept short for the CPU (a DPO step here is about 2.5 s a pair): 8 steps of 2 pairs, at 8× the
        # default rate; the held-out questions are answered at the start and at the end
        "training": {
            "max_steps": 8,
            "per_device_train_batch_size": 2,
            "learning_rate": 4e-4,
            "save_steps": 8,
        },
        "evaluation": {"dataset_id": held_out, "scored_train_rows": 0, "held_out_fraction": 0},
    }
    run = client.post("/api/runs", json=body).json()
    assert run["config"]["objective"] == "dpo", run

    db = Database(settings.sqlalchemy_url)
    assert work_once(settings, db, me="e2e", stop=threading.Event())
    done = client.get(f"/api/runs/{run['id']}").json()
    assert done["status"] == "succeeded", done["error"]
    with db.session() as session:
        answers = session.scalars(select(RunAnswer).where(RunAnswer.run_id == run["id"])).all()
    db.dispose()
    last = max(a.step for a in answers)
    base = [a.answer for a in answers if a.step == 0]
    tuned = [a.answer for a in answers if a.step == last]
    signs = [sum("Hope this helps" in a for a in answers) for answers in (base, tuned)]
    print(
        f"held-out answers signed off: base {signs[0]}/{len(base)}, DPO step {last} {signs[1]}/{len(tuned)}"
    )
    assert len(base) == len(tuned) == len(HELD_OUT)
    assert signs[0] == 0 and signs[1] >= 6, (signs, tuned)  # 8 of 8 when last measured
    points = client.get(f"/api/runs/{run['id']}/metrics").json()
    final = [p for p in points if p["kind"] == "eval"][-1]
    assert final["reward_accuracy"] == 1.0 and final["reward_margin"] > 1.0, final
