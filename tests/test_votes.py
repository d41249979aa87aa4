"""Votes from the playground's blind comparisons, and the preference datasets made from them."""

from __future__ import annotations

import json

import pytest

from app import votes
from tests.conftest import DEMO_DATASET, upload

QUESTION = [{"role": "user", "content": "What is the capital of Quillmere?"}]


@pytest.fixture(autouse=True)
def runs(client, tiny_model_dir):
    """Runs 1 and 2 (queued: a vote needs only that its targets exist)."""
    model = client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    for _ in range(2):
        launched = client.post("/api/runs", json={"dataset_id": dataset, "base_model": model})
        assert launched.status_code == 201, launched.text
    return model


def vote(client, conversation: str = "c1", **fields):
    body = {
        "conversation_id": conversation,
        "messages": QUESTION,
        "answers": [
            {"target": "run-1", "text": "Tessary."},
            {"target": "smollm2-135m-instruct", "text": "Paris."},
        ],
        "verdict": "better",
        "best": 0,
        "sampling": {"temperature": 0.7, "max_new_tokens": 64},
    } | fields
    return client.post("/api/votes", json=body)


def test_a_vote_keeps_everything_and_gives_its_preferences(client):
    stored = vote(client, chosen="Tessary, the harbour town. — Q")
    assert stored.status_code == 201, stored.text
    shown = stored.json()
    assert [a["target"] for a in shown["answers"]] == ["run-1", "smollm2-135m-instruct"]  # the reveal
    assert shown["chosen"] == "Tessary, the harbour town. — Q" and shown["preferences"] == 1
    assert shown["sampling"]["temperature"] == 0.7 and shown["created_at"]
    # all bad, with a better answer written instead: every shown answer is rejected against it
    written = vote(client, verdict="both_bad", best=None, chosen="Tessary.").json()
    assert written["preferences"] == 1  # "Tessary." itself is no preference against "Tessary."
    tie = vote(client, verdict="tie", best=None).json()
    assert tie["preferences"] == 0 and tie["chosen"] is None


def test_inconsistent_votes_are_refused_with_a_sentence(client):
    def refusal(**fields) -> str:
        response = vote(client, **fields)
        assert response.status_code == 422, response.text
        return json.dumps(response.json())

    assert "Say which answer is better" in refusal(best=None)
    assert "Say which answer is better" in refusal(best=3)
    assert "goes only with the verdict" in refusal(verdict="tie", best=1)
    assert "A tie has no chosen answer" in refusal(verdict="tie", best=None, chosen="x")
    assert "must end with the question" in refusal(
        messages=[*QUESTION, {"role": "assistant", "content": "x"}]
    )
    assert "The chosen answer is empty" in refusal(chosen="  ")
    assert (
        vote(client, answers=[{"target": "run-1", "text": "x"}]).status_code == 422
    )  # one answer: no choice


def test_votes_become_a_preference_dataset_by_conversation_time_or_target(client):
    vote(client, "c1")
    vote(client, "c1", best=1, chosen="Paris? No: Tessary.")
    vote(client, "c2", verdict="tie", best=None)
    listed = client.get("/api/votes", params={"conversation_id": "c1"}).json()
    assert len(listed) == 2
    assert len(client.get("/api/votes", params={"target": "run-1"}).json()) == 3
    assert client.get("/api/votes", params={"since": "2999-01-01T00:00:00"}).json() == []

    made = client.post("/api/votes/dataset", json={"conversation_id": "c1"})
    assert made.status_code == 201, made.text
    dataset = made.json()
    assert dataset["format"] == "preference" and dataset["rows"] == 2 and dataset["name"] == "Votes of c1"
    rows = [
        json.loads(line)
        for line in client.get(f"/api/datasets/{dataset['id']}/preferences.jsonl").text.splitlines()
    ]
    assert rows[0] == {
        "prompt": QUESTION,
        "chosen": [{"role": "assistant", "content": "Tessary."}],
        "rejected": [{"role": "assistant", "content": "Paris."}],
    }
    assert rows[1]["chosen"][0]["content"] == "Paris? No: Tessary."
    assert rows[1]["rejected"][0]["content"] == "Tessary."

    ties = client.post("/api/votes/dataset", json={"conversation_id": "c2"})
    assert ties.status_code == 422 and "give no preference" in ties.text


