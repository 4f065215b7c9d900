import json

import pytest

from mgs_megatron.data import DataValidationError, SourceConfig, load_source, load_sources

GOOD = [
    {"prompt": "What is 1+1?", "domain": "math", "answer": "2"},
    {"messages": [{"role": "user", "content": "hi"}], "domain": "chat"},
    {"prompt": "Be short.", "domain": "if", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
]


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_parquet_and_datasets_dir(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    j = load_source(str(_jsonl(tmp_path / "a.jsonl", GOOD)))
    assert [p.domain for p in j] == ["math", "chat", "if"] and j[0].uid.endswith("a.jsonl:1")
    assert j[1].as_messages() == [{"role": "user", "content": "hi"}]
    math_rows = [r for r in GOOD if r["domain"] == "math"] * 3
    pq.write_table(pa.Table.from_pylist(math_rows), tmp_path / "m.parquet")
    assert len(load_source(str(tmp_path / "m.parquet"))) == 3
    datasets.Dataset.from_list([{"prompt": "hello", "domain": "chat"}] * 2).save_to_disk(str(tmp_path / "ds"))
    got = load_sources([str(tmp_path / "ds"), SourceConfig(str(tmp_path / "a.jsonl"))])
    assert {d: len(v) for d, v in got.items()} == {"chat": 3, "math": 1, "if": 1}


def test_default_domain_from_source(tmp_path):
    p = _jsonl(tmp_path / "c.jsonl", [{"prompt": "hi"}])
    assert load_source(SourceConfig(str(p), domain="chat"))[0].domain == "chat"


@pytest.mark.parametrize("bad,field", [
    ({"domain": "math", "answer": "2"}, "prompt"),
    ({"prompt": "x", "answer": "2"}, "domain"),
    ({"prompt": "x", "domain": "math"}, "answer"),
    ({"prompt": "x", "domain": "math", "answer": ""}, "answer"),
    ({"prompt": "x", "domain": "if", "kwargs": [{}]}, "instruction_id_list"),
    ({"prompt": "x", "domain": "if", "instruction_id_list": ["a:b", "c:d"], "kwargs": [{}]}, "kwargs"),
    ({"messages": [{"role": "bot", "content": "x"}], "domain": "chat"}, "messages"),
    ({"messages": [], "domain": "chat"}, "messages"),
    ("not json {", "<json>"),
])
def test_malformed_rows_name_file_row_field(tmp_path, bad, field):
    # row 4 in the file: a blank line still counts as a line
    path = _jsonl(tmp_path / "bad.jsonl", [GOOD[0], GOOD[1], "", bad])
    with pytest.raises(DataValidationError) as e:
        load_source(str(path))
    assert e.value.row == 4 and e.value.field == field and e.value.file == str(path)
    assert str(path) in str(e.value) and "row 4" in str(e.value) and f"'{field}'" in str(e.value)


def test_parquet_row_numbers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [GOOD[0], {"prompt": "x", "domain": "math", "answer": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "b.parquet")
    with pytest.raises(DataValidationError, match=r"b.parquet: row 2: field 'answer'"):
        load_source(str(tmp_path / "b.parquet"))
