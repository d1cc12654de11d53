"""A tour of the research API on the embedded model (no downloads; a minute on a laptop CPU).

    python examples/research_tour.py

1. capture activations (`run_with_cache`): every layer's residual stream, one layer's attention;
2. steer: a difference-of-means vector added to the residual stream changes the answer, in
   generation (the hook's values are traced: each new scale compiles nothing);
3. ablate heads: a table of how much each attention head matters, by scoring the right answer
   with the head's output zeroed;
4. score: per-token logprobs of a continuation, and whether it is the greedy one.
"""

from __future__ import annotations

import numpy as np

import phi3_jax
from phi3_jax import hooks, scoring
from phi3_jax.embedded import MODEL_DIR, task


def chat_ids(model: phi3_jax.Phi3, problem: task.Problem) -> list[int]:
    return model.tokenizer.encode_chat(problem.messages(with_answer=False))


def main() -> None:
    model = phi3_jax.load(MODEL_DIR)
    config = model.config
    L, N = config.num_hidden_layers, config.num_attention_heads
    problems = task.held_out_problems(24, seed=1)

    # ---- 1. activations ------------------------------------------------------------------
    p = problems[0]
    ids = chat_ids(model, p)
    # Every layer's residual stream, and the last layer's attention probabilities (that layer
    # alone takes the reference attention).
    _, cache = model.run_with_cache([ids], names=("resid_post", f"layers.{L - 1}.attn.probs"))
    print(f"1. activations of {p.prompt!r} ({len(ids)} tokens)")
    for i in range(L):
        norm = float(np.linalg.norm(np.asarray(cache[f"layers.{i}.resid_post"][0, -1])))
        print(f"   layer {i}: |resid_post| at the last token = {norm:7.2f}")
    probs = np.asarray(cache[f"layers.{L - 1}.attn.probs"][0, :, -1])  # [N, T]
    pieces = [model.tokenizer.decode([t]) for t in ids]
    for n in range(N):
        top = int(probs[n].argmax())
        print(f"   last layer, head {n}: the last token attends most to {pieces[top]!r} "
              f"({probs[n, top]:.2f})")

    # ---- 2. steering ---------------------------------------------------------------------
    # The mean residual at the position that predicts the answer's digit (after "x ="), over
    # problems whose answer is 7, minus the same over problems whose answer is 2: a direction
    # from "2" towards "7". Added at every position during generation.
    layer = L - 2
    point = f"layers.{layer}.resid_post"

    def digit_resid(answer: int) -> np.ndarray:
        out = []
        for q in [q for q in task.held_out_problems() if q.x == answer][:10]:
            context = model.tokenizer.apply_chat_template(q.messages(with_answer=False))
            prefix, answer_ids = scoring.encode_pair(model, context, q.answer)
            _, c = model.run_with_cache([(prefix + answer_ids)[:-1]], names=point)
            out.append(np.asarray(c[point][0, -1]))
        return np.mean(out, axis=0)

    vector = digit_resid(7) - digit_resid(2)
    targets = [q for q in task.held_out_problems() if q.x == 2][:8]
    print(f"\n2. steering {len(targets)} problems whose answer is x = 2 along mean(7) - mean(2) "
          f"at {point} (|vector| = {np.linalg.norm(vector):.0f}); their answers:")
    for scale in (0.0, 0.25, 0.5, 1.0):
        outs = model.generate([chat_ids(model, q) for q in targets], max_new_tokens=8,
                              hooks={point: hooks.add(vector, scale)})
        answers = [task.parse_answer(o.text) for o in outs]
        print(f"   scale {scale:4.2f}: {answers}")

    # ---- 3. head ablation ----------------------------------------------------------------
    contexts = [model.tokenizer.apply_chat_template(q.messages(with_answer=False))
                for q in problems]
    answers = [q.answer for q in problems]

    def quality(h=None) -> tuple[float, float]:
        scores = model.score(contexts, answers, hooks=h)
        return (float(np.mean([s.total for s in scores])),
                float(np.mean([s.is_greedy for s in scores])))

    base_lp, base_acc = quality()
    print(f"\n3. head ablation on {len(problems)} held-out problems: mean logprob of the right "
          f"answer (greedy accuracy); unablated {base_lp:.2f} ({base_acc:.0%})")
    print("   layer | " + " | ".join(f"head {n:<8}" for n in range(N)))
    for i in range(L):
        cells = []
        for n in range(N):
            scales = np.ones(N, np.float32)
            scales[n] = 0.0
            lp, acc = quality({f"layers.{i}.attn.heads": hooks.scale_heads(scales)})
            cells.append(f"{lp:6.2f} ({acc:4.0%})")
        print(f"   {i:5d} | " + " | ".join(cells))

    # ---- 4. scoring ----------------------------------------------------------------------
    context = contexts[0]
    print(f"\n4. scoring continuations of {problems[0].prompt!r}")
    for guess in (problems[0].answer, f"x = {(problems[0].x + 1) % 10}"):
        s = model.score(context, guess)[0]
        print(f"   {guess!r}: total {s.total:7.3f}, per token "
              f"{[round(x, 3) for x in s.logprobs]}, greedy {s.is_greedy}")


if __name__ == "__main__":
    main()
