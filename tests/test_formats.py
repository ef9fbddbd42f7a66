"""Readers on the shared data and on malformed input; writers round-trip."""

import json

import pytest

from conftest import SHARED_DATA
from simcot.train.data.formats import (DataError, format_aug, parse_gsm8k_answer, read_file, sniff_format,
                                  write_records)
from simcot.train.config import DataConfig
from simcot.train.data.sources import load_source

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")


@needs_shared
def test_gsm8k_shared_splits_have_all_rows_and_equation_steps():
    train = read_file(SHARED_DATA / "gsm8k" / "train.jsonl")
    test = read_file(SHARED_DATA / "gsm8k" / "test.jsonl")
    assert (len(train), len(test)) == (7473, 1319)
    first = test[0]
    assert first["steps"] == ["<<16-3-4=9>>", "<<9*2=18>>"] and first["answer"] == "18"
    assert all(s.startswith("<<") and s.endswith(">>") for r in train[:200] for s in r["steps"])


@needs_shared
def test_gsm8k_text_steps_are_the_solution_lines_without_annotations():
    test = read_file(SHARED_DATA / "gsm8k" / "test.jsonl", gsm8k_steps="text")
    assert test[0]["steps"][0].startswith("Janet sells 16 - 3 - 4 = 9")
    assert all("<<" not in s for r in test[:100] for s in r["steps"])


@needs_shared
def test_prosqa_test_split_reads_500_rows():
    rows = read_file(SHARED_DATA / "prosqa" / "test.json")
    assert len(rows) == 500
    assert rows[0]["steps"] and rows[0]["answer"].endswith(".")


@needs_shared
def test_gsm8k_writes_as_aug_lines_and_reads_back(tmp_path):
    records = load_source(DataConfig(source="gsm8k"), "test")
    out = tmp_path / "test.txt"
    assert write_records(records, out, "aug") == 1319
    back = read_file(out)  # sniffed as aug
    assert sniff_format(out) == "aug"
    assert [r["steps"] for r in back] == [r["steps"] for r in records]
    assert [r["answer"] for r in back] == [r["answer"] for r in records]


def test_aug_line_parses_into_steps_and_answer(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("Natalia sold 48 clips||<<48/2=24>> <<48+24=72>> #### 72\n")
    assert read_file(p, "aug") == [{"question": "Natalia sold 48 clips", "steps": ["<<48/2=24>>", "<<48+24=72>>"],
                                    "answer": "72"}]


def test_icot_line_parses_partial_products_as_steps(tmp_path):
    p = tmp_path / "m.txt"
    p.write_text("5 6 * 7 4||5 9 3 + 0 0 2 2 #### 5 9 5 2\n")
    assert read_file(p) == [{"question": "5 6 * 7 4", "steps": ["5 9 3", "0 0 2 2"], "answer": "5 9 5 2"}]


@pytest.mark.parametrize("content, fmt, message", [
    ("q||<<1+1=2>> 2\n", "aug", "m.txt:1: missing '####' before the answer"),
    ("ok||<<1=1>> #### 1\nno separator here #### 3\n", "aug", "m.txt:2: missing '||' between question and reasoning"),
    ("q||<<1=1>> #### \n", "aug", "m.txt:1: empty answer"),
    ('{"question": "q", "steps": ["a"], "answer": "1"}\n{"question": "q", "answer": "1"}\n', "jsonl",
     "m.txt:2: field 'steps' must be a list of strings"),
    ('{"question": "q", "steps": [], "answer": "1"}\n{oops\n', "jsonl", "m.txt:2: invalid JSON"),
    ('{"question": "q", "answer": "no final line"}\n', "gsm8k-jsonl", "m.txt:1: no '####' final-answer line"),
    ('{"steps": [], "answer": "1"}\n', "jsonl", "m.txt:1: missing field 'question'"),
])
def test_malformed_rows_name_file_line_and_problem(tmp_path, content, fmt, message):
    p = tmp_path / "m.txt"
    p.write_text(content)
    with pytest.raises(DataError) as e:
        read_file(p, fmt)
    assert str(e.value).startswith(str(tmp_path / message.split(":")[0]) + ":" + message.split(":", 1)[1])


LATIN1 = "caf\u00e9".encode("latin-1")  # b"caf\xe9": not UTF-8


@pytest.mark.parametrize("name, content, fmt, where", [
    ("a.txt", b"1+1||<<1+1=2>> #### 2\n" + LATIN1 + b"||<<1=1>> #### 1\n", "aug", "a.txt:2: not UTF-8 text "
     "(byte 0xe9 at column 4)"),
    ("i.txt", b"5 6 * 7 4||5 9 3 #### 5 9 5 2\r\n5 " + LATIN1 + b"||1 #### 1\r\n", "icot", "i.txt:2: not UTF-8 text "
     "(byte 0xe9 at column 6)"),
    ("j.jsonl", b'{"question": "q", "steps": [], "answer": "1"}\n{"question": "' + LATIN1 + b'"}\n', "jsonl",
     "j.jsonl:2: not UTF-8 text (byte 0xe9 at column 18)"),
    ("g.jsonl", b'{"question": "' + LATIN1 + b'", "answer": "#### 1"}\n', "gsm8k-jsonl", "g.jsonl:1: not UTF-8"),
    ("c.json", b'[\n {"question": "q",\n  "steps": ["' + LATIN1 + b'"], "answer": "1"}]\n', "coconut",
     "c.json:3: not UTF-8 text (byte 0xe9 at column 17)"),
    ("s.jsonl", LATIN1 + b"\n", "auto", "s.jsonl:1: not UTF-8 text (byte 0xe9 at column 4)"),  # sniffing
])
def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path, name, content, fmt, where):
    """Issue 15 (5): a raw UnicodeDecodeError with a buffer offset before; now file:line."""
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(DataError) as e:
        read_file(p, fmt)
    assert str(e.value).startswith(f"{tmp_path / where.split(':')[0]}:{where.split(':', 1)[1]}")


