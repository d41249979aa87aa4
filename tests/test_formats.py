"""Format detection, validation and normalisation of dataset files (no web, no database)."""

from __future__ import annotations

import json

import pytest

from app.datasets.formats import MAX_LISTED_ERRORS, DatasetInvalid, parse_dataset


def jsonl(*rows) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


def problems(raw: bytes) -> DatasetInvalid:
    with pytest.raises(DatasetInvalid) as info:
        parse_dataset(raw)
    return info.value


def test_alpaca_json_array_is_detected_and_normalised():
    raw = json.dumps(
        [
            {"instruction": "Add", "input": "2 and 3", "output": "5"},
            {"instruction": "Greet", "output": "Hello", "system": "Be brief."},
        ]
    ).encode()
    parsed = parse_dataset(raw)
    assert (parsed.format, parsed.layout, parsed.label) == ("alpaca", "json", "Alpaca (JSON array)")
    assert parsed.rows[0]["messages"] == [
        {"role": "user", "content": "Add\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert parsed.rows[0]["alpaca"] == {"instruction": "Add", "input": "2 and 3"}
    assert parsed.rows[1]["messages"][0] == {"role": "system", "content": "Be brief."}


def test_alpaca_jsonl_with_bom_and_blank_lines():
    raw = (
        b"\xef\xbb\xbf"
        + jsonl({"instruction": "a", "output": "b"})
        + b"\n\n"
        + jsonl({"instruction": "c", "output": "d"})
    )
    parsed = parse_dataset(raw)
    assert (parsed.format, parsed.layout, len(parsed.rows)) == ("alpaca", "jsonl", 2)


def test_openai_chat_jsonl_keeps_multi_turn_conversations():
    row = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"},
        ]
    }
    parsed = parse_dataset(jsonl(row))
    assert (parsed.format, parsed.layout) == ("openai", "jsonl")
    assert parsed.rows[0]["messages"] == row["messages"]


def test_sharegpt_roles_are_mapped():
    raw = json.dumps(
        [
            {
                "conversations": [
                    {"from": "system", "value": "s"},
                    {"from": "human", "value": "q"},
                    {"from": "gpt", "value": "a"},
                ]
            }
        ]
    ).encode()
    parsed = parse_dataset(raw)
    assert (parsed.format, parsed.layout) == ("sharegpt", "json")
    assert [m["role"] for m in parsed.rows[0]["messages"]] == ["system", "user", "assistant"]


def test_a_single_jsonl_row_is_accepted():
    assert len(parse_dataset(jsonl({"instruction": "a", "output": "b"})).rows) == 1


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"", "empty"),
        (b"   \n\t ", "empty"),
        (b"[]", "no rows"),
        (b"\xff\xfe[1]", "not UTF-8"),
        (b"hello there", "not JSON"),
        (b'"just a string"', "single string"),
        (b"42", "single number"),
        (b'{\n  "instruction": "a",\n  "output": "b"\n}', "single JSON object"),
        (b"[1, 2]", "must be a JSON object"),
        (b'[{"instruction": "a", "output": "b"', "not valid JSON"),
        (b'[{"question": "a", "answer": "b"}]', "Cannot tell the format"),
    ],
)
def test_file_level_problems_get_one_clear_sentence(raw, fragment):
    error = problems(raw)
    assert error.total == 1
    assert fragment in error.errors[0].message
    assert error.errors[0].row in (None, 1)


def test_not_utf8_names_the_line():
    error = problems(b'[{"instruction": "a",\n "output": "caf\xe9"}]')
    assert "line 2" in error.errors[0].message


@pytest.mark.parametrize(
    ("row", "field", "fragment"),
    [
        ({"output": "b"}, "instruction", "missing"),
        ({"instruction": "a"}, "output", "missing"),
        ({"instruction": 7, "output": "b"}, "instruction", "must be a string, not a number"),
        ({"instruction": "a", "output": ["b"]}, "output", "not a JSON array"),
        ({"instruction": "a", "output": "   "}, "output", "empty"),
        ({"instruction": "a", "input": 3, "output": "b"}, "input", "must be a string"),
        ({"instruction": "", "output": "b"}, "instruction", "empty"),
    ],
)
def test_alpaca_field_problems_name_row_and_field(row, field, fragment):
    good = {"instruction": "fine", "output": "fine"}
    error = problems(json.dumps([good, row]).encode())
    assert [(e.row, e.field) for e in error.errors] == [(2, field)]
    assert fragment in error.errors[0].message


