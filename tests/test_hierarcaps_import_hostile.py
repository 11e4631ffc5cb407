"""Hostile official-layout CSVs for `hierarcaps import` and the CSV path of eval/train (issue 21).

The rows are synthetic, shaped like TAU-VAILab/hierarcaps' `hierarcaps_test.csv`
(id,captions,image_url) and `hierarcaps_train.csv.gz` (positive,negative); their data is not
shipped here.
"""

from __future__ import annotations

import csv
import gzip
import io
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest
from conftest import assert_dataset_invariants, read_rows, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.schemas import conform
from pipeline.core.shards import read_rejects
from pipeline.datasets.hierarcaps_csv import read_chains, read_official_csv, write_official_csv
from pipeline.errors import FgdataError

GOOD = "animal => dog => dog on a sofa => a brown dog sleeping on a sofa"
URL = "http://images.cocodataset.org/val2014/COCO_val2014_000000000139.jpg"

# (line bytes, expected reason or None for a row); ids are unique unless the case is about ids.
HOSTILE_TEST_ROWS = [
    (f"1,{GOOD},{URL},x".encode(), None),
    (b"2,animal => cat => cat", "wrong_field_count"),  # short row
    # a stray quote: the csv module reads on to the next quote (row 12), across rows 4 and 5
    (f'3,"bird => blue bird => blue bird on a branch => a blue bird on a branch,{URL},'.encode(), "unbalanced_quote"),
    (f"4,{GOOD.replace('dog', 'cat')},{URL},".encode(), None),
    (f"1,{GOOD.replace('brown', 'black')},,".encode(), "duplicate_key"),
    (f"6,animal => dog => dog on a sofa => {'a' * 200_000},,".encode(), "field_too_long"),
    (f",{GOOD},,".encode(), "missing_key"),
    (b"8,animal => do\x00g => dog on a sofa => a brown dog sleeping on a sofa,,", "control_character"),
    ("9,food => caf\u00e9 => caf\u00e9 table => a caf\u00e9 table with cups,,".encode("latin-1"), "not_utf8"),
    (b"10,a => b, c => d => e f g,,", "wrong_field_count"),  # an unquoted comma: one column too many
    (b"11,animal => dog,,", "wrong_tier_count"),
    (b'12,"food => fruit => sliced fruit, oranges => sliced oranges, on a plate",,', None),
    (b"14,animal =>  => dog on a sofa => a brown dog sleeping on a sofa,,", "blank_tier"),
    (b"\x00\x01,animal => dog => dog on a sofa => a brown dog on a sofa,,", "bad_key"),
    (b'15,"a => b => c d => e f g"h,,', "unbalanced_quote"),  # text after a closing quote
    # a line break inside a quoted caption, as one official row has: still one row (kept last:
    # it takes two lines of the file)
    (b'13,"food => pizza => pizza pies on the stove => two pizza pies ready to be cut\r\n.",,', None),
]


def _hostile_test_csv() -> bytes:
    # a spreadsheet's file: BOM, CRLF, an extra column, a blank line in the middle
    lines = [b"id,captions,image_url,note"] + [line for line, _ in HOSTILE_TEST_ROWS[:7]] + [b""]
    lines += [line for line, _ in HOSTILE_TEST_ROWS[7:]]
    return b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n"


def _expected() -> tuple[list[str], dict[str, str]]:
    """The keys of the rows, and reason by key of the rejects."""
    rows, rejects = [], {}
    for number, (line, reason) in enumerate(HOSTILE_TEST_ROWS):
        key = line.split(b",", 1)[0].decode()
        file_line = number + 2 + (number >= 7)  # after the header, and the blank line after the 7th row
        if reason is None:
            rows.append(key)
        else:
            rejects[key if reason not in ("missing_key", "bad_key") else f"row-{file_line}"] = reason
    return sorted(rows), rejects


def test_hostile_test_layout_rows_each_end_as_a_row_or_their_own_reject(tmp_path):
    path = tmp_path / "hierarcaps_test.csv"
    path.write_bytes(_hostile_test_csv())
    started = time.perf_counter()
    layout, rows, rejects = read_official_csv(path)
    seconds = time.perf_counter() - started
    expected_rows, expected_rejects = _expected()
    assert layout == "test"
    assert len(rows) + len(rejects) == len(HOSTILE_TEST_ROWS)
    assert sorted(r["key"] for r in rows) == expected_rows == ["1", "12", "13", "4"]
    assert {r["key"]: r["reason"] for r in rejects} == expected_rejects
    assert all(r["detail"].startswith("line ") and r["source"] == str(path) for r in rejects)
    by_key = {r["key"]: r for r in rows}
    assert by_key["1"]["tiers"][-1] == "a brown dog sleeping on a sofa"  # the first holder keeps the id
    assert by_key["1"]["image_url"] == URL
    assert by_key["12"]["tiers"][2] == "sliced fruit, oranges"
    assert by_key["13"]["tiers"][-1] == "two pizza pies ready to be cut ."
    assert seconds < 5
    conform(rejects, "rejects")  # every reject (none quotes undecodable bytes) can be written


