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


# ----------------------------------------------------------------------------------------------
# The release as the hub serves it: parquet with string levels, the legacy JSONL, the Hugging
# Face cache's symlinked snapshots, and a clone made without git-lfs.
# ----------------------------------------------------------------------------------------------

_LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 12345\n"
)
_ATTACHMENTS = {
    "t-png": ("png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
    "t-mp3": ("mp3", b"ID3\x04\x00\x00\x00\x00\x00\x00\xff\xfb"),
    "t-zip": ("zip", b"PK\x05\x06" + b"\x00" * 18),
    "t-pdb": ("pdb", b"HEADER    EXTRACELLULAR MATRIX\nATOM      1  N   GLY A   1\n"),
}


def _release_rows(split: str) -> list[dict]:
    rows = []
    for i, (task_id, (ext, _)) in enumerate(_ATTACHMENTS.items()):
        rows.append({
            "task_id": task_id,
            "Question": f"Question about the {ext} file?",
            "Level": str(i % 3 + 1),
            "Final answer": "?" if split == "test" else f"answer {i}",
            "file_name": f"{task_id}.{ext}",
            "file_path": f"2023/{split}/{task_id}.{ext}",
            "Annotator Metadata": {"Steps": f"step {i}", "Number of tools": "1"},
        })  # fmt: skip
    rows.append({
        "task_id": f"{split}-plain", "Question": "No file here?", "Level": "2",
        "Final answer": "?" if split == "test" else "plain", "file_name": "", "file_path": "",
        "Annotator Metadata": {"Steps": "", "Number of tools": ""},
    })  # fmt: skip
    return rows


def _write_release(root, splits=("validation", "test"), *, lfs_pointers=False):
    """GAIA as of the parquet release: 2023/<split>/metadata.parquet (string Level, file_path
    relative to the root) plus the per-level parquet files, attachments named <task_id>.<ext>."""
    for split in splits:
        d = root / "2023" / split
        d.mkdir(parents=True)
        rows = _release_rows(split)
        frame = pd.DataFrame(rows)
        if lfs_pointers:
            (d / "metadata.parquet").write_text(_LFS_POINTER)
        else:
            frame.to_parquet(d / "metadata.parquet")
            for level in (1, 2, 3):
                frame[frame.Level == str(level)].to_parquet(d / f"metadata.level{level}.parquet")
        for task_id, (ext, data) in _ATTACHMENTS.items():
            path = d / f"{task_id}.{ext}"
            path.write_text(_LFS_POINTER) if lfs_pointers else path.write_bytes(data)
    return root


def test_parquet_release_every_field_level_and_attachment_byte(tmp_path):
    manual = _write_release(tmp_path / "GAIA")
    for split in ("validation", "test"):
        got = pipeline.load_examples("gaia", split, data_dir=tmp_path / "tfds", manual_dir=manual)
        rows = sorted(_release_rows(split), key=lambda r: r["task_id"])
        assert [e.task_id for e in got] == [r["task_id"] for r in rows]
        for e, row in zip(got, rows, strict=True):
            assert e.question == row["Question"]
            assert e.level == int(row["Level"])
            assert e.answer == row["Final answer"]
            assert e.metadata["answer_hidden"] is (split == "test")
            assert e.metadata["annotator_metadata"] == row["Annotator Metadata"]
            if row["file_name"]:
                assert e.files == {row["file_name"]: _ATTACHMENTS[e.task_id][1]}
            else:
                assert e.files == {}


def test_hugging_face_cache_snapshot_with_symlinked_blobs(tmp_path):
    real = _write_release(tmp_path / "real")
    # The cache's layout: content in blobs/<hash>, the tree in snapshots/<rev>/ as relative links.
    cache = tmp_path / "hub" / "datasets--gaia-benchmark--GAIA"
    (cache / "blobs").mkdir(parents=True)
    snapshot = cache / "snapshots" / "0123abc"
    for path in sorted(real.rglob("*")):
        if path.is_file():
            blob = cache / "blobs" / f"blob{len(list((cache / 'blobs').iterdir()))}"
            blob.write_bytes(path.read_bytes())
            link = snapshot / path.relative_to(real)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    assert (snapshot / "2023" / "test" / "t-png.png").is_symlink()

    got = pipeline.load_examples("gaia", "test", data_dir=tmp_path / "tfds", manual_dir=snapshot)
    assert {e.task_id: e.files for e in got}["t-mp3"] == {"t-mp3.mp3": _ATTACHMENTS["t-mp3"][1]}

    # Pointing at the cache folder itself names the snapshot to use.
    with pytest.raises(FileNotFoundError, match=r"set manual_dir to a snapshot.*0123abc"):
        pipeline.load_examples("gaia", "test", data_dir=tmp_path / "tfds2", manual_dir=cache)


def test_clone_without_lfs_names_git_lfs_pull(tmp_path):
    manual = _write_release(tmp_path / "GAIA", lfs_pointers=True)
    with pytest.raises(ValueError) as err:
        pipeline.load_examples("gaia", "validation", data_dir=tmp_path / "tfds", manual_dir=manual)
    message = str(err.value)
    assert "metadata.parquet" in message and "Git LFS pointer" in message
    assert f"git -C {manual} lfs pull" in message
    assert "ArrowInvalid" not in message


def test_legacy_jsonl_with_lfs_pointer_attachments_is_refused_not_embedded(tmp_path):
    manual = tmp_path / "GAIA"
    d = manual / "2023" / "validation"
    d.mkdir(parents=True)
    rows = []
    for i, (task_id, (ext, _)) in enumerate(_ATTACHMENTS.items()):
        (d / f"{task_id}.{ext}").write_text(_LFS_POINTER)  # what git leaves without git-lfs
        rows.append({"task_id": task_id, "Question": "q?", "Level": i % 3 + 1,
                     "Final answer": "a", "file_name": f"{task_id}.{ext}"})  # fmt: skip
    (d / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError) as err:
        pipeline.load_examples("gaia", "validation", data_dir=tmp_path / "tfds", manual_dir=manual)
    message = str(err.value)
    assert "4 attachment(s) are Git LFS pointers" in message
    for task_id, (ext, _) in _ATTACHMENTS.items():
        assert f"task {task_id}: " in message and f"{task_id}.{ext}" in message
    assert "lfs pull" in message


@pytest.mark.parametrize("level", ["?", "", None, "4", "1.5"])
def test_bad_level_names_the_task_and_file(tmp_path, level):
    manual = _write_release(tmp_path / "GAIA", splits=("validation",))
    path = manual / "2023" / "validation" / "metadata.parquet"
    frame = pd.read_parquet(path)
    frame.loc[frame.task_id == "t-zip", "Level"] = level
    frame.to_parquet(path)
    with pytest.raises(ValueError) as err:
        pipeline.load_examples("gaia", "validation", data_dir=tmp_path / "tfds", manual_dir=manual)
    message = str(err.value)
    assert (
        "t-zip" in message
        and str(path) in message
        and f"Level {'null' if level is None else repr(level)}" in message
    )


def test_null_answer_is_rejected_in_validation_and_hidden_in_test(tmp_path):
    manual = tmp_path / "GAIA"
    for split in ("validation", "test"):
        d = manual / "2023" / split
        d.mkdir(parents=True)
        rows = [
            {"task_id": f"{split}-null", "Question": "q?", "Level": 1, "Final answer": None},
            {"task_id": f"{split}-ok", "Question": "q?", "Level": 1, "Final answer": "?"},
        ]
        (d / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError) as err:
        list(gaia.read_split(manual, "validation"))
    assert "validation-null" in str(err.value) and "metadata.jsonl" in str(err.value)
    assert "no Final answer" in str(err.value)
    test = {e.task_id: e for e in gaia.read_split(manual, "test")}
    assert test["test-null"].answer == "?" and test["test-null"].metadata["answer_hidden"]
    assert "nan" not in {e.answer for e in test.values()}


def test_split_downloaded_after_the_build_names_the_folder_to_delete(tmp_path):
    manual = _write_release(tmp_path / "GAIA", splits=("validation",))
    data_dir = tmp_path / "tfds"
    assert len(pipeline.load_examples("gaia", "validation", data_dir=data_dir, manual_dir=manual))
    _write_release(tmp_path / "later", splits=("test",))
    os.rename(tmp_path / "later" / "2023" / "test", manual / "2023" / "test")
    with pytest.raises(ValueError) as err:
        pipeline.load_examples("gaia", "test", data_dir=data_dir, manual_dir=manual)
    built = pipeline.builder("gaia", data_dir=data_dir).data_dir
    assert f"delete {str(built)!r}" in str(err.value)
    # Doing what it says works.
    import shutil

    shutil.rmtree(built)
    test = pipeline.load_examples("gaia", "test", data_dir=data_dir, manual_dir=manual)
    assert len(test) == len(_release_rows("test"))


def test_a_folder_inside_the_download_names_the_one_to_use(tmp_path):
    manual = _write_release(tmp_path / "GAIA")
    for inside in (manual / "2023", manual / "2023" / "validation"):
        with pytest.raises(FileNotFoundError, match=f"inside the download: use '{manual}'"):
            pipeline.load_examples(
                "gaia", "validation", data_dir=tmp_path / "tfds", manual_dir=inside
            )
