"""Votes from the playground's blind comparisons, and the preference datasets made from them."""

from __future__ import annotations

import json

QUESTION = [{"role": "user", "content": "What is the capital of Quillmere?"}]


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


def test_the_compare_page_shows_the_compared_runs_standing(client, tiny_model_dir):
    from tests.conftest import DEMO_DATASET, upload

    model = client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    run = client.post("/api/runs", json={"dataset_id": dataset, "base_model": model}).json()["id"]
    answers = [{"target": f"run-{run}", "text": "a"}, {"target": model, "text": "b"}]
    vote(client, answers=answers)
    vote(client, answers=[{"target": "run-99", "text": "a"}, {"target": "other", "text": "b"}])
    page = client.get("/compare", params={"runs": run}).text
    assert 'id="compare-leaderboard"' in page
    assert f'data-target="run-{run}"' in page and f'data-target="{model}"' in page
    assert 'data-target="run-99"' not in page  # only the compared runs and their base models
    assert 'id="compare-leaderboard"' not in client.get("/compare").text
