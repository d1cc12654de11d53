"""`phi3-jax generate` (one prompt, or a JSONL file of prompts) and `phi3-jax chat`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from phi3_jax import generate as gen
from phi3_jax import jsonl, sharding
from phi3_jax.api import DTYPES, Phi3, load
from phi3_jax.embedded import MODEL_DIR

CHAT_HELP = "type a message and press Enter; /reset clears the history, /exit (or Ctrl-D) quits"


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=MODEL_DIR, metavar="DIR",
                   help="Hugging Face folder or phi3-jax Orbax checkpoint (default: the embedded "
                        "equation-solving model, see `phi3-jax demo`)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--compilation-cache", metavar="DIR", default=None,
                   help="persist compiled programs in DIR, so later runs skip compiling")
    sharding.add_mesh_argument(p)


def _add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding (unset: the checkpoint's generation_config, else greedy)")
    g.add_argument("--max-new-tokens", type=int, default=None, metavar="N")
    g.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="0 = greedy; > 0 samples")
    g.add_argument("--top-k", type=int, default=None, metavar="K")
    g.add_argument("--top-p", type=float, default=None, metavar="P")
    g.add_argument("--min-p", type=float, default=None, metavar="P")
    g.add_argument("--repetition-penalty", type=float, default=None, metavar="R")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=None, metavar="S",
                   help="stop when the text contains S (repeatable)")
    g.add_argument("--rope-policy", choices=gen.ROPE_POLICIES, default="per_sequence",
                   help="LongRoPE factors: per_sequence (as transformers) or always_long (vLLM)")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
                rope_policy=args.rope_policy, compilation_cache=args.compilation_cache)


def _load(args: argparse.Namespace) -> Phi3:
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"no model folder at {args.model}")
    return load(args.model, dtype=args.dtype, mesh=sharding.mesh_from_args(args))


def _needs_tokenizer(model: Phi3) -> Any:
    if model.tokenizer is None:
        raise ValueError(f"{model.path} has no tokenizer (tokenizer.model or tokenizer.json); "
                         f"text prompts need one")
    return model.tokenizer


def _print_stream(chunk: gen.StreamChunk) -> None:
    print(chunk.text or "", end="", flush=True)


# ---- generate -------------------------------------------------------------------------------

def run_generate(args: argparse.Namespace) -> int:
    if args.input is None and args.output is not None:
        raise ValueError("--output goes with --input (a JSONL file of prompts)")
    if args.input is not None:
        records = list(_read_jsonl(args.input))  # all lines checked before the model loads
    model = _load(args)
    if args.input is not None:
        return _run_batch(model, args, records)
    tokenizer = _needs_tokenizer(model)
    if args.chat or args.system is not None:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        ids = tokenizer.encode_chat([*messages, {"role": "user", "content": args.prompt}])
    else:
        ids = tokenizer.encode(args.prompt)
    gen.check_prompt_fits(model.config, ids)
    [out] = gen.generate(model, [ids], stream=_print_stream if args.stream else None,
                         **_settings(args))
    print("" if args.stream else out.text, flush=True)
    return 0


def _read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each prompt line; errors name the line."""
    for number, record in jsonl.read_jsonl(path):
        if ("prompt" in record) == ("messages" in record):
            raise ValueError(f"{path} line {number}: expected an object with either "
                             f"\"prompt\" (a string) or \"messages\" (a chat)")
        if "prompt" in record and not isinstance(record["prompt"], str):
            raise ValueError(f"{path} line {number}: \"prompt\" must be a string")
        yield number, record


def _run_batch(model: Phi3, args: argparse.Namespace, records: list[tuple[int, dict]]) -> int:
    from tqdm import tqdm

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    tokenizer = _needs_tokenizer(model)
    prompts = []
    for number, record in records:
        try:
            ids = (tokenizer.encode(record["prompt"]) if "prompt" in record
                   else tokenizer.encode_chat(record["messages"]))
            gen.check_prompt_fits(model.config, ids)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{args.input} line {number}: {e}") from None
        prompts.append(ids)
    settings = _settings(args)
    lines = []
    with tqdm(total=len(prompts), unit="prompt", desc="generating", file=sys.stderr) as bar:
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start:start + args.batch_size]
            for (_, record), out in zip(records[start:], gen.generate(model, batch, **settings),
                                        strict=False):
                lines.append(json.dumps({**record, "completion": out.text}, ensure_ascii=False))
            bar.update(len(batch))
    text = "".join(line + "\n" for line in lines)
    if args.output is None:
        sys.stdout.write(text)
    else:
        _write_atomically(args.output, text)
        print(f"wrote {len(lines)} completions to {args.output}", file=sys.stderr)
    return 0


def _write_atomically(path: str, text: str) -> None:
    """Writes to a temporary file next to `path`, then renames: never a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ---- chat -----------------------------------------------------------------------------------

def run_chat(args: argparse.Namespace) -> int:
    model = _load(args)
    _needs_tokenizer(model)
    interactive = sys.stdin.isatty()
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    if interactive:
        print(CHAT_HELP, file=sys.stderr)
    settings = _settings(args)
    turn = 0
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # EOF
            break
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            history = list(start)
            print("(history cleared)", file=sys.stderr)
            continue
        messages = [*history, {"role": "user", "content": line}]
        try:
            [out] = gen.generate(model, [messages], stream=_print_stream,
                                 **{**settings, "seed": args.seed + turn})
        except ValueError as e:  # e.g. the history outgrew the context: the session goes on
            print(f"error: {e} (/reset clears the history)", file=sys.stderr)
            continue
        print(flush=True)
        history = [*messages, {"role": "assistant", "content": out.text}]
        turn += 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for a prompt or a JSONL file of prompts",
                       description="Greedy by default; sampling with --temperature > 0.")
    _add_model_arguments(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT")
    source.add_argument("--input", metavar="FILE.jsonl",
                        help='batch inference: one {"prompt": ...} or {"messages": [...]} per '
                             'line; each output line keeps the input fields and adds '
                             '"completion"')
    p.add_argument("--output", metavar="FILE.jsonl", default=None,
                   help="with --input: where to write (default: stdout)")
    p.add_argument("--batch-size", type=int, default=8, help="with --input: prompts per batch")
    p.add_argument("--chat", action="store_true",
                   help="format --prompt as a user message with the chat template")
    p.add_argument("--system", metavar="TEXT", default=None,
                   help="system message (implies --chat)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    _add_sampling_arguments(p)
    p.set_defaults(func=run_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat (reads stdin)",
                       description=f"Reads one message per line; {CHAT_HELP}.")
    _add_model_arguments(c)
    c.add_argument("--system", metavar="TEXT", default=None, help="system message")
    _add_sampling_arguments(c)
    c.set_defaults(func=run_chat)
