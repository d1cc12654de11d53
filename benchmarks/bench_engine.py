"""The inference engine against static batching and transformers' continuous batching, CPU.

Workload (issue 14): N requests (512) with seeded prompt lengths, log-uniform over 16-512 tokens,
and output lengths, log-uniform over 1-256 (long-tailed: half are under 16 tokens, a few run to
256), fixed per request with eos ignored; they arrive as a Poisson process at `--rate` requests
per second: by default twice, the same requests at 64/s (faster than any engine serves them,
so tokens/s is each engine's capacity and the queue grows) and at 4/s (a load all three keep
up with on a quiet machine, where the latencies tell them apart). One random checkpoint (made
with transformers) serves three engines, each in a child process of its own, one after the
other, each warmed up before its clock starts:

- "engine": phi3_jax's Engine with `--slots` rows, stepped by this script, which submits each
  request at its arrival time;
- "static": the same Engine (same rows; every decode call runs all of them, as the old loop did:
  bucket_rows off) run as static batching: fixed batches of `--slots` requests in submission
  order, each started when the previous one has finished and its own requests have arrived,
  and run to its longest row (nothing joins a running batch);
- "transformers": transformers' continuous batching (`init_continuous_batching`: its paged
  cache and scheduler, SDPA on the CPU) with as many requests per batch, a cache of the same
  number of token slots, and each request's max_new_tokens; requests added at their arrival.

Reported per engine: output tokens/s (output tokens over the time from the first arrival to the
last token), time to first token (from the request's arrival: queueing included) and inter-token
latency, p50 and p99, and for phi3-jax's two the cache occupancy: at each decode step, the tokens
held by the rows that decode at that step over the cache's rows x max_len slots, averaged over
the steps. A delivery of k tokens at once (a multi-step decode call) counts k inter-token
latencies of a k-th of the gap each.

    python benchmarks/bench_engine.py                 # the issue's workload (minutes)
    python benchmarks/bench_engine.py --single        # one prompt, this tree vs OLD_COMMIT
    python benchmarks/bench_engine.py --tiny          # CI smoke run

`--single` times one greedy prompt (time to first token, ms per new token) through
`model.generate` of this tree and of OLD_COMMIT (the static-batch generator before the engine,
exported with `git archive`), each in its own process, alternately.

Every engine runs on one compute thread (XLA's Eigen pool off, torch.set_num_threads(1)): the fair
setting on a shared, oversubscribed machine. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.machine import cpu_model, print_result  # noqa: E402

OLD_COMMIT = "8bb5f5b"  # the last commit before the engine: generate() as one static batch
ENGINES = ("engine", "static", "transformers")
# A CPU-sized model: Phi-3's layout, scaled down (5.3M parameters) so that the three engines'
# runs of the full workload fit in tens of minutes on a shared 2-core machine.
MODEL = dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
             bos_token_id=1, eos_token_id=None, pad_token_id=0)
TINY_MODEL = dict(MODEL, vocab_size=256, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128)
# The engine's settings are its defaults but for max_slots; --tiny's give it few programs.
FULL = dict(requests=512, prompt=(16, 512), output=(1, 256), slots=16, rate=(64.0, 4.0),
            prefill_chunk=512, decode_steps=8, buckets_per_octave=2)
TINY = dict(requests=16, prompt=(16, 24), output=(1, 8), slots=4, rate=(50.0,),
            prefill_chunk=16, decode_steps=4, buckets_per_octave=1)


# ---- workload and figures --------------------------------------------------------------------

def log_uniform(rng, low: int, high: int, n: int):
    """n integers in [low, high], log-uniformly distributed."""
    import numpy as np

    x = np.exp(rng.uniform(math.log(low), math.log(high + 1), n))
    return np.minimum(np.floor(x), high).astype(int)


def make_workload(requests: int, prompt: tuple[int, int], output: tuple[int, int], rate: float,
                  vocab_size: int, seed: int = 0) -> list[dict]:
    """Each request's prompt ids, max_new_tokens and arrival time (s after the first)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = log_uniform(rng, *prompt, requests)
    outputs = log_uniform(rng, *output, requests)
    gaps = rng.exponential(1.0 / rate, requests)
    arrivals = np.cumsum(gaps) - gaps[0]
    return [dict(prompt=rng.integers(3, vocab_size, int(n)).tolist(), new=int(m), arrival=float(a))
            for n, m, a in zip(lengths, outputs, arrivals, strict=True)]


def percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def latency_figures(arrivals: list[float], deliveries: list[list[tuple[float, int]]]) -> dict:
    """Time to first token and inter-token latency (ms, p50/p99), and output tokens/s, from each
    request's arrival time and its deliveries (time, tokens delivered then)."""
    ttft, itl = [], []
    for arrival, events in zip(arrivals, deliveries, strict=True):
        ttft.append(events[0][0] - arrival)
        for (t0, _), (t1, k) in itertools.pairwise(events):
            itl += [(t1 - t0) / k] * k
        if events[0][1] > 1:  # tokens delivered with the first one
            itl += [0.0] * (events[0][1] - 1)
    tokens = sum(k for events in deliveries for _, k in events)
    span = max(events[-1][0] for events in deliveries) - min(arrivals)
    return dict(tokens=tokens, seconds=span, tok_s=tokens / span,
                ttft_p50_ms=1e3 * percentile(ttft, 50), ttft_p99_ms=1e3 * percentile(ttft, 99),
                itl_p50_ms=1e3 * percentile(itl, 50), itl_p99_ms=1e3 * percentile(itl, 99))


class OccupancyMeter:
    """Cache occupancy of an engine: wraps its decode program and, for every decode step it runs,
    adds the tokens the decoding rows hold (the token fed at that step included) over the
    cache's rows x max_len slots; `mean` is the average over the steps."""

    def __init__(self, programs, rows: int, max_len: int):
        self.programs, self.real = programs, programs.decode
        self.slots = rows * max_len
        self.fractions: list[float] = []
        programs.decode = self._decode

    def _decode(self, *args, **kwargs):
        import numpy as np

        out = self.real(*args, **kwargs)
        inputs = args[4]
        tokens = np.asarray(out[2].tokens)  # [max_steps, B]: -1 where a row drew nothing
        self.add(np.asarray(inputs.positions), tokens >= 0)
        return out

    def add(self, positions, ran) -> None:
        """positions [B]: what each row feeds at the call's first step; ran [steps, B]: which
        rows ran at each step. Step s of a running row holds positions + s + 1 tokens."""
        for s in range(ran.shape[0]):
            if ran[s].any():
                self.fractions.append(float(((positions + s + 1) * ran[s]).sum()) / self.slots)

    @property
    def mean(self) -> float | None:
        return sum(self.fractions) / len(self.fractions) if self.fractions else None

    def close(self) -> None:
        self.programs.decode = self.real


# ---- children --------------------------------------------------------------------------------

