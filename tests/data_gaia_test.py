"""GAIA and question-set builders on folders written by the tests, read back through TFDS."""

import json
import os

import pandas as pd
import pytest

from toolr1_jax.data import gaia, pipeline, qa

# Attachment bytes that are not valid UTF-8 and contain NULs: they must survive as bytes.
_XLSX = b"PK\x03\x04\x00\xff\xfe binary sheet \x00"
_PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


def _write_gaia(root):
    val = root / "2023" / "validation"
    test = root / "2023" / "test"
    val.mkdir(parents=True)
    test.mkdir(parents=True)
    (val / "aaa-1.xlsx").write_bytes(_XLSX)
    rows = [
        {
            "task_id": "aaa-1",
            "Question": "What is the total in the attached sheet?",
            "Level": 1,
            "Final answer": "42",
            "file_name": "aaa-1.xlsx",
            "Annotator Metadata": {"Steps": "1. Open the sheet", "Number of tools": "1"},
        },
        {
            "task_id": "bbb-2",
            "Question": "Which city, per the 2019 census, is largest?",
            "Level": "2",  # some releases store levels as strings
            "Final answer": "Tesmor",
            "file_name": "",
            "Annotator Metadata": {"Steps": "search", "Number of tools": "2"},
        },
        {
            "task_id": "ccc-3",
            "Question": "List the three colours.",
            "Level": 3,
            "Final answer": "red, green, blue",
            "file_name": "",
            "Annotator Metadata": {},
        },
    ]
    with open(val / "metadata.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write("\n")  # trailing blank lines are tolerated
    # The test split in the parquet release's layout: file_path relative to the repo root,
    # hidden answers, a struct-valued annotator column.
    (test / "ddd-4.png").write_bytes(_PNG)
    pd.DataFrame(
        [
            {
                "task_id": "ddd-4",
                "Question": "What does the picture show?",
                "Level": "1",
                "Final answer": "?",
                "file_name": "ddd-4.png",
                "file_path": "2023/test/ddd-4.png",
                "Annotator Metadata": {"Steps": "", "Number of tools": ""},
            },
            {
                "task_id": "eee-5",
                "Question": "How many moons?",
                "Level": "3",
                "Final answer": "?",
                "file_name": "",
                "file_path": "",
                "Annotator Metadata": {"Steps": "", "Number of tools": ""},
            },
        ]
    ).to_parquet(test / "metadata.parquet")
    return rows


def test_gaia_builder_reads_jsonl_and_parquet_with_attachments(tmp_path):
    manual = tmp_path / "GAIA"
    rows = _write_gaia(manual)
    data_dir = tmp_path / "tfds"

    val = pipeline.load_examples("gaia", "validation", data_dir=data_dir, manual_dir=manual)
    assert [e.task_id for e in val] == ["aaa-1", "bbb-2", "ccc-3"]
    by_id = {e.task_id: e for e in val}
    for row in rows:
        e = by_id[row["task_id"]]
        assert e.question == row["Question"]
        assert e.answer == row["Final answer"]
        assert e.level == int(row["Level"])
        assert e.metadata["annotator_metadata"] == row["Annotator Metadata"]
        assert e.metadata["answer_hidden"] is False
    assert by_id["aaa-1"].files == {"aaa-1.xlsx": _XLSX}
    assert by_id["bbb-2"].files == {}

    test = pipeline.load_examples("gaia", "test", data_dir=data_dir, manual_dir=manual)
    assert [(e.task_id, e.level, e.answer) for e in test] == [("ddd-4", 1, "?"), ("eee-5", 3, "?")]
    assert test[0].files == {"ddd-4.png": _PNG}
    assert test[0].metadata["answer_hidden"] is True
    assert test[0].metadata["annotator_metadata"] == {"Steps": "", "Number of tools": ""}

    # Once built, the dataset is read from data_dir alone: the manual folder is not needed.
    os.rename(manual, tmp_path / "moved")
    again = pipeline.load_examples("gaia", "validation", data_dir=data_dir)
    assert again == val


def test_gaia_level_configs_keep_one_level(tmp_path):
    _write_gaia(tmp_path / "GAIA")
    level2 = pipeline.load_examples(
        "gaia", "validation", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "GAIA",
        config="2023_level2",
    )  # fmt: skip
    assert [(e.task_id, e.level) for e in level2] == [("bbb-2", 2)]


def test_gaia_missing_folder_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        pipeline.load_examples(
            "gaia", "validation", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "nowhere"
        )
    message = str(err.value)
    assert "nowhere" in message
    assert "huggingface.co/datasets/gaia-benchmark/GAIA" in message
    assert "2023/validation" in message

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No GAIA metadata found"):
        pipeline.load_examples(
            "gaia", "validation", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "empty"
        )


def test_gaia_missing_attachment_and_bad_rows_are_named(tmp_path):
    manual = tmp_path / "GAIA"
    _write_gaia(manual)
    os.remove(manual / "2023" / "validation" / "aaa-1.xlsx")
    with pytest.raises(FileNotFoundError, match=r"aaa-1.*aaa-1\.xlsx"):
        list(gaia.read_split(manual, "validation"))

    with open(manual / "2023" / "validation" / "metadata.jsonl", "w") as f:
        f.write(json.dumps({"task_id": "x", "Question": "q?"}) + "\n")
    with pytest.raises(
        ValueError, match=r"row 0 lacks GAIA field\(s\) \['Level', 'Final answer'\]"
    ):
        list(gaia.read_split(manual, "validation"))


def test_qa_builder_reads_question_sets(tmp_path):
    manual = tmp_path / "hotpot"
    manual.mkdir()
    with open(manual / "train.jsonl", "w") as f:
        f.write(json.dumps({"_id": "h1", "question": "Who?", "answer": "Ada", "type": "bridge"}))
        f.write("\n")
        f.write(json.dumps({"question": "Which two?", "answer": ["x", "y"], "level": 2}) + "\n")
    (manual / "table.csv").write_bytes(b"a,b\n1,2\n")
    pd.DataFrame(
        [{"question": "Sum of a and b?", "answer": 3, "files": ["table.csv"], "level": 1}]
    ).to_parquet(manual / "validation.parquet")
    data_dir = tmp_path / "tfds"

    train = pipeline.load_examples(
        "qa", "train", data_dir=data_dir, manual_dir=manual, config="hotpot"
    )
    by_q = {e.question: e for e in train}
    assert by_q["Who?"].task_id == "h1"
    assert by_q["Who?"].answer == "Ada"
    assert by_q["Who?"].metadata == {"type": "bridge", "source": "qa"}
    assert by_q["Who?"].level == 1
    assert by_q["Which two?"].answer == "x, y"  # GAIA's comma-separated list form
    assert by_q["Which two?"].level == 2
    assert by_q["Which two?"].task_id.startswith("train-")

    (val,) = pipeline.load_examples(
        "qa", "validation", data_dir=data_dir, manual_dir=manual, config="hotpot"
    )
    assert (val.answer, val.files) == ("3", {"table.csv": b"a,b\n1,2\n"})

    with pytest.raises(ValueError, match="no split 'test'"):
        pipeline.load_examples("qa", "test", data_dir=data_dir, config="hotpot")


def test_qa_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipeline.load_examples("qa", "train", data_dir=tmp_path / "t", manual_dir=tmp_path / "no")
    manual = tmp_path / "set"
    manual.mkdir()
    (manual / "train.jsonl").write_text(json.dumps({"question": "Q?"}) + "\n")
    with pytest.raises(ValueError, match=r"train\.jsonl: row 0: needs a question and an answer"):
        list(qa.read_split(manual, "train"))
    (manual / "train.jsonl").write_text(json.dumps({"question": "Q?", "answer": "a"}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"train\.jsonl:2: not valid JSON"):
        list(qa.read_split(manual, "train"))
    with pytest.raises(ValueError, match="Unknown dataset 'hotpot'"):
        pipeline.load_examples("hotpot", "train", data_dir=tmp_path / "t")
