"""Readers and writers for the task formats simcot understands.

Every reader yields records ``{"question": str, "steps": list[str], "answer": str}``: one shape
for every task, so methods never look at where the data came from. A malformed row raises a
:class:`DataError` naming the file, the line and the problem, before any training starts.

Formats:
- ``gsm8k-jsonl``: GSM8K as released, ``{"question", "answer"}`` with ``<<48/2=24>>``
  calculator annotations and a final ``#### 72`` line.
- ``aug``: the GSM8K-Aug text of the implicit-CoT papers, ``question||<<a*b=c>> <<c+d=e>> #### e``
  (one step per whitespace-separated expression, as Coconut's preprocessing splits it).
- ``icot``: the iCoT multiplication text, ``5 6 3 2 * 7 4 3 4||<partial products> #### <digits>``
  (digits least-significant first, steps separated by `` + ``).
- ``coconut``: Coconut's JSON list of ``{"question", "steps", "answer", ...}`` (e.g. ProsQA).
- ``semcot``: the SemCoT release's JSON list of ``{"query", "reasoning", "answer",
  "condensed_reasoning"}`` (reasoning kept as text, no steps).
- rows of the Hub data sets (``gsm8k_row``, ``gsm8k_aug_row``, ``gsm8k_aug_nl_row``,
  ``multiarith_row``, ``svamp_row``): one row as ``datasets`` yields it, checked like a file row.
- ``jsonl``: one ``{"question", "steps", "answer"}`` object per line, for users' own data
  (optionally with ``reasoning`` and ``condensed_reasoning`` strings).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

Record = dict  # {"question": str, "steps": list[str], "answer": str} (+ optional REASONING_FIELDS)

# Optional strings a record may carry beside its steps: the reasoning as free text and a condensed
# form of it (SemCoT's field names). GSM8K rows get "reasoning" from their natural-language solution.
REASONING_FIELDS = ("reasoning", "condensed_reasoning")

_ANNOTATION = re.compile(r"<<([^<>]*)>>")
_INTEGRAL = re.compile(r"^(-?\d+)\.0+$")


class DataError(ValueError):
    """A malformed input row: the message names the file, the line and the problem."""


def _where(path: Path, line: int) -> str:
    return f"{path}:{line}"


def _check_record(rec: object, where: str) -> Record:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in ("question", "answer"):
        if key not in rec:
            raise DataError(f"{where}: missing field '{key}'")
        if not isinstance(rec[key], (str, int, float)) or isinstance(rec[key], bool):
            raise DataError(f"{where}: field '{key}' must be a string, got {type(rec[key]).__name__}")
    steps = rec.get("steps")
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        raise DataError(f"{where}: field 'steps' must be a list of strings")
    question, answer = str(rec["question"]).strip(), str(rec["answer"]).strip()
    if not question:
        raise DataError(f"{where}: empty question")
    if not answer:
        raise DataError(f"{where}: empty answer")
    out = {"question": question, "steps": [s.strip() for s in steps if s.strip()], "answer": answer}
    for key in REASONING_FIELDS:  # optional free-text reasoning (SemCoT's contrastive pairs)
        if key in rec:
            if not isinstance(rec[key], str):
                raise DataError(f"{where}: field '{key}' must be a string, got {type(rec[key]).__name__}")
            out[key] = rec[key].strip()
    return out


check_record = _check_record  # for readers outside this module (rows of named data sets)


def _not_utf8(path: Path, line: int, err: UnicodeDecodeError, column: int) -> DataError:
    return DataError(f"{_where(path, line)}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at column "
                     f"{column + 1}); re-encode the file as UTF-8")


def utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file; bytes that are not UTF-8 are a DataError at file:line."""
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, i, e, e.start) from None
            yield i, text[:-2] + "\n" if text.endswith("\r\n") else text  # as text mode reads CRLF files


def read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        raise _not_utf8(path, raw.count(b"\n", 0, e.start) + 1, e, e.start - line_start) from None


def json_lines(path: Path) -> Iterator[tuple[int, object]]:
    for i, line in utf8_lines(path):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{_where(path, i)}: invalid JSON ({e.msg})") from None


