"""Data formats, response-only masks, truncation accounting, and the documented errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import GSM8K, write_jsonl

from lmdistill.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    collate,
    collate_prompts,
    load_examples,
    tokenize_examples,
)


def test_three_formats_become_the_same_chat_example(tmp_path: Path) -> None:
    rows = [
        {"prompt": "What is 2+2?", "response": "4"},
        {
            "messages": [
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"},
            ]
        },
        {"question": "What is 2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"},
    ]
    examples = load_examples(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert [e.messages for e in examples] == [({"role": "user", "content": "What is 2+2?"},)] * 3
    assert [e.response for e in examples] == ["4", "4", "2+2=<<2+2=4>>4\n#### 4"]
    assert examples[0].source == f"{tmp_path / 'd.jsonl'}:1"


def test_json_list_and_prompt_only_rows(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[{"id": "a", "prompt": "hi", "system": "be brief"}]')
    (example,) = load_examples(str(path))
    assert example.id == "a" and example.response is None
    assert example.messages[0] == {"role": "system", "content": "be brief"}


@pytest.mark.skipif(not GSM8K.is_dir(), reason="needs ../shared/data/gsm8k")
def test_real_gsm8k_file_loads() -> None:
    examples = load_examples(str(GSM8K / "test.jsonl"), format="gsm8k")
    assert len(examples) == 1319
    assert all(e.response and "####" in e.response for e in examples)


def test_builtin_prompts_ship_with_the_package() -> None:
    examples = load_examples("builtin:gsm8k-demo")
    assert len(examples) == 400 and len({e.id for e in examples}) == 400


def test_a_row_range_splits_any_source_and_keeps_ids(tmp_path: Path) -> None:
    whole = load_examples("builtin:gsm8k-demo")
    head, tail = (
        load_examples("builtin:gsm8k-demo[:352]"),
        load_examples("builtin:gsm8k-demo[352:]"),
    )
    assert (len(head), len(tail)) == (352, 48)
    assert [e.id for e in head + tail] == [e.id for e in whole]
    assert not {e.id for e in head} & {e.id for e in tail}
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": f"p{i}", "response": "r"} for i in range(5)]
    )
    middle = load_examples(f"{path}[1:-1]")
    assert [e.id for e in middle] == ["1", "2", "3"]  # row ids of the whole file
    assert [e.messages[0]["content"] for e in middle] == ["p1", "p2", "p3"]
    with pytest.raises(DataError, match=r"d\.jsonl\[9:\]: the dataset is empty"):
        load_examples(f"{path}[9:]")
    with pytest.raises(DataError, match=r"a row range is \[start:stop\]"):
        load_examples(f"{path}[::2]")


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            ['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": '],
            r"d\.jsonl:2: invalid JSON",
        ),
        (['{"prompt": "a"}', "", "[1, 2]"], r"d\.jsonl:3: each row must be a JSON object"),
        (['{"text": "a"}'], r"d\.jsonl:1: cannot tell the format from the columns \['text'\]"),
        (['{"prompt": 3, "response": "b"}'], r"d\.jsonl:1: column 'prompt' must be a string"),
        (['{"messages": [{"role": "bot", "content": "x"}]}'], r"d\.jsonl:1: messages\[0\]"),
        (['{"response": "b", "question": null}'], r"d\.jsonl:1: missing column 'question'"),
    ],
)
def test_malformed_jsonl_names_file_line_and_problem(
    tmp_path: Path, lines: list[str], message: str
) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        load_examples(str(path))


def test_missing_columns_for_an_explicit_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: missing column 'prompt'"):
        load_examples(str(path), format="prompt_response")


def test_empty_dataset_and_missing_file_are_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="the dataset is empty"):
        load_examples(str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match="data file not found"):
        load_examples(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="unknown builtin dataset 'x'"):
        load_examples("builtin:x")


def test_loss_mask_covers_exactly_the_response(tiny_tokenizer: Any) -> None:
    example = Example("0", ({"role": "user", "content": "Add 2 and 3."},), "It is 5.")
    (item,), report = tokenize_examples([example], tiny_tokenizer, max_length=200)
    response_ids = [t for t in item.labels if t != IGNORE_INDEX]
    # The response is followed by the template's end-of-turn, so the student learns to stop.
    assert tiny_tokenizer.decode(response_ids) == "It is 5.<|im_end|>\n"
    n_prompt = item.labels.index(response_ids[0])
    prompt = tiny_tokenizer.decode(item.input_ids[:n_prompt])
    assert prompt == "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n"
    assert item.input_ids[n_prompt:] == response_ids
    assert report.as_dict() == {"total": 1, "truncated": 0, "dropped": 0, "empty": 0}


def test_truncation_is_counted_and_an_error_on_request(tiny_tokenizer: Any) -> None:
    short = Example("s", ({"role": "user", "content": "hi"},), "ok", "f:1")
    long = Example("l", ({"role": "user", "content": "hi"},), "x" * 100, "f:2")
    huge = Example("h", ({"role": "user", "content": "y" * 100},), "ok", "f:3")
    with pytest.warns(UserWarning, match="truncated 1 and dropped 1 of 3"):
        items, report = tokenize_examples([short, long, huge], tiny_tokenizer, max_length=60)
    assert report.as_dict() == {"total": 3, "truncated": 1, "dropped": 1, "empty": 0}
    assert [i.id for i in items] == ["s", "l"] and max(len(i.input_ids) for i in items) == 60
    with pytest.raises(DataError, match=r"f:2: example 'l' does not fit data.max_length"):
        tokenize_examples([short, long], tiny_tokenizer, max_length=60, on_truncation="error")


def test_empty_responses_are_dropped_counted_or_an_error_on_request(
    tiny_tokenizer: Any,
) -> None:
    ask = ({"role": "user", "content": "hi"},)
    kept = Example("k", ask, "ok", "f:1")
    empty = Example("e", ask, "", "f:2")
    blank = Example("b", ask, " \n\t", "f:3", response_complete=False)
    # Otherwise each would train on the end-of-turn token alone (or on no token at all).
    with pytest.warns(UserWarning, match=r"dropped 2 of 3 examples with an empty response: "):
        items, report = tokenize_examples([empty, kept, blank], tiny_tokenizer, max_length=60)
    assert [i.id for i in items] == ["k"]
    assert report.as_dict() == {"total": 3, "truncated": 0, "dropped": 0, "empty": 2}
    assert report.empty_ids == ["e", "b"]
    with pytest.raises(DataError, match=r"^f:2: example 'e' has an empty response"):
        tokenize_examples([kept, empty], tiny_tokenizer, max_length=60, on_empty="error")
    # Nothing to warn about when every response has text.
    (item,), report = tokenize_examples([kept], tiny_tokenizer, max_length=60, on_empty="error")
    assert report.empty == 0 and item.id == "k"


def test_an_incomplete_response_gets_no_end_of_turn(tiny_tokenizer: Any) -> None:
    cut = Example("c", ({"role": "user", "content": "hi"},), "and then", response_complete=False)
    (item,), _ = tokenize_examples([cut], tiny_tokenizer, max_length=100)
    assert tiny_tokenizer.decode([t for t in item.labels if t != IGNORE_INDEX]) == "and then"


def test_prompt_only_rows_cannot_be_trained_on(tiny_tokenizer: Any) -> None:
    with pytest.raises(DataError, match=r"f:7: no response to train on"):
        tokenize_examples(
            [Example("p", ({"role": "user", "content": "q"},), None, "f:7")],
            tiny_tokenizer,
            max_length=50,
        )


def test_collate_pads_right_and_prompts_pad_left(tiny_tokenizer: Any) -> None:
    examples = [Example(str(i), ({"role": "user", "content": "q" * i},), "a") for i in (1, 5)]
    items, _ = tokenize_examples(examples, tiny_tokenizer, max_length=100)
    batch = collate(items, pad_token_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0].tolist() == [1] * len(items[0].input_ids) + [0] * 4
    assert (batch["labels"][0, len(items[0].input_ids) :] == IGNORE_INDEX).all()
    prompts = collate_prompts([[5, 6], [7, 8, 9]], pad_token_id=0)
    assert prompts["input_ids"].tolist() == [[0, 5, 6], [7, 8, 9]]
    assert prompts["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
