"""Named data sets from where users have them: explicit files and URLs, local folders, the Hub.

The Hub is never reached: `data.hub_id` points `datasets.load_dataset` at a local folder laid out
like the Hub repository (data/<split>-00000-of-00001.jsonl and a README naming the splits).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simcot.train.data import remote
from simcot.train.data import sources
from simcot.train.config import DataConfig
from simcot.train.data.formats import DataError
from simcot.train.data.sources import load_splits

REPO = Path(__file__).resolve().parents[1]

AUG_ROWS = {
    "train": [{"question": f"Tom has {i} apples and buys 2. How many?", "cot": f"<<{i}+2={i + 2}>>",
               "answer": str(i + 2)} for i in range(1, 9)],
    "validation": [{"question": "Ann has 3 pens and 4 more. Total?", "cot": "<<3+4=7>>", "answer": "7"}],
    "test": [{"question": "Bo has 5 cats, each eats 2 fish, then 1 more fish. Fish?",
              "cot": "<<5*2=10>> <<10+1=11>>", "answer": "11"}],
}


def hub_repo(root: Path, splits: dict[str, list[dict]], fmt: str = "jsonl") -> Path:
    """A dataset repository as on the Hub: parquet/jsonl shards under data/ and a card naming them."""
    (root / "data").mkdir(parents=True)
    card = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split, rows in splits.items():
        shard = root / "data" / f"{split}-00000-of-00001.{fmt}"
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq
            pq.write_table(pa.Table.from_pylist(rows), shard)
        else:
            shard.write_text("".join(json.dumps(r) + "\n" for r in rows))
        card += [f"  - split: {split}", f"    path: data/{split}-*"]
    (root / "README.md").write_text("\n".join(card + ["---", ""]))
    return root


@pytest.fixture
def no_local_copies(tmp_path, monkeypatch):
    """No data folder holds the named sets (not even ../shared/data)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(sources, "data_dirs", lambda cfg: [empty])
    return empty


def test_hub_rows_go_through_the_parser_with_the_hubs_splits(tmp_path, no_local_copies, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    repo = hub_repo(tmp_path / "GSM8k-Aug", AUG_ROWS)
    s = load_splits(DataConfig(source="gsm8k-aug", hub_id=str(repo), n_train=0, n_val=5, n_test=0))
    assert s.sizes() == {"train": 8, "val": 1, "test": 1}  # the Hub's validation split, no hold-out
    assert s.test == [{"question": AUG_ROWS["test"][0]["question"], "steps": ["<<5*2=10>>", "<<10+1=11>>"],
                       "answer": "11"}]
    assert s.train[0]["steps"] == ["<<1+2=3>>"] and s.val[0]["answer"] == "7"
    assert s.origin == {"train": f"{repo}[train]", "val": f"{repo}[validation]", "test": f"{repo}[test]"}
    # an explicit file in the release's own fields replaces that split only
    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"question": "Mine?", "cot": "<<1*1=1>>", "answer": "1"}) + "\n")
    s = load_splits(DataConfig(source="gsm8k-aug", hub_id=str(repo), test_file=str(mine)))
    assert [r["question"] for r in s.test] == ["Mine?"] and len(s.train) == 8


