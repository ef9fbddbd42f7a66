"""Local SentencePiece tokenizer: exact round trip, single-token specials, the record layout."""

from transformers import AutoTokenizer

from simcot.train.data.generators import arith_chain
from simcot.train.data.tokenizer import BOT, EOT, LATENT, SpecialIds, encode_record, record_texts, train_sentencepiece


def _tok(tmp_path, records=None):
    records = records or arith_chain(200, 3, seed=0)
    return train_sentencepiece(record_texts(records, "### "), 300, tmp_path / "tok")


def test_round_trip_and_specials(tmp_path):
    tok = _tok(tmp_path)
    text = "7+5=12\n12-3=9\n### 9 and unseen chars: Zé!"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    for t in (BOT, EOT, LATENT, "\n"):
        assert len(tok.encode(t, add_special_tokens=False)) == 1
    ids = SpecialIds.of(tok)
    assert len({ids.bot, ids.eot, ids.latent, ids.pad, ids.eos}) == 5


def test_saved_tokenizer_reloads_with_auto_tokenizer(tmp_path):
    tok = _tok(tmp_path)
    again = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    s = "3+4=7\n### 7"
    assert again.encode(s, add_special_tokens=False) == tok.encode(s, add_special_tokens=False)


def test_encode_record_layout(tmp_path):
    tok = _tok(tmp_path)
    rec = {"question": "3+4-2", "steps": ["3+4=7", "7-2=5"], "answer": "5"}
    ex = encode_record(tok, rec, "### ")
    assert tok.decode(ex["q"]) == "3+4-2\n"
    assert [tok.decode(s) for s in ex["steps"]] == ["3+4=7\n", "7-2=5\n"]
    assert ex["a"][-1] == tok.eos_token_id
    assert tok.decode(ex["a"][:-1]) == "### 5"
    # a[a_marker] starts the answer proper; the token before it (CODI's distillation position)
    # is the last token of '### ' (here the whitespace piece)
    assert tok.decode(ex["a"][: ex["a_marker"]]) == "### " and tok.decode(ex["a"][ex["a_marker"]:-1]) == "5"