def test_a_stray_quote_on_every_line_costs_each_line_only_and_stays_linear(tmp_path):
    def timed_read(path, lines):
        path.write_text("id,captions,image_url\n" + "\n".join(lines) + f"\nlast,{GOOD},{URL}\n")
        started = time.perf_counter()
        result = read_official_csv(path)
        return result, time.perf_counter() - started

    count = 60_000
    (_, rows, rejects), seconds = timed_read(tmp_path / "quotes.csv", [f'{i},"{GOOD},{URL}' for i in range(count)])
    (_, clean_rows, _), clean_seconds = timed_read(tmp_path / "clean.csv", [f"{i},{GOOD},{URL}" for i in range(count)])
    assert [r["key"] for r in rows] == ["last"] and len(clean_rows) == count + 1
    assert len(rejects) == count and {r["reason"] for r in rejects} == {"unbalanced_quote"}
    assert rejects[0]["key"] == "0"  # the id of the line, where it has one
    # every stray quote restarts the reader; restarting from a copy of the rest of the file made
    # this quadratic (7x the clean file's time at this size)
    assert seconds < 2 * clean_seconds + 0.5


def test_hostile_train_layout_gzipped_like_the_official_file(tmp_path):
    negative = "plant => flower => flower in a vase => a red flower standing in a vase"
    text = "\n".join(
        [
            "positive,negative",
            f"{GOOD},{negative}",
            f"{GOOD}",  # short row
            f"{GOOD},plant => flower",
            f"{GOOD},plant =>  => flower in a vase => a red flower in a vase",
            f"{GOOD},",  # no negative chain: still a chain
            f"animal => dog => dog on a sofa,{negative}",
        ]
    )
    path = tmp_path / "hierarcaps_train.csv.gz"
    path.write_bytes(gzip.compress(text.encode()))
    layout, rows, rejects = read_official_csv(path)
    assert layout == "train"
    assert [(r["key"], r["negative_tiers"] is None) for r in rows] == [("train-0000000", False), ("train-0000004", True)]
    assert rows[0]["negative_tiers"][1] == "flower"
    assert {r["key"]: r["reason"] for r in rejects} == {
        "train-0000001": "wrong_field_count",
        "train-0000002": "wrong_negative_tier_count",
        "train-0000003": "blank_negative_tier",
        "train-0000005": "wrong_tier_count",
    }


def test_official_layout_quoting_as_pandas_reads_it(tmp_path):
    # The official test file quotes only captions with a comma; the reference splits on "=>" and strips.
    path = tmp_path / "hierarcaps_test.csv"
    path.write_text(
        "id,captions,image_url\n"
        '0,"table => table with plates => table with three plates, with man and woman => A table with three plates.",' + URL + "\n"
        "1,bird => blue bird => blue bird sitting on top of branch => A blue bird sitting on a branch," + URL + "\n"
    )
    _, rows, rejects = read_official_csv(path)
    assert not rejects
    assert rows[0]["tiers"] == ["table", "table with plates", "table with three plates, with man and woman", "A table with three plates."]
    # fewer words in a later tier is fine in the official data (185 of its 1,000 test chains)
    assert rows[1]["tiers"][2] == "blue bird sitting on top of branch"


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "match neither HierarCaps layout"),
        (b"caption,url\na,b\n", "match neither HierarCaps layout"),
        ("id,captions\n1,a => b => c => d\n".encode("utf-16"), "UTF-16"),
        (b"\x1f\x8b\x08broken gzip", "cannot read the CSV"),
    ],
)
def test_a_file_without_a_usable_header_is_a_one_line_error(tmp_path, data, message):
    path = tmp_path / "x.csv"
    path.write_bytes(data)
    with pytest.raises(FgdataError, match=message):
        read_official_csv(path)


def test_eval_and_train_csv_path_keeps_the_good_chains(tmp_path):
    path = tmp_path / "hierarcaps_test.csv"
    path.write_bytes(_hostile_test_csv())
    counts = Counter()
    chains = read_chains([path], counts=counts)
    assert sorted(key for key, _, _ in chains) == ["1", "12", "13", "4"]  # a duplicate id no longer stops eval/train
    # every row left out is counted by its reason, for the run's report
    assert counts == {f"skipped_{reason}": n for reason, n in Counter(r for _, r in HOSTILE_TEST_ROWS if r).items()}


