"""`phi3-jax generate` (one prompt, or a JSONL file of prompts) and `phi3-jax chat`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from phi3_jax import jsonl, quantize, sharding, textio
from phi3_jax.api import Phi3, load
from phi3_jax.compilation import bucket_length
from phi3_jax.embedded import MODEL_DIR
from phi3_jax.engine import GenerationSettings, TokenLogprob
from phi3_jax.engine.request import check_prompt_fits
from phi3_jax.engine.settings import ROPE_POLICIES
from phi3_jax.generate import StreamChunk
from phi3_jax.params import COMPUTE_DTYPES

CHAT_HELP = "type a message and press Enter; /reset clears the history, /exit (or Ctrl-D) quits"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=MODEL_DIR, metavar="DIR",
                   help="Hugging Face folder, phi3-jax Orbax checkpoint, GGUF file or "
                        "ollama:NAME[:TAG] (default: the embedded equation-solving model, see "
                        "`phi3-jax demo`)")
    p.add_argument("--dtype", choices=sorted(COMPUTE_DTYPES), default="float32")
    p.add_argument("--compilation-cache", metavar="DIR", default=None,
                   help="persist compiled programs in DIR, so later runs skip compiling")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="load weights that hold NaN or infinity (refused by default)")
    quantize.add_arguments(p)
    sharding.add_mesh_argument(p)


def _add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding (unset: the checkpoint's generation_config, else greedy)")
    g.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="at most N new tokens (clamped to what the context has room for)")
    g.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="0 = greedy; > 0 samples")
    g.add_argument("--top-k", type=int, default=None, metavar="K")
    g.add_argument("--top-p", type=float, default=None, metavar="P")
    g.add_argument("--min-p", type=float, default=None, metavar="P")
    g.add_argument("--repetition-penalty", type=float, default=None, metavar="R")
    g.add_argument("--seed", type=int, default=0,
                   help="each prompt's random stream (the same seed gives the same samples)")
    g.add_argument("--stop", action="append", default=None, metavar="S",
                   help="stop when the text contains S (repeatable)")
    g.add_argument("--rope-policy", choices=ROPE_POLICIES, default="per_sequence",
                   help="LongRoPE factors: per_sequence (as transformers) or always_long (vLLM)")


def _settings(args: argparse.Namespace, **extra: Any) -> GenerationSettings:
    """The one validated settings object the Python API and the server take too."""
    return GenerationSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        seed=args.seed, stop=tuple(args.stop or ()), rope_policy=args.rope_policy, **extra)


def load_model(args: argparse.Namespace) -> Phi3:
    from phi3_jax.gguf import is_gguf_source

    if not os.path.isdir(args.model) and not is_gguf_source(args.model):
        raise FileNotFoundError(f"no model folder at {args.model}")
    return load(args.model, dtype=args.dtype, mesh=sharding.mesh_from_args(args),
                allow_nonfinite=args.allow_nonfinite, **quantize.from_args(args))


def _needs_tokenizer(model: Phi3) -> Any:
    if model.tokenizer is None:
        raise ValueError(f"{model.path} has no tokenizer (tokenizer.model or tokenizer.json); "
                         f"text prompts need one")
    return model.tokenizer


def _print_stream(chunk: StreamChunk) -> None:
    print(chunk.text or "", end="", flush=True)


# ---- generate -------------------------------------------------------------------------------

def run_generate(args: argparse.Namespace) -> int:
    textio.check_utf8_arguments(args, "prompt", "system", "stop")
    if args.input is None and args.output is not None:
        raise ValueError("--output goes with --input (a JSONL file of prompts)")
    settings = _settings(args, logprobs=args.logprobs)  # checked before the model loads
    if args.input is not None:
        records = list(_read_jsonl(args.input))  # all lines checked before the model loads
    model = load_model(args)
    if args.input is not None:
        return _run_batch(model, args, records, settings)
    tokenizer = _needs_tokenizer(model)
    if args.chat or args.system is not None:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        ids = tokenizer.encode_chat([*messages, {"role": "user", "content": args.prompt}])
    else:
        ids = tokenizer.encode(args.prompt)
    check_prompt_fits(model.config, ids)
    [out] = model.generate([ids], settings, stream=_print_stream if args.stream else None,
                           compilation_cache=args.compilation_cache)
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


def _run_batch(model: Phi3, args: argparse.Namespace, records: list[tuple[int, dict]],
               settings: GenerationSettings) -> int:
    """Streams every prompt through one engine: a row freed by a finished prompt takes the next
    at once (no batch barriers). The output keeps the input's order."""
    from tqdm import tqdm

    tokenizer = _needs_tokenizer(model)
    prompts = []
    for number, record in records:
        try:
            ids = (tokenizer.encode(record["prompt"]) if "prompt" in record
                   else tokenizer.encode_chat(record["messages"], add_generation_prompt=True))
            check_prompt_fits(model.config, ids)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{args.input} line {number}: {e}") from None
        prompts.append(ids)
    resolved = settings.resolve(model.generation_config)
    longest = max((len(p) for p in prompts), default=1) + resolved.max_new_tokens
    engine = model.engine(max_slots=args.max_slots,
                          max_len=min(bucket_length(longest),
                                      model.config.max_position_embeddings),
                          compilation_cache=args.compilation_cache)
    results: dict[int, Any] = {}
    submitted = written = tokens = 0
    start = time.perf_counter()
    out = AtomicOutput(args.output)
    with out, tqdm(total=len(prompts), unit="prompt", desc="generating", file=sys.stderr) as bar:
        while written < len(prompts):
            # Keep the queue a few slots deep: a million prompts need not all be in memory.
            while submitted < len(prompts) and engine.waiting < 2 * args.max_slots:
                results[submitted] = engine.submit(prompts[submitted], settings)
                submitted += 1
            for output in engine.step():
                tokens += len(output.token_ids)
                if output.finish_reason is not None:
                    bar.update(1)
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):.1f} tok/s",
                                refresh=False)
            while written < submitted and results[written].finished:
                request = results.pop(written)
                if request.finish_reason == "error":
                    raise RuntimeError(f"prompt on line {records[written][0]} failed: "
                                       f"{request.error}")
                done = request.completion()
                line = {**records[written][1], "completion": done.text}
                if settings.logprobs is not None:
                    line["logprobs"] = [_logprob_json(tokenizer, lp) for lp in done.logprobs]
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
                written += 1
    if args.output is not None:
        print(f"wrote {written} completions to {args.output}", file=sys.stderr)
    return 0