# ------------------------------------------------------------------------------------- GSM8K


def parse_gsm8k_answer(answer: str, steps: str = "equations") -> tuple[list[str], str]:
    """Split a GSM8K solution into (steps, final answer); raises ValueError without '####'."""
    if "####" not in answer:
        raise ValueError("no '####' final-answer line")
    body, final = answer.rsplit("####", 1)
    final = final.strip().replace(",", "")
    if not final:
        raise ValueError("empty final answer after '####'")
    if steps == "equations":
        out = [f"<<{m.strip()}>>" for m in _ANNOTATION.findall(body)]
    elif steps == "text":
        out = [_ANNOTATION.sub("", line).strip() for line in body.splitlines()]
        out = [s for s in out if s]
    else:
        raise ValueError(f"unknown gsm8k step style '{steps}'")
    return out, final


def gsm8k_row(obj: object, where: str, steps: str = "equations") -> Record:
    """One GSM8K row as released (a jsonl line, or an `openai/gsm8k` Hub row)."""
    _need_fields(obj, where, ("question", "answer"))
    if not isinstance(obj["answer"], str):
        raise DataError(f"{where}: field 'answer' must be a string")
    try:
        st, final = parse_gsm8k_answer(obj["answer"], steps)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    reasoning = _ANNOTATION.sub("", obj["answer"].rsplit("####", 1)[0])
    return _check_record({"question": obj["question"], "steps": st, "answer": final,
                          "reasoning": " ".join(reasoning.split())}, where)


def read_gsm8k_jsonl(path: Path, steps: str = "equations") -> Iterator[Record]:
    for i, obj in json_lines(path):
        yield gsm8k_row(obj, _where(path, i), steps)


def _need_fields(obj: object, where: str, fields: tuple[str, ...]) -> None:
    if not isinstance(obj, dict) or any(f not in obj for f in fields):
        raise DataError(f"{where}: expected an object with {' and '.join(repr(f) for f in fields)}")


# ----------------------------------------------------------------- rows of the Hub data sets
# Each takes one row as `datasets` yields it (or as a jsonl line of a local copy) and the place
# to name in errors (`zen-E/GSM8k-Aug[train]:row 12`), and goes through the same checks as files.


def _text_answer(value: object, where: str) -> str:
    """A final answer as text: '#### ' and thousands commas dropped, integral floats as ints."""
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: field 'answer' must be a string or a number, got {type(value).__name__}")
    text = value.replace("####", "").strip().replace(",", "")
    return _INTEGRAL.sub(r"\1", text)  # '145.0' (a float written as text) -> '145'


def gsm8k_aug_row(obj: object, where: str) -> Record:
    """`zen-E/GSM8k-Aug` (CODI's release of the iCoT GSM8K-Aug): question, cot = the calculator
    expressions separated by spaces (one step each, as CODI and Coconut split them), answer."""
    _need_fields(obj, where, ("question", "cot", "answer"))
    if not isinstance(obj["cot"], str):
        raise DataError(f"{where}: field 'cot' must be a string, got {type(obj['cot']).__name__}")
    return _check_record({"question": obj["question"], "steps": split_aug_steps(obj["cot"]),
                          "answer": _text_answer(obj["answer"], where)}, where)


def gsm8k_aug_nl_row(obj: object, where: str) -> Record | None:
    """`zen-E/GSM8k-Aug-NL`: the same with a natural-language cot; one step per sentence (CODI
    splits on '. '), and the whole cot is the record's reasoning text. Rows whose answer is null
    are unusable in the release (CODI skips them too): None, which the caller counts and drops."""
    _need_fields(obj, where, ("question", "cot", "answer"))
    if obj["answer"] is None:
        return None
    if not isinstance(obj["cot"], str):
        raise DataError(f"{where}: field 'cot' must be a string, got {type(obj['cot']).__name__}")
    cot = " ".join(obj["cot"].split())
    steps = [s if s.endswith(".") else s + "." for s in cot.split(". ") if s.strip(" .")]
    return _check_record({"question": obj["question"], "steps": steps, "reasoning": cot,
                          "answer": _text_answer(obj["answer"], where)}, where)


