"""Serving over HTTP: `phi3-jax serve` vs `transformers serve`, same random checkpoint, same
client, same machine.

Requests arrive as a Poisson process at each --rates (requests per second), each a streamed
/v1/completions call (a prompt of 2 to 12 words, 5 to 55 tokens; --max-tokens new tokens;
greedy). Reported
per server and rate: output tokens per second over the run (first arrival to last token),
time to first token (TTFT) p50/p99, and inter-token latency (ITL: a request's mean gap between
tokens after its first, i.e. TPOT) p50/p99. Token counts come from each response's usage.
Servers start in turn, each timed from launch to ready (phi3-jax builds its programs first);
the peers are transformers' own OpenAI-compatible server, as is and with
--continuous-batching (a peer that fails to start or to answer is reported as such).

    python benchmarks/bench_serve.py [--rates 2,8,16] [--requests 24] [--max-tokens 24]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from machine import cpu_model, print_result

# The checkpoint the guidance figures used: random Phi-3 weights, D=256, 4 layers, with the
# embedded model's SentencePiece tokenizer (so both servers tokenize text the same way).
CONFIG = dict(vocab_size=336, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
              bos_token_id=1, eos_token_id=320, pad_token_id=320)


def make_checkpoint(path: str) -> str:
    import torch
    import transformers

    from phi3_jax.embedded import MODEL_DIR

    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**CONFIG)).eval()
    model.save_pretrained(path)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(os.path.join(MODEL_DIR, name), path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, argv: list[str], port: int, model: str, log: str):
        self.name, self.port, self.model = name, port, model
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        start = time.perf_counter()
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                     stderr=open(log, "w"), env=env)  # noqa: SIM115
        self.startup = self._wait(start)

    def _wait(self, start: float, timeout: float = 1200) -> float | None:
        import httpx

        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                return None
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return time.perf_counter() - start
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        return None

    def tail(self) -> str:
        with open(self.log) as f:
            return f.read()[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_phi3(path: str, cache: str, slots: int, logs: str) -> Server:
    port = _free_port()
    return Server("phi3-jax serve", [
        sys.executable, "-m", "phi3_jax.cli", "serve", "--model", path, "--port", str(port),
        "--max-slots", str(slots), "--max-len", "128", "--prefill-chunk", "64",
        "--compilation-cache", cache, "--served-model-name", "bench"], port, "bench",
        os.path.join(logs, "phi3.log"))


def start_transformers(path: str, continuous: bool, logs: str) -> Server:
    port = _free_port()
    exe = shutil.which("transformers") or "transformers"
    argv = [exe, "serve", path, "--device", "cpu", "--dtype", "float32", "--host",
            "127.0.0.1", "--port", str(port)]
    name = "transformers serve"
    if continuous:
        argv.append("--continuous-batching")
        name += " --continuous-batching"
    return Server(name, argv, port, path,
                  os.path.join(logs, f"transformers{'-cb' if continuous else ''}.log"))


def prompts(n: int, seed: int) -> list[str]:
    """Text prompts of 2 to 12 words from a fixed word list: 5 to 55 tokens with the embedded
    model's tokenizer."""
    rs = np.random.RandomState(seed)
    words = ["solve", "x", "equals", "the", "value", "of", "find", "what", "is", "if", "and",
             "then", "number", "three", "seven", "plus", "minus", "times"]
    return [" ".join(rs.choice(words, rs.randint(2, 13))) for _ in range(n)]