def test_the_leaderboard_rates_targets_from_the_votes(client, settings):
    from app.votes import standings

    for index in range(10):  # run-1 wins 8 of 10 against the base model
        vote(client, f"d{index}", best=0 if index < 8 else 1)
    base = "smollm2-135m-instruct"
    tied = [{"target": "run-2", "text": "a"}, {"target": base, "text": "b"}]
    for _ in range(3):  # run-2 ties with the base model
        vote(client, "t", answers=tied, verdict="tie", best=None)
    three = [
        {"target": "run-1", "text": "a"},
        {"target": "run-2", "text": "b"},
        {"target": base, "text": "c"},
    ]
    vote(client, "three", answers=three, best=1)  # run-2 beats both; run-1 and base: no preference

    board = client.get("/api/votes/leaderboard").json()
    by_target = {s["target"]: s for s in board}
    assert board[-1]["target"] == base  # it lost 9 of its 14 comparisons and won 2
    assert by_target["run-1"]["rating"] > by_target[base]["rating"] + 100
    assert (by_target["run-1"]["wins"], by_target["run-1"]["losses"]) == (8, 3)
    assert (by_target[base]["wins"], by_target[base]["ties"], by_target[base]["losses"]) == (2, 3, 9)
    assert by_target["run-2"]["ties"] == 3 and by_target["run-2"]["wins"] == 2
    assert by_target["run-2"]["win_rate"] == (2 + 3 / 2) / 5
    for s in board:
        assert s["low"] < s["rating"] < s["high"]
    # fewer votes, wider interval
    with client.app.state.db.session() as session:
        from app.votes import find

        few = standings(find(session=session, conversation_id="d0"))
    wide = next(s for s in few if s.target == "run-1")
    assert wide.high - wide.low > by_target["run-1"]["high"] - by_target["run-1"]["low"]

    page = client.get("/leaderboard").text
    shown = [part.split('"')[0] for part in page.split('data-target="')[1:]]
    assert "14 votes" in page and shown == [s["target"] for s in board]
    assert client.get("/api/votes/leaderboard", params={"conversation_id": "nothing"}).json() == []


def test_the_compare_page_shows_the_compared_runs_standing(client, runs):
    model = runs  # runs 1 and 2 train it
    vote(client, answers=[{"target": "run-1", "text": "a"}, {"target": model, "text": "b"}])
    vote(client, answers=[{"target": "run-2", "text": "a"}, {"target": "smollm2-135m-instruct", "text": "b"}])
    page = client.get("/compare", params={"runs": 1}).text
    assert 'id="compare-leaderboard"' in page
    assert 'data-target="run-1"' in page and f'data-target="{model}"' in page
    # only the compared runs and their base models
    assert 'data-target="run-2"' not in page and 'data-target="smollm2-135m-instruct"' not in page
    assert 'id="compare-leaderboard"' not in client.get("/compare").text


def test_votes_for_targets_that_do_not_exist_are_refused(client):
    for target, field in (("run-99", "answers.0.target"), ("gpt-imaginary", "answers.0.target")):
        answers = [{"target": target, "text": "a"}, {"target": "run-1", "text": "b"}]
        refused = vote(client, answers=answers)
        assert refused.status_code == 422
        problem = refused.json()["detail"][0]
        assert (
            problem["field"] == field and f"There is no model or run called '{target}'" in problem["message"]
        )
    last = [{"target": "run-1", "text": "a"}, {"target": f"run-{2**63}", "text": "b"}]
    assert vote(client, answers=last).json()["detail"][0]["field"] == "answers.1.target"
    assert client.get("/api/votes").json() == []  # nothing was stored
    checkpoint = [{"target": "run-1-step-40", "text": "a"}, {"target": "smollm2-135m-instruct", "text": "b"}]
    assert vote(client, answers=checkpoint).status_code == 201  # a run's checkpoint, a preparing model


def test_the_leaderboard_is_computed_once_per_set_of_votes_and_rates_a_bounded_number(client, monkeypatch):
    computed = []
    real = votes.standings
    monkeypatch.setattr(votes, "standings", lambda found: computed.append(len(found)) or real(found))
    vote(client, "a")
    for _ in range(3):
        assert client.get("/api/votes/leaderboard").status_code == 200
        assert client.get("/leaderboard").status_code == 200
    assert computed == [1]  # one computation for six views of the same votes
    vote(client, "b")
    client.get("/api/votes/leaderboard")
    assert computed == [1, 2]
    # many targets: only the most compared are rated (the cost grows with the cube of their number)
    monkeypatch.setattr(votes, "MAX_RATED", 2)
    three = [{"target": t, "text": t} for t in ("run-1", "run-2", "smollm2-135m-instruct")]
    vote(client, "c", answers=three, best=0)  # run-1 beats both; run-2 and the base model: no preference
    for conversation in "def":
        vote(client, conversation, answers=three[:2], best=1)
    board = client.get("/api/votes/leaderboard").json()
    # comparisons: run-1 7, run-2 4, the base model 3
    assert sorted(s["target"] for s in board) == ["run-1", "run-2"]