def test_crlf_lines_read_as_before(tmp_path):
    p = tmp_path / "crlf.txt"
    p.write_bytes(b"1+1||<<1+1=2>> #### 2\r\n")
    assert read_file(p, "aug") == [{"question": "1+1", "steps": ["<<1+1=2>>"], "answer": "2"}]


def test_coconut_json_must_be_a_list(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"question": "q"}))
    with pytest.raises(DataError, match=r"c.json: expected a JSON list of records"):
        read_file(p)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"data file not found: .*nope.jsonl"):
        read_file(tmp_path / "nope.jsonl")


def test_aug_writer_refuses_steps_with_spaces():
    with pytest.raises(DataError, match="one whitespace-free expression per step"):
        format_aug({"question": "q", "steps": ["two words"], "answer": "1"})


def test_gsm8k_answer_commas_are_removed():
    steps, final = parse_gsm8k_answer("He has <<1000+234=1234>>1,234 apples.\n#### 1,234")
    assert steps == ["<<1000+234=1234>>"] and final == "1234"


def test_svamp_equations_become_one_step_per_operation_innermost_first():
    from simcot.train.data.formats import equation_steps
    assert equation_steps("( ( 7.0 + 12.0 ) - 15.0 )") == ["<<7+12=19>>", "<<19-15=4>>"]
    assert equation_steps("( ( 3.0 * 4.0 ) / ( 10.0 - 2.0 ) )") == ["<<3*4=12>>", "<<10-2=8>>", "<<12/8=1.5>>"]
    assert equation_steps(" 5.0 ") == []
    with pytest.raises(ValueError, match=r"^equation '\( 3\.0 \+ \)': '\)' is not a number$"):
        equation_steps("( 3.0 + )")
    with pytest.raises(ValueError, match="unexpected '7.0'"):
        equation_steps("( 3.0 + 4.0 ) 7.0")


def test_hub_rows_are_checked_like_file_rows():
    from simcot.train.data.formats import gsm8k_aug_row, multiarith_row, svamp_row
    where = "ChilleD/SVAMP[train]:row 3"
    row = {"Body": "Ed has 6 dollars.", "Question": "He buys 4 pens. What does each cost?",
           "Equation": "( 6.0 / 4.0 )", "Answer": 1.5, "Type": "Common-Division"}
    assert svamp_row(row, where) == {"question": "Ed has 6 dollars. He buys 4 pens. What does each cost?",
                                     "steps": ["<<6/4=1.5>>"], "answer": "1.5"}
    with pytest.raises(DataError, match=r"^ChilleD/SVAMP\[train\]:row 3: equation '\( 6\.0 / 0\.0 \)' divides "
                                        r"by zero$"):
        svamp_row(dict(row, Equation="( 6.0 / 0.0 )"), where)
    with pytest.raises(DataError, match=r"^m\[test\]:row 0: expected an object with 'question' and 'final_ans'$"):
        multiarith_row({"question": "q"}, "m[test]:row 0")
    assert gsm8k_aug_row({"question": "q", "cot": "<<2*3=6>> <<6+1=7>>", "answer": "#### 1,007"}, "x") == {
        "question": "q", "steps": ["<<2*3=6>>", "<<6+1=7>>"], "answer": "1007"}
    assert svamp_row(dict(row, Equation="( 6.0 + 4.0 )", Answer="10.0"), where)["answer"] == "10"
    with pytest.raises(DataError, match=r"^x: field 'answer' must be a string or a number, got list$"):
        gsm8k_aug_row({"question": "q", "cot": "", "answer": [7]}, "x")


def test_simcot_data_previews_the_rows_a_run_generates():
    """`simcot data --source arith` makes the test rows a run with the same data settings makes
    (before: the generator's own max_value of 99 against the run's 9)."""
    from simcot.train.data.sources import load_splits

    cfg = DataConfig(source="arith", n_train=10, n_val=0, n_test=40)
    assert load_source(cfg, "test", n=40) == load_splits(cfg).test
    wide = DataConfig(source="arith", max_value=99, n_train=10, n_val=0, n_test=40)
    assert load_source(wide, "test", n=40) == load_splits(wide).test != load_splits(cfg).test
