"""Generators: deterministic for a seed, arithmetically right, in the iCoT layout."""

import re

import pytest

from simcot.train.data.formats import format_icot, read_file
from simcot.train.data.generators import arith_chain, multiplication, multiplication_record


def _rev(s: str) -> int:
    return int("".join(reversed(s.split())))


def test_arith_is_deterministic_and_seed_dependent():
    assert arith_chain(50, 4, seed=1) == arith_chain(50, 4, seed=1)
    assert arith_chain(50, 4, seed=1) != arith_chain(50, 4, seed=2)


@pytest.mark.parametrize("steps, max_value", [(1, 60), (3, 60), (8, 60), (6, 9), (6, 2)])
def test_arith_steps_evaluate_left_to_right(steps, max_value):
    for rec in arith_chain(200, steps, seed=0, max_operand=9, max_value=max_value):
        assert len(rec["steps"]) == steps
        terms = re.findall(r"[+-]?\d+", rec["question"])
        value = int(terms[0])
        for term, step in zip(terms[1:], rec["steps"]):
            new = value + int(term)
            assert step == f"{value}{term[0]}{abs(int(term))}={new}"
            assert 0 <= new <= max_value
            value = new
        assert rec["answer"] == str(value)


def test_arith_min_steps_varies_the_length():
    lengths = {len(r["steps"]) for r in arith_chain(300, 6, seed=0, min_steps=2)}
    assert lengths == {2, 3, 4, 5, 6}


def test_multiplication_matches_the_icot_reference_line():
    rec = multiplication_record(2365, 4347, 4)
    assert format_icot(rec) == ("5 6 3 2 * 7 4 3 4||5 5 5 6 1 + 0 0 6 4 9 0 ( 5 5 1 1 1 1 ) + "
                                "0 0 5 9 0 7 0 ( 5 5 6 0 2 8 0 ) + 0 0 0 0 6 4 9 0 #### 5 5 6 0 8 2 0 1")


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
def test_multiplication_partial_products_sum_to_the_answer(k):
    recs = multiplication(40, k, seed=3)
    assert recs == multiplication(40, k, seed=3)
    for rec in recs:
        a_s, b_s = rec["question"].split(" * ")
        a, b = _rev(a_s), _rev(b_s)
        assert len(a_s.split()) == len(b_s.split()) == k
        assert _rev(rec["answer"]) == a * b and len(rec["answer"].split()) == 2 * k
        total = 0
        for i, step in enumerate(rec["steps"]):
            pp = step.split(" ( ")[0]
            total += _rev(pp)
            assert _rev(pp) == a * int(str(b)[::-1][i]) * 10**i
            if "(" in step:
                assert _rev(step.split(" ( ")[1].rstrip(" )")) == total
        assert total == a * b


def test_multiplication_round_trips_through_the_icot_text(tmp_path):
    recs = multiplication(20, 3, seed=0)
    p = tmp_path / "m.txt"
    p.write_text("\n".join(format_icot(r) for r in recs) + "\n")
    assert read_file(p, "icot") == recs


def test_tokenize_gives_the_same_examples_without_the_datasets_package(monkeypatch, tmp_path):
    """The lent GPU's bare image has no `datasets`: tokenizing falls back to a loop, same rows."""
    import sys

    from simcot.train.data.examples import tokenize
    from simcot.train.data.generators import arith_chain
    from simcot.train.data.tokenizer import record_texts, train_sentencepiece

    records = arith_chain(40, steps=3, seed=0)
    tok = train_sentencepiece(record_texts(records, "### "), 96, tmp_path / "tok")
    with_ds = tokenize(records, tok, "### ")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    assert tokenize(records, tok, "### ") == with_ds
    assert len(with_ds) == 40 and with_ds[0]["q"] and with_ds[0]["steps_text"] == records[0]["steps"]
