"""GRPO update throughput: the jitted JAX step vs the same step in PyTorch with transformers.

A random model at SmolLM2-135M's dimensions (`--preset=tiny` for a small one) is built with
transformers, saved, and loaded into the JAX `Transformer`; both sides run the same update on the
same batch: forward, temperature-scaled float32 log-probs, the decoupled clipped GRPO loss (token
mean, capped importance weight), backward, global-norm clipping and AdamW with warmup. The first
step's losses must agree. The sides take turns of `--steps` steps each, and a turn's fastest
step counts: on this box the first step after the other side's ran up to 14 s (45%) slower,
whether the two sides shared a process or not. Prints tokens/s of each and their ratio, the JAX
step's model FLOP/s (6 x matmul parameters x tokens) over the matmul throughput measured in the
same run at the step's shapes (and, on an accelerator, over an 8192^3 product's: the MFU), and
the compiled program's temporary memory per token, last. `--skip_torch` times the JAX step alone,
on random weights built in JAX, in any `--dtype`.

  python benchmarks/bench_update.py                      # SmolLM2 size, batch 8 x 512 tokens
  python benchmarks/bench_update.py --tokens=1024 --microbatches=2
  python benchmarks/bench_update.py --preset=tiny --tokens=256
  python benchmarks/bench_update.py --preset=qwen2.5-1.5b --dtype=bfloat16 --skip_torch  # GPU
  taskset -c 1 python benchmarks/bench_update.py        # both sides on one core

On a shared machine the two-thread figure flatters JAX: PyTorch's OpenMP threads lose more to
other processes' load than XLA's pool. Pinning both to one core gives a load-robust ratio.
"""

import argparse
import os
import statistics
import tempfile
import time

import common  # benchmarks/common.py
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from toolr1_jax import update
from toolr1_jax.models import model as model_lib
from toolr1_jax.models import params as params_lib

LOSS = update.LossConfig(
    clip_low=0.2,
    clip_high=0.28,
    is_cap=2.0,
    beta=0.0,
    kl_estimator="k3",
    aggregation="token_mean",
    temperature=0.8,
)
LR, WARMUP_STEPS, TOTAL_STEPS, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-5, 2, 1000, 0.0, 1.0


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=512, help="sequence length L")
    common.add_model_args(p)
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument(
        "--chunk", type=int, default=256, help="LM-head chunk (positions; the trainer's is 256)"
    )
    p.add_argument(
        "--remat",
        default="block",
        choices=model_lib.REMAT_POLICIES,
        help="what the JAX backward recomputes (optim.remat); PyTorch recomputes nothing",
    )
    p.add_argument("--steps", type=int, default=2, help="steps per turn (the fastest counts)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed runs of each side")
    p.add_argument(
        "--skip_torch", action="store_true", help="JAX only (random weights built in JAX)"
    )
    common.add_dtype_arg(p)
    args = common.resolve_model_args(p.parse_args())
    if args.dtype != "float32" and not args.skip_torch:
        p.error("the PyTorch side runs in float32 (its loss must match): use --skip_torch")
    return args


def make_batch(args):
    rng = np.random.default_rng(0)
    b, n = args.batch, args.tokens
    prompt = n // 4
    tokens = rng.integers(1, args.vocab, (b, n)).astype(np.int32)
    loss_mask = np.zeros((b, n), np.float32)
    loss_mask[:, prompt:] = 1.0
    behaviour = (-rng.uniform(0.5, 9.0, (b, n)) * loss_mask).astype(np.float32)
    return {
        "tokens": tokens,
        "positions": np.broadcast_to(np.arange(n, dtype=np.int32), (b, n)).copy(),
        "attn_mask": np.ones((b, n), bool),
        "loss_mask": loss_mask,
        "behaviour_logprobs": behaviour,
        "advantages": rng.normal(size=b).astype(np.float32),
    }


def torch_step_fn(hf, batch, microbatches):
    """The same update in PyTorch: returns a closure running one optimizer step."""
    opt = torch.optim.AdamW(
        hf.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / WARMUP_STEPS, 1.0))
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    t["tokens"] = t["tokens"].long()
    n_tok = t["loss_mask"][:, 1:].sum()

    def micro_loss(rows):
        logits = hf(input_ids=t["tokens"][rows], attention_mask=t["attn_mask"][rows].long()).logits
        logits = logits[:, :-1].float() / LOSS.temperature
        logp = torch.log_softmax(logits, -1).gather(-1, t["tokens"][rows, 1:, None])[..., 0]
        mask = t["loss_mask"][rows, 1:]
        adv = t["advantages"][rows, None]
        ratio = torch.exp(logp - logp.detach())  # on-policy: pi_prox is the current policy
        clipped = ratio.clamp(1 - LOSS.clip_low, 1 + LOSS.clip_high)
        pg = torch.maximum(-adv * ratio, -adv * clipped)
        log_w = torch.where(mask > 0, logp.detach() - t["behaviour_logprobs"][rows, 1:], 0.0)
        w = torch.exp(log_w).clamp(max=LOSS.is_cap)
        return (w * pg * mask).sum()

    def step():
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for m in range(microbatches):
            rows = torch.arange(m, t["tokens"].shape[0], microbatches)
            loss = micro_loss(rows) / n_tok
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), MAX_GRAD_NORM)
        opt.step()
        sched.step()
        return total

    return step


def turn(step, steps):
    """Seconds of each of `steps` calls of `step`."""
    seconds = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)
    return seconds