def single_thread() -> None:
    """One compute thread per engine; before jax is imported."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_multi_thread_eigen=false").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def run_phi3_jax(args, work: list[dict], static: bool) -> dict:
    import jax

    import phi3_jax
    from phi3_jax.engine import programs

    model = phi3_jax.load(args.checkpoint)
    max_len = max(len(w["prompt"]) + w["new"] for w in work)
    engine = model.engine(max_slots=args.slots, max_len=max_len, prefill_chunk=args.prefill_chunk,
                          decode_steps=args.decode_steps, max_logprobs=0,
                          buckets_per_octave=args.buckets_per_octave,
                          bucket_rows=not static,  # the old loop ran every row to the end
                          compilation_cache=args.compilation_cache)
    t = time.perf_counter()
    programs_built = engine.warmup(prompt_logprobs=False)
    warmup_s = time.perf_counter() - t
    meter = OccupancyMeter(programs, args.slots, max_len)
    deliveries: list[list[tuple[float, int]]] = [[] for _ in work]
    start = time.perf_counter()

    def submit(i: int) -> None:
        def delivered(output) -> None:  # timed as the engine hands the output over
            if output.token_ids:
                deliveries[i].append((time.perf_counter() - start, len(output.token_ids)))

        w = work[i]
        engine.submit(w["prompt"], max_new_tokens=w["new"], temperature=0.0, ignore_eos=True,
                      on_output=delivered)

    def step() -> None:
        engine.step()

    def wait_until(arrival: float) -> None:
        time.sleep(max(0.0, arrival - (time.perf_counter() - start)))

    if static:  # fixed batches in submission order, each run to its longest row
        for first in range(0, len(work), args.slots):
            batch = range(first, min(first + args.slots, len(work)))
            wait_until(work[batch[-1]]["arrival"])
            for i in batch:
                submit(i)
            while engine.has_work():
                step()
    else:
        following = 0
        while following < len(work) or engine.has_work():
            now = time.perf_counter() - start
            while following < len(work) and work[following]["arrival"] <= now:
                submit(following)
                following += 1
            if engine.has_work():
                step()
            else:
                wait_until(work[following]["arrival"])
    meter.close()
    got = [sum(k for _, k in d) for d in deliveries]
    assert got == [w["new"] for w in work], "a request did not draw its max_new_tokens"
    return dict(latency_figures([w["arrival"] for w in work], deliveries),
                occupancy=meter.mean, decode_steps=len(meter.fractions),
                warmup_s=warmup_s, programs=programs_built, max_len=max_len,
                jax=jax.__version__)


def run_transformers(args, work: list[dict]) -> dict:
    import torch
    import transformers
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    torch.set_num_threads(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.checkpoint, torch_dtype=torch.float32).eval()
    model.generation_config.do_sample = False
    max_len = max(len(w["prompt"]) + w["new"] for w in work)
    page = 32
    cb = ContinuousBatchingConfig(
        page_size=page, num_blocks=-(-args.slots * max_len // page),  # phi3-jax's cache size
        max_batch_tokens=args.prefill_chunk, max_requests_per_batch=args.slots,
        allow_block_sharing=False)  # random prompts share no prefix
    deliveries: list[list[tuple[float, int]]] = [[] for _ in work]
    with model.continuous_batching_context_manager(continuous_batching_config=cb) as manager:
        t = time.perf_counter()
        warm = [manager.add_request(w["prompt"], max_new_tokens=w["new"], eos_token_id=-1)
                for w in work[:args.slots]]
        _collect(manager, set(warm))
        warmup_s = time.perf_counter() - t
        start = time.perf_counter()
        index, following = {}, 0
        pending: set[str] = set()
        while following < len(work) or pending:
            now = time.perf_counter() - start
            while following < len(work) and work[following]["arrival"] <= now:
                w = work[following]
                rid = manager.add_request(w["prompt"], request_id=f"r{following}",
                                          max_new_tokens=w["new"], record_timestamps=True,
                                          eos_token_id=-1)
                index[rid] = following
                pending.add(rid)
                following += 1
            timeout = (work[following]["arrival"] - now if following < len(work) else 1.0)
            for result in _collect(manager, pending, max(timeout, 1e-3), once=True):
                deliveries[index[result.request_id]] = [
                    (ts - start, 1) for ts in result.timestamps]
    got = [len(d) for d in deliveries]
    assert got == [w["new"] for w in work], "a request did not draw its max_new_tokens"
    return dict(latency_figures([w["arrival"] for w in work], deliveries), occupancy=None,
                warmup_s=warmup_s, max_len=max_len, torch=torch.__version__,
                transformers=transformers.__version__)


def _collect(manager, pending: set[str], timeout: float = 1.0, once: bool = False) -> list:
    """Finished results of `pending` requests (removed from it): all of them, or with `once`
    those that finish within `timeout`."""
    done = []
    while pending:
        result = manager.get_result(timeout=timeout)
        if result is not None and result.is_finished():
            if result.error is not None:
                raise RuntimeError(f"transformers request {result.request_id}: {result.error}")
            pending.discard(result.request_id)
            done.append(result)
        elif once:
            break
        elif not manager.is_running():
            raise RuntimeError("transformers' continuous batching thread stopped")
    return done


def run_single(args) -> dict:
    """One greedy prompt through model.generate: time to first token (a 1-token generation) and
    ms per further token, best of the repeats, after a compiling call of each."""
    import numpy as np

    import phi3_jax

    model = phi3_jax.load(args.checkpoint)
    vocab = model.config.vocab_size
    prompt = np.random.default_rng(1).integers(3, vocab, args.prompt_len).tolist()

    def run(new: int) -> tuple[float, int]:
        t = time.perf_counter()
        [out] = model.generate([prompt], max_new_tokens=new, temperature=0.0)
        return time.perf_counter() - t, len(out.token_ids)

    run(1), run(args.new)  # compiles
    first, full = [], []
    for _ in range(args.repeats):
        first.append(run(1)[0])
        seconds, n = run(args.new)
        assert n == args.new, f"generated {n} tokens, not {args.new}"
        full.append(seconds)
    ttft, total = min(first), min(full)
    return dict(ttft_ms=1e3 * ttft, ms_per_token=1e3 * (total - ttft) / (args.new - 1),
                source=phi3_jax.__file__)


def child(args) -> None:
    if args.child == "single":
        sys.path.insert(0, args.source)  # this tree's or OLD_COMMIT's phi3_jax
        result = run_single(args)
    else:
        with open(args.workload) as f:
            work = json.load(f)
        if args.child == "transformers":
            result = run_transformers(args, work)
        else:
            result = run_phi3_jax(args, work, static=args.child == "static")
    print(json.dumps(result))


# ---- parent ----------------------------------------------------------------------------------

def make_checkpoint(path: str, config: dict) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.Phi3ForCausalLM(transformers.Phi3Config(**config)).save_pretrained(path)


def spawn(argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"child {argv[:2]} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def git(*argv: str) -> str:
    try:
        return subprocess.run(["git", *argv], capture_output=True, text=True, check=True,
                              cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    return dict(cpu=cpu_model(), cores=os.cpu_count(), commit=git("rev-parse", "--short", "HEAD"))


def main_throughput(args, tmp: str) -> dict:
    shape = TINY if args.tiny else FULL
    for key in ("requests", "slots", "rate"):
        if getattr(args, key) is None:
            setattr(args, key, shape[key])
    config = TINY_MODEL if args.tiny else MODEL
    checkpoint = os.path.join(tmp, "checkpoint")
    make_checkpoint(checkpoint, config)
    common = ["--checkpoint", checkpoint, "--slots", str(args.slots),
              "--prefill-chunk", str(shape["prefill_chunk"]),
              "--decode-steps", str(shape["decode_steps"]),
              "--buckets-per-octave", str(shape["buckets_per_octave"]),
              "--compilation-cache", args.compilation_cache or os.path.join(tmp, "jax-cache")]
    loads = [os.getloadavg()[0]]
    rows, ratios = [], {}
    print(f"{'engine':13} {'rate/s':>6} {'tok/s':>7} {'TTFT p50':>9} {'p99 ms':>8} "
          f"{'ITL p50':>8} {'p99 ms':>7} {'occupancy':>9}", flush=True)
    for rate in args.rate:
        # The same requests at every rate (one seed): only their arrival times scale.
        work = make_workload(args.requests, shape["prompt"], shape["output"], rate,
                             config["vocab_size"])
        workload = os.path.join(tmp, f"workload-{rate}.json")
        with open(workload, "w") as f:
            json.dump(work, f)
        by_name = {}
        for name in args.engines:
            row = dict(engine=name, rate=rate,
                       **spawn(["--child", name, "--workload", workload, *common]))
            loads.append(os.getloadavg()[0])
            rows.append(row)
            by_name[name] = row
            occ = "" if row["occupancy"] is None else f"{row['occupancy']:9.3f}"
            print(f"{name:13} {rate:6g} {row['tok_s']:7.1f} {row['ttft_p50_ms']:9.0f} "
                  f"{row['ttft_p99_ms']:8.0f} {row['itl_p50_ms']:8.1f} {row['itl_p99_ms']:7.1f} "
                  f"{occ}", flush=True)
        ratios[str(rate)] = {
            f"engine_over_{other}": by_name["engine"]["tok_s"] / by_name[other]["tok_s"]
            for other in ("static", "transformers") if "engine" in by_name and other in by_name}
        for k, v in ratios[str(rate)].items():
            print(f"rate {rate:g}/s {k}: {v:.2f}x tokens/s")
    tokens = [len(w["prompt"]) for w in work]
    return dict(bench="engine", tiny=args.tiny, model=config, requests=args.requests,
                rates=args.rate, slots=args.slots, prefill_chunk=shape["prefill_chunk"],
                decode_steps=shape["decode_steps"],
                buckets_per_octave=shape["buckets_per_octave"], prompt_tokens=sum(tokens),
                output_tokens=sum(w["new"] for w in work), rows=rows,
                ratios=ratios[str(args.rate[0])], ratios_by_rate=ratios, loadavg_1m=loads,
                **machine())


def main_single(args, tmp: str) -> dict:
    args.prompt_len = args.prompt_len or (32 if args.tiny else 128)
    args.new = args.new or (16 if args.tiny else 64)
    checkpoint = os.path.join(tmp, "checkpoint")
    make_checkpoint(checkpoint, TINY_MODEL if args.tiny else MODEL)
    old = os.path.join(tmp, "old")
    os.makedirs(old)
    archive = subprocess.run(["git", "archive", OLD_COMMIT, "phi3_jax"], capture_output=True,
                             check=True, cwd=ROOT).stdout
    subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
    common = ["--checkpoint", checkpoint, "--prompt-len", str(args.prompt_len), "--new",
              str(args.new), "--repeats", str(args.repeats)]
    runs: dict[str, list[dict]] = {"engine": [], OLD_COMMIT: []}
    for _ in range(args.rounds):  # alternated: the machine's load drifts
        for name, source in (("engine", ROOT), (OLD_COMMIT, old)):
            runs[name].append(spawn(["--child", "single", "--source", source, *common]))
    rows = [dict(path=name, ttft_ms=min(r["ttft_ms"] for r in rs),
                 ms_per_token=min(r["ms_per_token"] for r in rs), runs=rs)
            for name, rs in runs.items()]
    print(f"{'path':9} {'TTFT ms':>8} {'ms/token':>9}   (prompt {args.prompt_len}, "
          f"{args.new} new, best of {args.rounds} x {args.repeats})")
    for r in rows:
        print(f"{r['path']:9} {r['ttft_ms']:8.2f} {r['ms_per_token']:9.3f}")
    new, old_row = rows
    ratios = dict(ttft=new["ttft_ms"] / old_row["ttft_ms"],
                  ms_per_token=new["ms_per_token"] / old_row["ms_per_token"])
    print(f"engine / {OLD_COMMIT}: TTFT {ratios['ttft']:.2f}x, ms/token "
          f"{ratios['ms_per_token']:.2f}x")
    return dict(bench="engine_single", tiny=args.tiny, prompt_len=args.prompt_len, new=args.new,
                old_commit=OLD_COMMIT, rows=rows, ratios=ratios,
                loadavg_1m=os.getloadavg()[0], **machine())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny model and workload (CI)")
    p.add_argument("--single", action="store_true",
                   help=f"one prompt: this tree's generate() vs {OLD_COMMIT}'s")
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--rate", type=float, nargs="+", default=None,
                   help="Poisson arrivals per second; a run per rate (default 64 4, --tiny 50); "
                        "the headline ratios are the first rate's")
    p.add_argument("--slots", type=int, default=None,
                   help="engine rows = static batch size = transformers' requests per batch")
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    p.add_argument("--prompt-len", type=int, default=None,
                   help="--single: prompt tokens (default 128, --tiny 32)")
    p.add_argument("--new", type=int, default=None,
                   help="--single: new tokens (default 64, --tiny 16)")
    p.add_argument("--repeats", type=int, default=5, help="--single: timed calls per process")
    p.add_argument("--rounds", type=int, default=2, help="--single: processes per path")
    p.add_argument("--compilation-cache", metavar="DIR", default=None,
                   help="keep phi3-jax's compiled programs in DIR (default: a temporary one)")
    p.add_argument("--out", default=None)
    # the children's arguments
    p.add_argument("--child", choices=[*ENGINES, "single"], help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--prefill-chunk", type=int, help=argparse.SUPPRESS)
    p.add_argument("--decode-steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--buckets-per-octave", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    single_thread()
    if args.child:
        child(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        result = main_single(args, tmp) if args.single else main_throughput(args, tmp)
    print_result(result, args.out, "bench_engine_single.json" if args.single
                 else "bench_engine.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
