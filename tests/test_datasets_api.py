"""The dataset API end to end: real app, real migrations, files on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import DEMO_DATASET, upload


def stored_state(settings) -> tuple[list[str], list[str]]:
    """Every dataset folder and every staging file: both must be unchanged by a refused upload."""
    folders = sorted(p.name for p in settings.datasets_dir.iterdir())
    staging = sorted(p.name for p in settings.tmp_dir.iterdir())
    return folders, staging


def test_upload_demo_dataset(client, settings):
    response = upload(client, "demo_alpaca.json", DEMO_DATASET.read_bytes())
    assert response.status_code == 201
    body = response.json()
    assert body["format"] == "alpaca" and body["layout"] == "json" and body["rows"] == 40
    assert body["name"] == "demo_alpaca"
    folder = settings.datasets_dir / str(body["id"])
    assert (folder / "original.json").read_bytes() == DEMO_DATASET.read_bytes()
    assert len((folder / "rows.jsonl").read_text(encoding="utf-8").splitlines()) == 40
    assert client.get("/api/datasets").json()[0]["id"] == body["id"]


def test_upload_with_a_name_and_each_format(client):
    files = {
        "chat.jsonl": json.dumps(
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
        ),
        "share.json": '[{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]',
        "alpaca.jsonl": '{"instruction": "q", "output": "a"}\n{"instruction": "r", "output": "b"}',
    }
    seen = {}
    for name, content in files.items():
        response = upload(client, name, content, name=f"  My {name}  ")
        assert response.status_code == 201, response.text
        seen[name] = (response.json()["format"], response.json()["layout"], response.json()["name"])
    assert seen == {
        "chat.jsonl": ("openai", "jsonl", "My chat.jsonl"),
        "share.json": ("sharegpt", "json", "My share.json"),
        "alpaca.jsonl": ("alpaca", "jsonl", "My alpaca.jsonl"),
    }


@pytest.mark.parametrize(
    ("content", "row", "field"),
    [
        (b"\xff\xfe\x00", None, None),
        (b"", None, None),
        (b"not json at all", None, None),
        (b'{"a": 1,\n "b": 2}', None, None),
        (b'[{"instruction": "q"}]', 1, "output"),
        (b'[{"instruction": "q", "output": 3}]', 1, "output"),
        (b'[{"instruction": "q", "output": ""}]', 1, "output"),
        (b'{"messages": [{"role": "wizard", "content": "x"}]}', 1, "messages[0].role"),
        (b'{"instruction": "q", "output": "a"}\n{"instruction": "q", "output"\n', 2, None),
    ],
)
def test_bad_files_get_row_level_errors_and_store_nothing(client, settings, content, row, field):
    before = stored_state(settings)
    response = upload(client, "bad.json", content)
    assert response.status_code == 422
    body = response.json()
    assert body["error_count"] == len(body["detail"]) >= 1
    first = body["detail"][0]
    assert (first["row"], first["field"]) == (row, field)
    assert first["message"]
    assert stored_state(settings) == before
    assert client.get("/api/datasets").json() == []


def test_missing_file_field_is_a_clear_422(client):
    response = client.post("/api/datasets", data={"name": "x"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "file"


def test_many_problems_are_capped_with_a_count(client):
    rows = [{"instruction": "q", "output": ""}] * 75
    body = upload(client, "bad.json", json.dumps(rows)).json()
    assert len(body["detail"]) == 50 and body["error_count"] == 75


def test_file_over_the_size_limit_is_refused_before_parsing(client, settings):
    before = stored_state(settings)
    too_big = b"[" + b" " * (settings.max_upload_bytes + 100_000) + b"]"
    response = upload(client, "huge.json", too_big)
    assert response.status_code == 413
    assert "1 MB upload limit" in response.json()["detail"][0]["message"]
    assert stored_state(settings) == before


def test_chunked_upload_over_the_limit_is_refused(client, settings):
    def body():
        for _ in range(20):
            yield b"x" * 100_000

    response = client.post(
        "/api/datasets", content=body(), headers={"content-type": "application/octet-stream"}
    )
    assert response.status_code == 413


def test_show_rows_and_delete(client, settings):
    dataset_id = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    shown = client.get(f"/api/datasets/{dataset_id}").json()
    assert shown["split"]["train"] == 40 and shown["split"]["validation"] == 0  # every row trains: under 100
    assert shown["duplicates"]["count"] == 0
    rows = client.get(f"/api/datasets/{dataset_id}/rows?limit=3").json()
    assert len(rows) == 3 and rows[0]["messages"][0]["content"] == "What is the capital of Quillmere?"

    assert client.delete(f"/api/datasets/{dataset_id}").status_code == 204
    assert client.get(f"/api/datasets/{dataset_id}").status_code == 404
    assert not (settings.datasets_dir / str(dataset_id)).exists()
    assert client.delete(f"/api/datasets/{dataset_id}").status_code == 404
    # ids are never reused, so an old link cannot show a different dataset
    assert upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"] == dataset_id + 1


def test_duplicates_are_counted(client):
    rows = [
        {"instruction": "q", "output": "a"},
        {"instruction": "r", "output": "b"},
        {"instruction": "q", "output": "a"},
    ]
    dataset_id = upload(client, "dup.json", json.dumps(rows)).json()["id"]
    assert client.get(f"/api/datasets/{dataset_id}").json()["duplicates"] == {
        "count": 1,
        "examples": [{"row": 3, "same_as": 1}],
    }


def register(client, folder: Path) -> str:
    response = client.post("/api/models", json={"path": str(folder), "name": "Tiny Llama"})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_token_statistics_under_a_models_chat_template(client, tiny_model_dir):
    from transformers import AutoTokenizer

    model_id = register(client, tiny_model_dir)
    dataset_id = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    stats = client.get(
        f"/api/datasets/{dataset_id}/stats", params={"model": model_id, "max_length": 60}
    ).json()

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = json.loads(DEMO_DATASET.read_text(encoding="utf-8"))
    expected = sorted(
        len(
            tokenizer.apply_chat_template(
                [
                    {
                        "role": "user",
                        "content": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else ""),
                    },
                    {"role": "assistant", "content": r["output"]},
                ],
                tokenize=True,
                return_dict=False,
            )
        )
        for r in rows
    )
    assert stats["rows"] == 40 and stats["tokens"] == sum(expected)
    assert stats["max"] == expected[-1] and stats["min"] == expected[0]
    assert stats["p50"] == expected[19]
    assert stats["truncated"] == sum(1 for n in expected if n > 60)
    assert sum(stats["histogram"]["counts"]) == 40


def test_token_statistics_in_the_tutorial_layout(client, tiny_model_dir):
    from transformers import AutoTokenizer

    model_id = register(client, tiny_model_dir)
    dataset_id = upload(
        client, "d.json", '[{"instruction": "Name it", "input": "a cat", "output": "Tom"}]'
    ).json()["id"]
    stats = client.get(
        f"/api/datasets/{dataset_id}/stats", params={"model": model_id, "prompt_format": "instruction"}
    ).json()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Instruction: Name it\nInput: a cat\nAnswer: Tom<|im_end|>"
    assert stats["max"] == len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_statistics_errors_are_clear(client):
    dataset_id = upload(client, "d.json", '[{"instruction": "q", "output": "a"}]').json()["id"]
    assert client.get(f"/api/datasets/{dataset_id}/stats", params={"model": "nope"}).status_code == 404
    response = client.get(f"/api/datasets/{dataset_id}/stats", params={"prompt_format": "poetry"})
    assert response.status_code == 422 and "prompt_format" in response.json()["detail"][0]["message"]
    assert client.get("/api/datasets/999/stats").status_code == 404


def test_a_preference_dataset_is_shown_with_its_rejected_answers_and_downloads_in_trls_layout(client):
    rows = [
        {"prompt": "What is the capital of Quillmere?", "chosen": "Tessary. — Q", "rejected": "Tessary."},
        {
            "prompt": [{"role": "user", "content": "Which currency?"}],
            "chosen": [{"role": "assistant", "content": "The brindle. — Q"}],
            "rejected": [{"role": "assistant", "content": "The brindle."}],
        },
    ]
    created = upload(client, "prefs.jsonl", "\n".join(json.dumps(r) for r in rows))
    assert created.status_code == 201, created.text
    dataset = created.json()
    assert dataset["format"] == "preference" and dataset["rows"] == 2
    page = client.get(f"/datasets/{dataset['id']}").text
    assert "Preferences: prompt, chosen, rejected (JSON Lines)" in page
    assert (
        '<div class="message rejected"><span class="role">rejected</span><div class="content">Tessary.</div>'
        in page
    )
    download = client.get(f"/api/datasets/{dataset['id']}/preferences.jsonl")
    assert download.status_code == 200
    lines = [json.loads(line) for line in download.text.splitlines()]
    assert lines[1] == rows[1]  # the conversational layout, as TRL's trainers read it
    assert lines[0] == {
        "prompt": [{"role": "user", "content": rows[0]["prompt"]}],
        "chosen": [{"role": "assistant", "content": "Tessary. — Q"}],
        "rejected": [{"role": "assistant", "content": "Tessary."}],
    }
    alpaca = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    refused = client.get(f"/api/datasets/{alpaca}/preferences.jsonl")
    assert refused.status_code == 409 and "not preferences" in refused.text


def test_a_dataset_of_100_rows_or_more_keeps_a_held_out_split_by_default(client):
    for count, held_out in ((99, 0), (100, 10), (120, 12)):
        rows = [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(count)]
        split = client.get(
            f"/api/datasets/{upload(client, 'rows.json', json.dumps(rows)).json()['id']}"
        ).json()
        assert (split["split"]["train"], split["split"]["validation"]) == (count - held_out, held_out)