def main():
    args = parse_args()
    print(f"machine: {os.cpu_count()} CPUs, jax {jax.__version__} on {jax.devices()[0].platform}, ")
    dtype = common.DTYPES[args.dtype]
    if args.skip_torch:
        hf = None
        model = model_lib.Transformer(common.model_config(args), rngs=nnx.Rngs(0), dtype=dtype)
    else:
        print(f"torch {torch.__version__} with {torch.get_num_threads()} threads")
        torch.manual_seed(0)
        config = common.hf_config(args, args.tokens)
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        hf.config._attn_implementation = "sdpa"
        hf.train()
        with tempfile.TemporaryDirectory() as workdir:
            hf.save_pretrained(workdir)
            model, _ = params_lib.load_pretrained(workdir, dtype=dtype)
    batch = make_batch(args)
    tokens_per_step = int(batch["loss_mask"].size)
    print(
        f"model: {common.describe(args)}; batch {args.batch} x {args.tokens} tokens, "
        f"{args.microbatches} micro-batch(es), JAX remat {args.remat}, {args.dtype}"
    )

    # JAX: the first call compiles; later calls reuse the program and donate their inputs.
    model.remat = args.remat
    graphdef, state = nnx.split(model)
    optimizer = update.make_optimizer(
        LR, WARMUP_STEPS, TOTAL_STEPS, WEIGHT_DECAY, MAX_GRAD_NORM, end_lr_ratio=1.0
    )
    opt_state = optimizer.init(state)
    step = update.make_train_step(
        graphdef, optimizer, LOSS, num_microbatches=args.microbatches, chunk_size=args.chunk
    )
    jbatch = update.Batch(**{k: jnp.asarray(v) for k, v in batch.items()})
    t0 = time.perf_counter()
    compiled = step.lower(state, opt_state, jbatch).compile()
    print(f"jax: compile {time.perf_counter() - t0:.1f} s")
    memory = compiled.memory_analysis()
    step = compiled  # the same program; its calls donate state and opt_state too
    state, opt_state, metrics = step(state, opt_state, jbatch, None)
    jax_loss = float(metrics["loss"])

    def jax_step():
        nonlocal state, opt_state
        state, opt_state, m = step(state, opt_state, jbatch, None)
        jax.block_until_ready(m)

    sides = {"jax": jax_step}
    if hf is not None:
        torch_step = torch_step_fn(hf, batch, args.microbatches)
        torch_loss = torch_step()
        # Same loss on the same weights before any update (the token-mean counts positions
        # 1..L-1 on both sides: position 0 has no prediction).
        print(f"first-step loss: jax {jax_loss:.6f}, torch {torch_loss:.6f}")
        if not np.isclose(jax_loss, torch_loss, rtol=1e-3, atol=1e-5):
            raise SystemExit(
                "The two implementations disagree on the loss; timings are meaningless."
            )
        sides["torch"] = torch_step
    # Interleaved, so that both sides see the same background load on a shared machine; the
    # median of the per-repeat ratios is robust to a repeat that one side lost to other work.
    turns = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, side_step in sides.items():
            turns[name].append(turn(side_step, args.steps))
    for name, side_turns in turns.items():
        steps = "  ".join(" ".join(f"{t:.1f}" for t in seconds) for seconds in side_turns)
        print(f"{name} steps by turn (s): {steps}")
    best_times = {name: [min(seconds) for seconds in t] for name, t in turns.items()}
    for name, times in best_times.items():
        med, best = statistics.median(times), min(times)
        print(
            f"{name + ':':6s} median {med * 1e3:8.1f} ms/step {tokens_per_step / med:8.0f} tokens/s"
            f"   best {best * 1e3:8.1f} ms/step {tokens_per_step / best:8.0f} tokens/s"
        )
    jax_times = best_times["jax"]
    if hf is not None:
        torch_times = best_times["torch"]
        ratios = [t / j for j, t in zip(jax_times, torch_times, strict=True)]
        print(f"per-repeat speedups: {' '.join(f'{r:.2f}' for r in ratios)}")

    # Limits measured now, on the shapes the step's big matmuls have: the MLP's [rows, D] x
    # [D, F] with rows the tokens of one micro-batch.
    rows = tokens_per_step // args.microbatches
    peak = common.matmul_flops_per_s(rows, args.hidden, args.intermediate, dtype)
    model_flops = 3 * common.matmul_flops(args, tokens_per_step)  # forward + backward
    jax_best = min(jax_times)
    print(
        f"{args.dtype} matmul [{rows}x{args.hidden}]x[{args.hidden}x{args.intermediate}]: "
        f"{peak / 1e9:.0f} GFLOP/s; model FLOPs/step {model_flops / 1e12:.2f} T"
    )
    # An accelerator's own best: a large square product (on the CPU the step's shapes already
    # run near it, and an 8192-cube would take minutes).
    device_peak = None
    if jax.default_backend() != "cpu":
        device_peak = common.matmul_flops_per_s(8192, 8192, 8192, dtype)
        print(f"{args.dtype} matmul 8192^3: {device_peak / 1e12:.0f} TFLOP/s")
    temp = memory.temp_size_in_bytes if memory is not None else float("nan")
    print("--- ratios ---")
    if hf is not None:
        print(
            f"speedup (jax / torch tokens/s): median {statistics.median(ratios):.2f}x, "
            f"best-vs-best {min(torch_times) / jax_best:.2f}x"
        )
    torch_use = f" (torch: {model_flops / min(torch_times) / peak:.2f})" if hf is not None else ""
    print(
        f"jax model FLOP/s over matmul throughput: {model_flops / jax_best / peak:.2f}{torch_use}"
    )
    if device_peak is not None:
        mfu = model_flops / jax_best / device_peak
        print(f"jax model FLOP/s over the 8192^3 product's (MFU): {mfu:.2f}")
    print(
        f"jax temporaries: {temp / 2**30:.2f} GiB, {temp / tokens_per_step / 2**10:.0f} KiB "
        "per token"
    )


if __name__ == "__main__":
    main()