def test_a_bad_hub_row_is_named_by_dataset_split_and_row(tmp_path, no_local_copies, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rows = {"train": [dict(AUG_ROWS["train"][0]), dict(AUG_ROWS["train"][1], question="  ")],
            "test": AUG_ROWS["test"]}
    repo = hub_repo(tmp_path / "bad", rows)
    with pytest.raises(DataError) as e:
        load_splits(DataConfig(source="gsm8k-aug", hub_id=str(repo)))
    assert str(e.value) == f"{repo}[train]:row 1: empty question"


def test_svamp_and_multiarith_rows_as_the_hub_has_them(tmp_path, no_local_copies, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    svamp = {s: [{"ID": "chal-1", "Body": "Paige raised 7 goldfish and 12 catfish.", "Question": "Now she has 15 "
                  "left. How many fishes disappeared?", "Equation": "( ( 7.0 + 12.0 ) - 15.0 )", "Answer": 4.0,
                  "Type": "Subtraction", "question_concat": "Paige raised 7 goldfish and 12 catfish. Now she has 15 "
                  "left. How many fishes disappeared?"}] * 3 for s in ("train", "test")}
    svamp_repo = hub_repo(tmp_path / "SVAMP", svamp, fmt="parquet")  # ChilleD/SVAMP is parquet shards
    s = load_splits(DataConfig(source="svamp", hub_id=str(svamp_repo), n_val=1))
    assert s.test[0]["steps"] == ["<<7+12=19>>", "<<19-15=4>>"] and s.test[0]["answer"] == "4"
    assert s.sizes() == {"train": 2, "val": 1, "test": 3}  # no validation split: held out of train
    multi = {sp: [{"question": " Paige had 11 songs. She deleted 9 and added 8. How many now? ", "final_ans": "10"}]
             * 2 for sp in ("train", "test")}
    m = load_splits(DataConfig(source="multiarith", hub_id=str(hub_repo(tmp_path / "MultiArith", multi)), n_val=0))
    assert m.test[0] == {"question": "Paige had 11 songs. She deleted 9 and added 8. How many now?", "steps": [],
                         "answer": "10"}


def test_gsm8k_aug_nl_splits_sentences_and_drops_rows_without_an_answer(tmp_path, no_local_copies, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    nl = {"train": [{"question": "Q1?", "cot": "Tom has 1 + 2 = 3 apples. He eats one, 3 - 1 = 2.", "answer": "2"},
                    {"question": "Q2?", "cot": "Nothing.", "answer": None}] * 2,
          "test": [{"question": "Q3?", "cot": "5 * 2 = 10.", "answer": "10"}]}
    s = load_splits(DataConfig(source="gsm8k-aug-nl", hub_id=str(hub_repo(tmp_path / "NL", nl)), n_val=1))
    assert len(s.train) + len(s.val) == 2
    assert s.train[0]["steps"] == ["Tom has 1 + 2 = 3 apples.", "He eats one, 3 - 1 = 2."]
    assert s.train[0]["reasoning"] == "Tom has 1 + 2 = 3 apples. He eats one, 3 - 1 = 2."


def test_a_local_copy_comes_before_the_hub_and_names_file_and_line(tmp_path, monkeypatch):
    first, second = tmp_path / "mine", tmp_path / "shared"
    (second / "gsm8k-aug").mkdir(parents=True)
    (second / "gsm8k-aug" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in AUG_ROWS["train"]))
    (second / "gsm8k-aug" / "test.txt").write_text("Bo has 5 cats||<<5*2=10>> #### 10\n")
    monkeypatch.setenv("SIMCOT_DATA_DIR", str(second))
    # data.data_dir is searched first; it lacks the folder, so $SIMCOT_DATA_DIR's copy is used (no Hub id)
    s = load_splits(DataConfig(source="gsm8k-aug", data_dir=str(first), hub_id="/nonexistent", n_val=2))
    assert s.sizes() == {"train": 6, "val": 2, "test": 1} and s.test[0]["answer"] == "10"
    train_file = second / "gsm8k-aug" / "train.jsonl"
    assert s.origin == {"train": str(train_file), "val": f"held out of {train_file}", "test": str(train_file.with_name(
        "test.txt"))}
    with (second / "gsm8k-aug" / "train.jsonl").open("a") as f:
        f.write(json.dumps({"question": "Q", "cot": "<<1+1=2>>"}) + "\n")
    with pytest.raises(DataError, match=r"gsm8k-aug/train\.jsonl:9: expected an object with 'question' and 'cot' "
                                        r"and 'answer'$"):
        load_splits(DataConfig(source="gsm8k-aug", data_dir=str(first)))


def test_offline_without_a_cached_copy_is_one_line_naming_what_was_tried(tmp_path):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), SIMCOT_DATA_DIR=str(tmp_path),
               OMP_NUM_THREADS="1")
    env.pop("HF_DATASETS_CACHE", None)
    r = subprocess.run([sys.executable, "-m", "simcot.launchers.cli", "data", "--source", "gsm8k-aug",
                        "--split", "test"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    head = f"simcot: error: source 'gsm8k-aug': none of its places is reachable (tried {tmp_path}/gsm8k-aug/"
    assert lines[0].startswith(head)
    assert "Hub dataset zen-E/GSM8k-Aug): ConnectionError: Couldn't reach 'zen-E/GSM8k-Aug' on the Hub" in lines[0]
    assert lines[0].endswith("(HF_DATASETS_OFFLINE is set and it is not in the cache)")


def test_coconut_files_by_url_are_fetched_once_into_the_cache(tmp_path, no_local_copies, monkeypatch):
    src = tmp_path / "coconut"
    src.mkdir()
    rows = [{"question": f"Is Tom a wumpus {i}?", "steps": ["Tom is a yumpus.", "Every yumpus is a wumpus."],
             "answer": "Tom is a wumpus.", "edges": [[0, 1]]} for i in range(6)]
    for split in ("train", "valid", "test"):
        (src / f"prosqa_{split}.json").write_text(json.dumps(rows))
    monkeypatch.setenv("SIMCOT_CACHE", str(tmp_path / "cache"))
    urls = tuple((src / f"prosqa_{s}.json").as_uri() for s in ("train", "valid", "test"))
    monkeypatch.setitem(sources.NAMED, "prosqa", sources.Named("prosqa", sources.NAMED["prosqa"].row, urls=urls))
    s = load_splits(DataConfig(source="prosqa", n_val=0))  # the release's URLs: no local copy
    assert s.sizes() == {"train": 6, "val": 6, "test": 6}
    assert s.test[0]["steps"] == ["Tom is a yumpus.", "Every yumpus is a wumpus."]
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 3 and all(n.endswith(".json") and "-prosqa_" in n for n in cached)
    (src / "prosqa_test.json").unlink()  # the cached copy is used from now on
    t = load_splits(DataConfig(source="prontoqa", train_file=urls[0], test_file=urls[2], n_val=2))
    assert t.sizes() == {"train": 4, "val": 2, "test": 6}


def test_an_unreachable_url_is_one_line(tmp_path, no_local_copies, monkeypatch):
    monkeypatch.setenv("SIMCOT_CACHE", str(tmp_path / "cache"))
    missing = (tmp_path / "nope.json").as_uri()
    with pytest.raises(DataError, match=rf"^cannot fetch {missing}: "):
        load_splits(DataConfig(source="prosqa", train_file=missing))
    with pytest.raises(DataError, match=r"^source 'prontoqa': none of its places is reachable \(tried .*empty/prontoqa/"
                                        r"\): no download location; pass data.train_file"):
        load_splits(DataConfig(source="prontoqa"))
    assert not list((tmp_path / "cache").glob("*.part*"))
    assert remote.is_url(missing) and not remote.is_url(str(tmp_path))


def test_data_dir_comes_before_simcot_data_dir(tmp_path, monkeypatch):
    mine, env = tmp_path / "mine", tmp_path / "env"
    for root, answer in ((mine, "10"), (env, "99")):
        (root / "svamp").mkdir(parents=True)
        row = {"Body": "Ann has 4 pens.", "Question": "She buys 6 more. How many?", "Equation": "( 4.0 + 6.0 )",
               "Answer": float(answer)}
        (root / "svamp" / "train.json").write_text(json.dumps([row] * 4))  # a JSON list, as ChilleD's files
    monkeypatch.setenv("SIMCOT_DATA_DIR", str(env))
    s = load_splits(DataConfig(source="svamp", data_dir=str(mine), n_val=1))
    assert s.train[0] == {"question": "Ann has 4 pens. She buys 6 more. How many?", "steps": ["<<4+6=10>>"],
                          "answer": "10"}
    assert s.sizes() == {"train": 3, "val": 1, "test": 0}
    assert load_splits(DataConfig(source="svamp", n_val=1)).train[0]["answer"] == "99"


def test_semcot_release_files_are_sniffed_and_checked(tmp_path):
    from simcot.train.data.formats import read_file, sniff_format
    p = tmp_path / "train_42.json"
    p.write_text(json.dumps([{"query": " Q? ", "full_answer": "1+1=2\n####2", "reasoning": "1+1=2", "answer": "2",
                              "condensed_reasoning": "2"}, {"query": "Q2?", "reasoning": "x"}]))
    assert sniff_format(p) == "semcot"
    with pytest.raises(DataError, match=r"train_42\.json: record 1: expected an object with 'query' and 'reasoning' "
                                        r"and 'answer'$"):
        read_file(p)
    p.write_text(json.dumps([{"query": " Q? ", "reasoning": "1+1=2", "answer": "2", "condensed_reasoning": "2"}]))
    assert read_file(p) == [{"question": "Q?", "steps": [], "answer": "2", "reasoning": "1+1=2",
                             "condensed_reasoning": "2"}]
