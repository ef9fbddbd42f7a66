import pytest

from simcot.train.data.answers import extract, is_correct, normalize


@pytest.mark.parametrize("a, b", [("1,000", "1000"), ("3.0", "3"), ("3.50", "3.5"), ("-0", "0"), (" 42 ", "42"),
                                  ("0.5", ".5"), ("7.", "7")])
def test_numbers_normalise_to_the_same_form(a, b):
    assert normalize(a) == normalize(b)


def test_text_answers_compare_with_collapsed_whitespace():
    assert normalize("Tom  is a\nwumpus.") == "Tom is a wumpus."
    assert normalize("5 2 8") != normalize("528")


def test_exact_rule_reads_after_the_last_marker():
    assert extract("<<2*3=6>>\n### 6") == "6"
    assert is_correct("### 15.0", "15")
    assert is_correct("### 14", "15") is False


def test_number_rules():
    assert is_correct("so 3 then 8 ", "8", "last_number")
    assert not is_correct("8 then 3", "8", "last_number")
    assert is_correct("8 then 3", "8", "any_number")