@pytest.mark.parametrize(
    ("row", "field", "fragment"),
    [
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "Unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "must be a string"),
        ({"messages": []}, "messages", "empty list"),
        ({"messages": "hi"}, "messages", "must be a list"),
        ({"messages": [{"role": "user", "content": "q"}]}, "messages", "no assistant answer"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
            "messages[1].content",
            "answer is empty",
        ),
    ],
)
def test_openai_row_problems(row, field, fragment):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    error = problems(jsonl(good, row))
    assert [(e.row, e.field) for e in error.errors] == [(2, field)]
    assert fragment in error.errors[0].message


def test_sharegpt_unknown_role_lists_the_expected_ones():
    raw = json.dumps([{"conversations": [{"from": "bot", "value": "x"}]}]).encode()
    error = problems(raw)
    assert error.errors[0].field == "conversations[0].from"
    assert "Unknown role 'bot'" in error.errors[0].message and "gpt" in error.errors[0].message


def test_bad_jsonl_lines_are_numbered_by_line():
    raw = (
        jsonl({"instruction": "a", "output": "b"})
        + b"\n\n{broken\n"
        + jsonl({"instruction": "c", "output": "d"})
    )
    error = problems(raw)
    assert [(e.row, e.field) for e in error.errors] == [(3, None)]
    assert "not valid JSON" in error.errors[0].message


def test_many_problems_list_the_first_fifty_and_count_all():
    raw = json.dumps([{"instruction": "a", "output": ""}] * 120).encode()
    error = problems(raw)
    assert error.total == 120
    assert len(error.errors) == MAX_LISTED_ERRORS
    assert error.errors[-1].row == MAX_LISTED_ERRORS
    assert "120 problems" in error.summary and "first 50" in error.summary


def test_every_row_is_checked_not_just_the_first_bad_one():
    raw = json.dumps(
        [{"instruction": "a", "output": ""}, {"instruction": "b", "output": "ok"}, {"output": "c"}]
    ).encode()
    assert [(e.row, e.field) for e in problems(raw).errors] == [(1, "output"), (3, "instruction")]


def test_preference_rows_in_each_of_trls_layouts_become_one_shape():
    """Text prompt and answers; chat-message prompt and answers; whole conversations with the prompt
    implicit: each becomes the prompt and chosen answer as messages, the rejected answer beside them."""
    expected = {
        "messages": [
            {"role": "system", "content": "Sign off."},
            {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello. — Q"},
        ],
        "rejected": "Hello.",
    }
    system, user = {"role": "system", "content": "Sign off."}, {"role": "user", "content": "Hi?"}
    chosen, rejected = (
        {"role": "assistant", "content": "Hello. — Q"},
        {"role": "assistant", "content": "Hello."},
    )
    parsed = parse_dataset(
        jsonl(
            {"prompt": [system, user], "chosen": [chosen], "rejected": [rejected]},
            {"chosen": [system, user, chosen], "rejected": [system, user, rejected]},
            {"prompt": "Hi?", "chosen": "Hello. — Q", "rejected": "Hello."},
        )
    )
    assert (parsed.format, parsed.layout) == ("preference", "jsonl")
    assert parsed.label == "Preferences: prompt, chosen, rejected (JSON Lines)"
    assert parsed.rows[0] == parsed.rows[1] == expected
    assert parsed.rows[2] == {"messages": expected["messages"][1:], "rejected": "Hello."}


@pytest.mark.parametrize(
    ("row", "field", "fragment"),
    [
        ({"prompt": "Hi?", "chosen": "Same", "rejected": "Same "}, "rejected", "are the same answer"),
        (
            {"prompt": "Hi?", "chosen": "A"},
            "rejected",
            "'rejected' must be an answer (text or chat messages)",
        ),
        ({"prompt": "", "chosen": "A", "rejected": "B"}, "prompt", "'prompt' is empty"),
        ({"chosen": "A", "rejected": "B"}, "prompt", "The field 'prompt' is missing"),
        (
            {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "A", "rejected": "B"},
            "prompt",
            "must end with the user's message",
        ),
        (
            {
                "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "A"}],
                "rejected": [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": "B"}],
            },
            "chosen",
            "must share their conversation up to the last question",
        ),
        (
            {"prompt": "Hi?", "chosen": [{"role": "user", "content": "A"}], "rejected": "B"},
            "chosen",
            "no assistant answer",
        ),
    ],
)
def test_preference_row_problems(row, field, fragment):
    error = problems(jsonl(row)).errors[0]
    assert (error.row, error.field) == (1, field) and fragment in error.message, error
