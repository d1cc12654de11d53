"""`phi3-jax score`: loglikelihoods and perplexity of a text file, or of a JSONL file's records.

- a text file (any name not ending in .jsonl): the whole file is one text; prints its token
  count, total logprob and perplexity (rolling windows of --window tokens);
- JSONL: each line {"context": ..., "continuation": ...} gets "logprobs", "total" and
  "is_greedy" (phi3_jax.scoring.score), and each line {"text": ...} gets "loglikelihood",
  "tokens" and "perplexity"; the other fields are kept. One JSON line out per line in.
"""

from __future__ import annotations

import argparse
import json
import math
import os

from phi3_jax import jsonl, scoring, textio
from phi3_jax.generate_cli import AtomicOutput, add_model_arguments, load_model, positive_int


def run(args: argparse.Namespace) -> int:
    is_jsonl = args.input.endswith(".jsonl")
    # The input is read and checked before the model loads.
    text = None if is_jsonl else _read_text(args.input)
    records = list(jsonl.read_jsonl(args.input)) if is_jsonl else []
    if args.output is not None and not is_jsonl:
        raise ValueError("--output goes with a JSONL input")
    pairs, texts = [], []
    for number, record in records:
        if "text" in record:
            texts.append(_string(record, "text", args.input, number))
        elif "context" in record and "continuation" in record:
            pairs.append((_string(record, "context", args.input, number),
                          _string(record, "continuation", args.input, number)))
        else:
            raise ValueError(f"{args.input} line {number}: expected {{\"context\", "
                             f"\"continuation\"}} or {{\"text\"}}")
    model = load_model(args)
    if model.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer files; scoring text needs them")
    options = dict(batch_size=args.batch_size, progress=not args.no_progress)
    if not is_jsonl:
        n = len(model.tokenizer.encode(text))
        if n == 0:
            raise ValueError(f"{args.input} holds no tokens")
        total = scoring.loglikelihood_rolling(model, text, window=args.window, **options)[0]
        print(json.dumps({"tokens": n, "loglikelihood": total,
                          "perplexity": math.exp(-total / n)}))
        return 0
    scores = iter(scoring.score(model, [c for c, _ in pairs], [k for _, k in pairs],
                                **options) if pairs else [])
    rolling = iter(_rolling(model, texts, args.window, options) if texts else [])
    with AtomicOutput(args.output) as out:
        for _, record in records:
            if "text" in record:
                total, n = next(rolling)
                record.update(loglikelihood=total, tokens=n,
                              perplexity=math.exp(-total / n) if n else None)
            else:
                s = next(scores)
                record.update(logprobs=s.logprobs, total=s.total, is_greedy=s.is_greedy)
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return 0


def _rolling(model, texts, window, options):
    totals = scoring.loglikelihood_rolling(model, texts, window=window, **options)
    return [(t, len(model.tokenizer.encode(text))) for t, text in zip(totals, texts,
                                                                       strict=True)]


def _string(record: dict, key: str, path: str, number: int) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"{path} line {number}: {key!r} must be a string")
    return value


def _read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no input file at {path}")
    with open(path, "rb") as f:
        return textio.decode_utf8(f.read(), path)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="loglikelihoods and perplexity of text",
                       description=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--input", required=True, metavar="FILE",
                   help="a text file, or FILE.jsonl of {context, continuation} / {text} lines")
    p.add_argument("--output", metavar="FILE.jsonl", default=None,
                   help="with a JSONL input: where to write (default: stdout)")
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N")
    p.add_argument("--window", type=positive_int, default=None, metavar="N",
                   help="rolling window in tokens (default: the model's context)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)