async def one(http, server: Server, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: send time, first and last token times, tokens."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first = last = None
    chunks, tokens, error = 0, None, None
    try:
        async with http.stream("POST", f"{server.url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:], strict=False)  # a raw control character in a string
                if data.get("error"):
                    return {"error": f"error chunk: {str(data['error'])[:200]}"}
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
                for choice in data.get("choices") or []:
                    if choice.get("text"):
                        now = time.perf_counter()
                        first = first or now
                        last = now
                        chunks += 1
    except Exception as e:  # a peer that breaks under load is reported, not fatal
        error = f"{type(e).__name__}: {e}"
    if error or first is None:
        return {"error": error or "no tokens"}
    tokens = tokens if tokens is not None else chunks  # no usage: one token per chunk
    return {"sent": sent, "first": first, "last": last, "tokens": tokens}


async def run_rate(server: Server, rate: float, texts: list[str], max_tokens: int,
                   seed: int) -> dict:
    import httpx

    gaps = np.random.RandomState(seed).exponential(1.0 / rate, len(texts))
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=1000)) as http:
        start = time.perf_counter()
        tasks = []
        for text, gap in zip(texts, gaps, strict=True):
            await asyncio.sleep(gap)
            tasks.append(asyncio.ensure_future(one(http, server, text, max_tokens)))
        results = await asyncio.gather(*tasks)
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    if not ok:
        return {"errors": len(errors), "error": errors[0]}
    end = max(r["last"] for r in ok)
    ttft = [r["first"] - r["sent"] for r in ok]
    itl = [(r["last"] - r["first"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    tokens = sum(r["tokens"] for r in ok)
    out = {"throughput": tokens / (end - start), "tokens": tokens, "completed": len(ok),
           "errors": len(errors),
           "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p99": float(np.percentile(ttft, 99))}
    if itl:
        out.update(itl_p50=float(np.percentile(itl, 50)), itl_p99=float(np.percentile(itl, 99)))
    if errors:
        out["error"] = errors[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="2,8,16", help="arrival rates, requests per second")
    ap.add_argument("--requests", type=int, default=24, help="requests per rate")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--max-slots", type=int, default=16, help="phi3-jax's cache rows")
    ap.add_argument("--peers", default="transformers,transformers-cb",
                    help="comma-separated: transformers, transformers-cb (or empty)")
    ap.add_argument("--compilation-cache", default=None, metavar="DIR",
                    help="phi3-jax's persistent compilation cache (default: a temporary one)")
    ap.add_argument("--out-dir", default=None, help="also save the JSON line there")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    peers = [p for p in args.peers.split(",") if p]

    import jax
    import torch
    import transformers

    work = tempfile.mkdtemp(prefix="bench-serve-")
    path = make_checkpoint(os.path.join(work, "ckpt"))
    texts = prompts(args.requests, 0)
    cache = args.compilation_cache or os.path.join(work, "cache")
    starters = [("phi3", lambda: start_phi3(path, cache, args.max_slots, work))]
    starters += [(p, lambda c=(p == "transformers-cb"): start_transformers(path, c, work))
                 for p in peers]
    results = {}
    for _, start in starters:
        server = start()
        name = server.name
        if server.startup is None:
            results[name] = {"startup": None, "error": f"did not start: {server.tail()}"}
            server.stop()
            print(f"{name}: did not start", file=sys.stderr)
            continue
        results[name] = {"startup": server.startup, "rates": {}}
        try:
            # A warm-up request, so a lazily loading peer is not timed loading.
            asyncio.run(run_rate(server, 100.0, texts[:2], 4, 1))
            for rate in rates:
                r = asyncio.run(run_rate(server, rate, texts, args.max_tokens, int(rate * 10)))
                results[name]["rates"][rate] = r
                print(f"{name} @ {rate:g}/s: {r}", file=sys.stderr)
        finally:
            server.stop()
    shutil.rmtree(work, ignore_errors=True)

    print(f"\nrandom Phi-3 D={CONFIG['hidden_size']} {CONFIG['num_hidden_layers']} layers, "
          f"{args.requests} requests per rate, prompts 2-12 words, {args.max_tokens} new tokens, "
          f"greedy, streamed; {cpu_model()}, {os.cpu_count()} cores")
    print(f"{'server':<36} {'rate/s':>6} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'ITL p50':>8} {'ITL p99':>8} {'ok':>4}")
    for name, r in results.items():
        if "rates" not in r:
            print(f"{name:<36} {r['error'][:80]}")
            continue
        for rate, x in r["rates"].items():
            if "throughput" not in x:
                print(f"{name:<36} {rate:>6g} failed: {x['error'][:60]}")
                continue
            ms = lambda v: f"{1000 * v:.0f} ms" if v is not None else "-"  # noqa: E731
            print(f"{name:<36} {rate:>6g} {x['throughput']:>8.1f} {ms(x['ttft_p50']):>9} "
                  f"{ms(x['ttft_p99']):>9} {ms(x.get('itl_p50')):>8} "
                  f"{ms(x.get('itl_p99')):>8} {x['completed']:>4}")
    print_result({"bench": "serve", "config": CONFIG, "requests": args.requests,
                  "max_tokens": args.max_tokens, "max_slots": args.max_slots,
                  "cpu": cpu_model(), "cores": os.cpu_count(),
                  "loadavg_1m": round(os.getloadavg()[0], 1), "python": platform.python_version(),
                  "jax": jax.__version__, "torch": torch.__version__,
                  "transformers": transformers.__version__,
                  "results": {k: {**v, "rates": {str(r): x for r, x in v.get("rates", {}).items()}}
                              for k, v in results.items()}},
                 args.out_dir, "bench_serve.json")


if __name__ == "__main__":
    main()
