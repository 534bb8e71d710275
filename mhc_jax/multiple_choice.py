"""A built-in multiple-choice scorer (no lm-eval needed): accuracy and length-normalised accuracy on a
JSONL file in the HellaSwag, PIQA or ARC shape, or the generic shape.

    python -m mhc_jax.multiple_choice --workdir W --data hellaswag_val.jsonl [--limit N] [--json out.json]
    python -m mhc_jax.multiple_choice --export DIR --data arc_easy.jsonl

Shapes (one JSON object per line; `--format auto` picks by the keys of the first line):
    hellaswag  {"ctx": str, "endings": [str, ...], "label": int}        (also "activity_label", ignored)
    piqa       {"goal": str, "sol1": str, "sol2": str, "label": 0 | 1}
    arc        {"question": str, "choices": {"text": [...], "label": ["A", ...]}, "answerKey": "A"}
               or the original {"question": {"stem": str, "choices": [{"text", "label"}, ...]}, "answerKey"}
    generic    {"context": str, "choices": [str, ...], "gold": int}

Each choice is scored as the log-likelihood of " " + choice after the context (lm-eval's prompts: HellaSwag
the context itself, PIQA and ARC "Question: ...\\nAnswer:"). acc: the gold choice has the highest
log-likelihood; acc_norm: the highest log-likelihood per character of the choice's text (without the
separating space), lm-eval's definition. Ties go to the first choice.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from mhc_jax.cli import entry_point, exit_process, write_json
from mhc_jax.errors import DataError, MhcJaxError
from mhc_jax.scoring import load_scorer

FORMATS = ("auto", "hellaswag", "piqa", "arc", "generic")


@dataclasses.dataclass(frozen=True)
class Question:
    context: str
    choices: tuple[str, ...]
    gold: int


def _arc(row: dict) -> Question:
    q = row["question"]
    if isinstance(q, dict):  # the original ARC JSONL
        stem, texts, labels = q["stem"], [c["text"] for c in q["choices"]], [c["label"] for c in q["choices"]]
    else:
        stem, texts, labels = q, list(row["choices"]["text"]), list(row["choices"]["label"])
    key = str(row["answerKey"])
    if key not in labels:
        raise ValueError(f"answerKey {key!r} is not one of the choice labels {labels}")
    return Question(f"Question: {stem}\nAnswer:", tuple(texts), labels.index(key))


def parse_question(row: dict, fmt: str) -> Question:
    if fmt == "hellaswag":
        return Question(row["ctx"], tuple(row["endings"]), int(row["label"]))
    if fmt == "piqa":
        return Question(f"Question: {row['goal']}\nAnswer:", (row["sol1"], row["sol2"]), int(row["label"]))
    if fmt == "arc":
        return _arc(row)
    if fmt == "generic":
        return Question(row["context"], tuple(row["choices"]), int(row["gold"]))
    raise ValueError(f"format {fmt!r} is not allowed: use one of {FORMATS}")


def detect_format(row: dict) -> str:
    keys = set(row)
    for fmt, needed in (("hellaswag", {"ctx", "endings", "label"}), ("piqa", {"goal", "sol1", "sol2", "label"}),
                        ("arc", {"question", "answerKey"}), ("generic", {"context", "choices", "gold"})):
        if needed <= keys:
            return fmt
    raise ValueError(f"cannot tell the format of a row with keys {sorted(keys)}: expected the HellaSwag "
                     "(ctx, endings, label), PIQA (goal, sol1, sol2, label), ARC (question, choices, answerKey) "
                     "or generic (context, choices, gold) keys")


def read_questions(path: str, fmt: str = "auto", limit: int = 0) -> list[Question]:
    """The questions of a JSONL file (the first `limit`, 0 = all), each validated."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not allowed: use one of {FORMATS}")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                fmt = detect_format(row) if fmt == "auto" else fmt
                q = parse_question(row, fmt)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}:{lineno}: not a {fmt} question ({type(err).__name__}: {err})") from err
            if len(q.choices) < 2 or not 0 <= q.gold < len(q.choices):
                raise ValueError(f"{path}:{lineno}: needs >= 2 choices and a gold index in range, got "
                                 f"{len(q.choices)} choices and gold {q.gold}")
            out.append(q)
            if limit and len(out) >= limit:
                break
    if not out:
        raise ValueError(f"{path} holds no questions")
    return out


def score_questions(scorer: Any, questions: Sequence[Question]) -> dict[str, float]:
    """acc, acc_norm (each with its standard error) and n, from one batched loglikelihood call."""
    requests = [(q.context, " " + c) for q in questions for c in q.choices]
    lls = [ll for ll, _ in scorer.loglikelihood(requests)]
    correct, correct_norm, k = [], [], 0
    for q in questions:
        ll = lls[k:k + len(q.choices)]
        k += len(q.choices)
        norm = [v / max(1, len(c)) for v, c in zip(ll, q.choices)]
        correct.append(float(max(range(len(ll)), key=ll.__getitem__) == q.gold))
        correct_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == q.gold))
    n = len(questions)

    def mean_stderr(xs: list[float]) -> tuple[float, float]:
        m = sum(xs) / n
        return m, math.sqrt(m * (1 - m) / max(1, n - 1))

    acc, acc_se = mean_stderr(correct)
    acc_norm, acc_norm_se = mean_stderr(correct_norm)
    return {"acc": acc, "acc_stderr": acc_se, "acc_norm": acc_norm, "acc_norm_stderr": acc_norm_se, "n": n}


@entry_point
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", default="", help="a workdir written by train.py")
    src.add_argument("--export", default="", help="a folder written by python -m mhc_jax.export")
    p.add_argument("--data", required=True, help="JSONL file of questions")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--limit", type=int, default=0, help="score only the first N questions (0 = all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    try:
        questions = read_questions(args.data, args.format, args.limit)
    except (ValueError, OSError) as err:  # an unreadable or malformed question file
        if isinstance(err, MhcJaxError):
            raise
        raise DataError(f"{args.data}: {err}") from err
    out = score_questions(load_scorer(args.workdir, args.export, args.batch_size), questions)
    print(f"{args.data}: acc {out['acc']:.4f} (+/- {out['acc_stderr']:.4f})  acc_norm {out['acc_norm']:.4f} "
          f"(+/- {out['acc_norm_stderr']:.4f})  n={out['n']}")
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    exit_process(main())