def multiarith_row(obj: object, where: str) -> Record:
    """`ChilleD/MultiArith`: question and final_ans only, no reasoning and no equations, so the
    record is answer-only (no steps)."""
    _need_fields(obj, where, ("question", "final_ans"))
    return _check_record({"question": obj["question"], "steps": [],
                          "answer": _text_answer(obj["final_ans"], where)}, where)


def svamp_row(obj: object, where: str) -> Record:
    """`ChilleD/SVAMP`: Body + Question (question_concat), Equation, Answer (a float). No reasoning
    text; the steps are the equation's operations, innermost first, as `<<a+b=c>>`."""
    _need_fields(obj, where, ("Body", "Question", "Equation", "Answer"))
    question = obj.get("question_concat") or f"{str(obj['Body']).strip()} {str(obj['Question']).strip()}"
    if not isinstance(obj["Equation"], str):
        raise DataError(f"{where}: field 'Equation' must be a string, got {type(obj['Equation']).__name__}")
    try:
        steps = equation_steps(obj["Equation"])
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    return _check_record({"question": question, "steps": steps, "answer": _text_answer(obj["Answer"], where)}, where)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.10g}"


def equation_steps(equation: str) -> list[str]:
    """SVAMP's fully parenthesised equation, e.g. '( ( 7.0 + 12.0 ) - 15.0 )', as one
    `<<7+12=19>>` step per operation in evaluation order; a bare number has no steps."""
    tokens = equation.replace("(", " ( ").replace(")", " ) ").split()
    steps: list[str] = []
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}

    def parse(i: int) -> tuple[float, int]:
        if i >= len(tokens):
            raise ValueError(f"equation '{equation}' ends early")
        if tokens[i] != "(":
            try:
                return float(tokens[i]), i + 1
            except ValueError:
                raise ValueError(f"equation '{equation}': '{tokens[i]}' is not a number") from None
        a, i = parse(i + 1)
        if i >= len(tokens) or tokens[i] not in ops:
            raise ValueError(f"equation '{equation}': expected an operator (+ - * /)")
        op = tokens[i]
        b, i = parse(i + 1)
        if i >= len(tokens) or tokens[i] != ")":
            raise ValueError(f"equation '{equation}': expected ')'")
        if op == "/" and b == 0:
            raise ValueError(f"equation '{equation}' divides by zero")
        value = ops[op](a, b)
        steps.append(f"<<{_number(a)}{op}{_number(b)}={_number(value)}>>")
        return value, i + 1

    _, end = parse(0)
    if end != len(tokens):
        raise ValueError(f"equation '{equation}': unexpected '{tokens[end]}'")
    return steps


# --------------------------------------------------------------------------- aug / icot text


def _parse_text_line(line: str, where: str, split_steps: Callable[[str], list[str]]) -> Record:
    if "||" not in line:
        raise DataError(f"{where}: missing '||' between question and reasoning")
    question, rest = line.split("||", 1)
    if "####" not in rest:
        raise DataError(f"{where}: missing '####' before the answer")
    cot, answer = rest.rsplit("####", 1)
    return _check_record({"question": question, "steps": split_steps(cot), "answer": answer}, where)


def _read_text(path: Path, split_steps: Callable[[str], list[str]]) -> Iterator[Record]:
    for i, line in utf8_lines(path):
        line = line.rstrip("\n")
        if line.strip():
            yield _parse_text_line(line, _where(path, i), split_steps)


def split_aug_steps(cot: str) -> list[str]:
    return cot.split()


def split_icot_steps(cot: str) -> list[str]:
    return [s.strip() for s in cot.split(" + ") if s.strip()]


def read_aug(path: Path) -> Iterator[Record]:
    return _read_text(path, split_aug_steps)


def read_icot(path: Path) -> Iterator[Record]:
    return _read_text(path, split_icot_steps)


# ---------------------------------------------------------------------------- JSON / JSONL


def json_list(path: Path, row: Callable[[object, str], Any]) -> Iterator[Any]:
    """The records of a file holding one JSON list, each through `row(obj, where)`."""
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{_where(path, e.lineno)}: invalid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records")
    for i, obj in enumerate(data):
        yield row(obj, f"{path}: record {i}")