def _logprob_json(tokenizer: Any, lp: TokenLogprob) -> dict:
    def token(i: int) -> str:
        return tokenizer.decode([i])

    return {"token": token(lp.token_id), "id": lp.token_id, "logprob": lp.logprob,
            "top_logprobs": [{"token": token(i), "id": i, "logprob": v} for i, v in lp.top]}


class AtomicOutput:
    """Lines written to a temporary file next to `path`, renamed over it at the end: never a
    half-written output. Without a path, lines go to stdout as they come."""

    def __init__(self, path: str | None):
        self.path = path
        self.file = None

    def __enter__(self) -> AtomicOutput:
        if self.path is not None:
            folder = os.path.dirname(os.path.abspath(self.path))
            fd, self.tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".jsonl")
            self.file = os.fdopen(fd, "w", encoding="utf-8")
        return self

    def write(self, line: str) -> None:
        (self.file or sys.stdout).write(line)

    def __exit__(self, kind, value, tb) -> None:
        if self.file is None:
            sys.stdout.flush()
            return
        self.file.close()
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)


# ---- chat -----------------------------------------------------------------------------------

def run_chat(args: argparse.Namespace) -> int:
    textio.check_utf8_arguments(args, "system", "stop")
    model = load_model(args)
    _needs_tokenizer(model)
    interactive = sys.stdin.isatty()
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    if interactive:
        print(CHAT_HELP, file=sys.stderr)
    settings = _settings(args)
    turn = 0
    stdin = textio.LineReader(sys.stdin, "stdin")  # a bad line is reported, not fatal
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        try:
            line = stdin.readline()
        except ValueError as e:
            print(f"error: {e}; line skipped", file=sys.stderr)
            continue
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
            [out] = model.generate([messages], dataclasses.replace(settings,
                                                                   seed=args.seed + turn),
                                   stream=_print_stream,
                                   compilation_cache=args.compilation_cache)
        except ValueError as e:  # e.g. the history outgrew the context: the session goes on
            print(f"error: {e} (/reset clears the history)", file=sys.stderr)
            continue
        print(flush=True)
        history = [*messages, {"role": "assistant", "content": out.text}]
        turn += 1
    return 0


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for a prompt or a JSONL file of prompts",
                       description="Greedy by default; sampling with --temperature > 0.")
    add_model_arguments(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT")
    source.add_argument("--input", metavar="FILE.jsonl",
                        help='batch inference: one {"prompt": ...} or {"messages": [...]} per '
                             'line; each output line keeps the input fields and adds '
                             '"completion"')
    p.add_argument("--output", metavar="FILE.jsonl", default=None,
                   help="with --input: where to write (default: stdout)")
    p.add_argument("--max-slots", type=positive_int, default=16, metavar="N",
                   help="with --input: prompts decoding together (KV-cache rows; default 16)")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="with --input: add each new token's logprob and N alternatives")
    p.add_argument("--chat", action="store_true",
                   help="format --prompt as a user message with the chat template")
    p.add_argument("--system", metavar="TEXT", default=None,
                   help="system message (implies --chat)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    _add_sampling_arguments(p)
    p.set_defaults(func=run_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat (reads stdin)",
                       description=f"Reads one message per line; {CHAT_HELP}.")
    add_model_arguments(c)
    c.add_argument("--system", metavar="TEXT", default=None, help="system message")
    _add_sampling_arguments(c)
    c.set_defaults(func=run_chat)