def test_cli_import_of_a_hostile_csv_exits_0_with_every_row_accounted_for(tmp_path):
    path = tmp_path / "hierarcaps_test.csv"
    path.write_bytes(_hostile_test_csv())
    out = tmp_path / "out"
    # 3 rows a shard: the duplicate of id 1 lands in another shard than its first holder
    started = time.perf_counter()
    result = run_cli("hierarcaps", "import", str(path), str(out), "--set", "run.num_cpus=1", "--set", "ingest.rows_per_shard=3", "--set", "run.progress=false")
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    expected_rows, expected_rejects = _expected()
    assert_dataset_invariants(out, expected_keys=set(expected_rows) | set(expected_rejects))
    rows, rejects = read_rows(out), read_rejects(out).to_pylist()
    assert sorted(r["key"] for r in rows) == expected_rows
    assert Counter(r["reason"] for r in rejects) == Counter(expected_rejects.values())
    assert seconds < 120


# --- hierarcaps export never replaces a file it was not told to ---------------------------------


def _chains_dataset(tmp_path):
    dataset = tmp_path / "chains"
    dataset.mkdir()
    row = {"key": "1", "split": "test", "tiers": GOOD.split(" => "), "negative_tiers": None, "image_url": URL, "source": "x", "entailment": None}
    pq.write_table(conform([row], "hierarcaps"), dataset / "part-00000.parquet")
    return dataset


def test_export_refuses_an_existing_file_unless_overwrite(tmp_path):
    dataset, out = _chains_dataset(tmp_path), tmp_path / "mine.csv"
    out.write_text("the user's own file\n")
    result = run_cli("hierarcaps", "export", str(dataset), str(out), "--layout", "test")
    assert result.returncode == 2 and "--overwrite" in result.stderr and "Traceback" not in result.stderr
    assert out.read_text() == "the user's own file\n"
    result = run_cli("hierarcaps", "export", str(dataset), str(out), "--layout", "test", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert list(csv.reader(io.StringIO(out.read_text())))[1] == ["1", GOOD, URL]


def test_export_writes_whole_or_not_at_all(tmp_path, monkeypatch):
    dataset, out = _chains_dataset(tmp_path), tmp_path / "new.csv"

    def broken_read(*args, **kwargs):
        raise OSError("disk went away")

    monkeypatch.setattr(pq, "read_table", broken_read)
    with pytest.raises(OSError):
        write_official_csv(dataset, out, "test")
    assert list(tmp_path.iterdir()) == [dataset]  # neither OUT nor a partial file


def test_export_into_a_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FgdataError, match="is a directory"):
        write_official_csv(_chains_dataset(tmp_path), tmp_path, "test", overwrite=True)


# --- the row reader, for any input ----------------------------------------------------------------

REASONS = {
    "wrong_field_count", "missing_key", "bad_key", "duplicate_key", "not_utf8", "field_too_long", "control_character",
    "wrong_tier_count", "blank_tier", "wrong_negative_tier_count", "blank_negative_tier", "unbalanced_quote", "unreadable_row",
}  # fmt: skip

_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
_tier = st.text(st.characters(codec="ascii", exclude_characters="\x00"), min_size=0, max_size=12)
_chain = st.lists(_tier, min_size=1, max_size=5).map(" => ".join)


@settings(max_examples=200, deadline=None)
@given(records=st.lists(st.tuples(st.one_of(_text, st.integers(0, 5).map(str)), st.one_of(_chain, _text), _text), max_size=12))
def test_written_records_all_come_back_as_rows_or_rejects(tmp_path_factory, records):
    """Whatever a csv writer puts in the three columns, every record is a row or a reject, and a
    row always holds four clean tiers."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["id", "captions", "image_url"])
    writer.writerows(records)
    path = tmp_path_factory.mktemp("csv") / "t.csv"
    path.write_text(buffer.getvalue(), encoding="utf-8", newline="")
    data_records = sum(1 for r in records if any(field.strip() for field in r) or len(r) > 1)
    _, rows, rejects = read_official_csv(path)
    assert len(rows) + len(rejects) == data_records
    assert {r["reason"] for r in rejects} <= REASONS
    assert len({r["key"] for r in rows}) == len(rows)
    for row in rows:
        assert len(row["tiers"]) == 4 and all(t and t == t.strip() and "\x00" not in t for t in row["tiers"])


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_any_bytes_after_a_header_never_raise(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("csv") / "t.csv"
    path.write_bytes(b"id,captions,image_url\n" + data)
    _, rows, rejects = read_official_csv(path)
    assert {r["reason"] for r in rejects} <= REASONS
    conform(rows, "hierarcaps") and conform(rejects, "rejects")