def read_coconut_json(path: Path) -> Iterator[Record]:
    return json_list(path, _check_record)


def semcot_row(obj: object, where: str) -> Record:
    """One record of the SemCoT release's JSON (``datasets/<task>/{train,eval}_42.json``): query,
    reasoning (one string, e.g. GPT-4o-mini's for MultiArith), answer, and condensed_reasoning in the
    training files. SemCoT reads the reasoning whole, so it stays text and the steps are empty."""
    _need_fields(obj, where, ("query", "reasoning", "answer"))
    rec = {"question": obj["query"], "steps": [], "answer": _text_answer(obj["answer"], where),
           "reasoning": obj["reasoning"]}
    if obj.get("condensed_reasoning") is not None:
        rec["condensed_reasoning"] = obj["condensed_reasoning"]
    return _check_record(rec, where)


def read_semcot_json(path: Path) -> Iterator[Record]:
    return json_list(path, semcot_row)


def read_jsonl(path: Path) -> Iterator[Record]:
    for i, obj in json_lines(path):
        yield _check_record(obj, _where(path, i))


READERS: dict[str, Callable[[Path], Iterable[Record]]] = {
    "jsonl": read_jsonl,
    "gsm8k-jsonl": read_gsm8k_jsonl,
    "aug": read_aug,
    "icot": read_icot,
    "coconut": read_coconut_json,
    "semcot": read_semcot_json,
}


def read_file(path: str | Path, fmt: str = "auto", gsm8k_steps: str = "equations") -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if fmt == "auto":
        fmt = sniff_format(path)
    if fmt not in READERS:
        raise DataError(f"unknown data format '{fmt}' for {path} (choose from {', '.join(READERS)})")
    if fmt == "gsm8k-jsonl":
        return list(read_gsm8k_jsonl(path, gsm8k_steps))
    return list(READERS[fmt](path))


def sniff_format(path: Path) -> str:
    """Guess a format from the extension and the first row."""
    if path.suffix == ".json":
        head = read_utf8(path)[:4096]  # the first record's keys: SemCoT's 'query' or Coconut's 'steps'
        return "semcot" if '"query"' in head and '"steps"' not in head else "coconut"
    first = next((line for _, line in utf8_lines(path) if line.strip()), "")
    if path.suffix == ".jsonl" or first.lstrip().startswith("{"):
        try:
            obj = json.loads(first)
        except json.JSONDecodeError:
            return "jsonl"  # the reader reports the bad line
        return "jsonl" if isinstance(obj, dict) and "steps" in obj else "gsm8k-jsonl"
    if "||" in first:
        cot = first.split("||", 1)[1]
        return "icot" if " + " in cot and "<<" not in cot else "aug"
    raise DataError(f"{path}: cannot tell the format from the first line; pass --format")


# --------------------------------------------------------------------------------- writers


def _one_line(text: str) -> str:
    return " ".join(text.split())


def format_aug(rec: Record) -> str:
    if any(len(s.split()) != 1 for s in rec["steps"]):
        raise DataError("the aug format holds one whitespace-free expression per step; "
                        "these steps contain spaces (write them as jsonl)")
    steps = " ".join(rec["steps"])
    return f"{_one_line(rec['question'])}||{steps} #### {rec['answer']}"


def format_icot(rec: Record) -> str:
    return f"{_one_line(rec['question'])}||{' + '.join(rec['steps'])} #### {rec['answer']}"


def format_jsonl(rec: Record) -> str:
    return json.dumps({"question": rec["question"], "steps": rec["steps"], "answer": rec["answer"]},
                      ensure_ascii=False)


WRITERS: dict[str, Callable[[Record], str]] = {"jsonl": format_jsonl, "aug": format_aug, "icot": format_icot}


def write_records(records: Iterable[Record], path: str | Path, fmt: str) -> int:
    """Write records atomically (a half-written file never replaces a good one)."""
    if fmt not in WRITERS:
        raise DataError(f"unknown output format '{fmt}' (choose from {', '.join(WRITERS)})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(WRITERS[fmt](rec) + "\n")
            n += 1
    tmp.replace(path)
    return n
