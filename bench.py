"""bench.py: what phase-routed LoRA experts cost, and the paper's routing-granularity ablation in miniature.

Run:
    python bench.py                 # timing table (CPU: tiny + mid model; CUDA: + Qwen2.5-1.5B's shape) -> bench.json
    python bench.py ablation        # routing in {dense, token, trajectory, phase} x 3 seeds
                                    # on the toy env with the tiny model -> runs/ablation/ablation.md
    bash run.sh bench | ablation    # the same, in the project's environment
    python bench.py ablation --num_envs 16   # flags bench.py does not know go to every pamoe.py run

Timing rows (medians over --repeats after --warmup, all measured in the same run):
- fwd+bwd of a fixed batch (next-token loss on random token ids) through: the frozen base (its backward reaches the
  input embeddings, so it pays the activation gradients an adapter pays); base + one LoRA of rank r; base + K
  routed experts of rank r in our stacked pass (sequence i uses expert i mod K, all in one pass); base + K experts
  done as K masked full passes (one fwd+bwd of the whole batch per expert through a rank-r adapter, the loss
  masked to that expert's sequences: separate per-expert adapters, as in the released code). Ratios are to one
  LoRA.
- generation: sampled tokens/s of one batch (fixed length, no EOS), base vs K routed experts; env steps/s of one
  toy-env rollout (`tiny` only: the other sizes have no tokenizer) with the experts off vs on (the phase router
  and the frozen step features run in both). The agent rows run in pamoe's own dtype (`tiny`: float32).
- PPO update: tokens through fwd+bwd per second in one update over one toy rollout (`tiny`).
- peak memory of each row: CUDA max_memory_allocated; CPU the process's peak resident set during the row (it
  includes the model and everything loaded before).
Models are built from configs with random weights (no download); `qwen2.5-1.5b` has Qwen2.5-1.5B's real shape.
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

import envs
import pamoe

# Qwen2 shapes: hidden, intermediate, layers, heads, kv heads, vocab; fwd+bwd batch: sequences x tokens
SIZES = {"tiny": dict(batch=(8, 256)),  # pamoe.build_tiny, the CI and CPU-demo model
         "mid": dict(shape=(512, 1408, 8, 8, 2, 32000), batch=(8, 256)),
         "qwen2.5-1.5b": dict(shape=(1536, 8960, 28, 12, 2, 151936), batch=(16, 1024))}


def build(size, device, dtype):
    """The frozen base model of one size."""
    if size == "tiny":
        model = pamoe.build_tiny(envs.vocabulary(), seed=0)[0]
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM
        d, inter, layers, heads, kv, vocab = SIZES[size]["shape"]
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=vocab, hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=32768, rope_theta=1e6,
            rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=0))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def attach(model, routing, K, rank):
    """pamoe's experts on the model: routing 'dense' gives one LoRA, 'phase' K step-routed experts."""
    return pamoe.attach_experts(model, pamoe.Args(routing=routing, num_experts=K, rank=rank, alpha=2.0 * rank))[0]


def detach(model):
    """Undo attach: put the frozen base linears back."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, pamoe.LoRAExperts):
                setattr(parent, name, child.base)


class PeakMemory:
    """Peak memory while the block runs: the CUDA allocator's peak, or on CPU the resident set, sampled."""

    def __init__(self, device):
        self.device, self.peak = device, 0

    @staticmethod
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.rss())

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak, self.stop = self.rss(), threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, self.rss())


def measure(fn, device, warmup, repeats):
    """Median seconds of fn() over `repeats` calls after `warmup` calls, and the peak memory during them."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
    return statistics.median(times), mem.peak


def bench_model(size, device, dtype, K, rank, warmup, repeats, gen_tokens):
    model = build(size, device, dtype)
    nseq, ntok = SIZES[size]["batch"]
    ids = torch.randint(3, model.config.vocab_size, (nseq, ntok), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    expert_of = torch.arange(nseq, device=device) % K  # sequence i -> expert i mod K
    rows = []

    def row(what, fn, units, grad=True):
        with contextlib.nullcontext() if grad else torch.no_grad():
            sec, peak = measure(fn, device, warmup, repeats)
        rows.append(dict(size=size, what=what, seconds=sec, per_s=units / sec, peak_bytes=peak))

    def fwd_bwd(routing, passes, embed_grad=False):
        """passes: [(gates (B, 1, K) or None for experts off, rows whose loss counts or None for all)]"""
        def run():
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(embed_grad)
            for gates, sel in passes:
                with routing(gates) if gates is not None else contextlib.nullcontext():
                    logits = model(inputs_embeds=embeds).logits[:, :-1].float()  # (B, T-1, V)
                    loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)  # (B,)
                    (loss.mean() if sel is None else loss[sel].mean()).backward()
            for p in model.parameters():
                p.grad = None
        return run

    def onehot(k):  # (B, 1, K) gates of experts k (B,)
        return F.one_hot(k, K).float()[:, None]

    routing, on = attach(model, "dense", K, rank), torch.ones(nseq, 1, 1, device=device)
    row("fwd+bwd: frozen base", fwd_bwd(routing, [(None, None)], embed_grad=True), nseq * ntok)
    row(f"fwd+bwd: base + one LoRA (r={rank})", fwd_bwd(routing, [(on, None)]), nseq * ntok)
    # K separate rank-r adapters cost what K passes of one rank-r adapter cost, each loss masked to its sequences
    row(f"fwd+bwd: base + {K} experts, {K} masked full passes",
        fwd_bwd(routing, [(on, expert_of == k) for k in range(K)]), nseq * ntok)
    detach(model)
    routing = attach(model, "phase", K, rank)
    row(f"fwd+bwd: base + {K} routed experts, one stacked pass (ours)",
        fwd_bwd(routing, [(onehot(expert_of), None)]), nseq * ntok)

    prompt = ids[:, :128]
    cfg = dict(do_sample=True, top_k=0, top_p=1.0, max_new_tokens=gen_tokens, min_new_tokens=gen_tokens,
               pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(prompt))
    row("generate: base (tokens/s)", lambda: model.generate(prompt, **cfg), nseq * gen_tokens, grad=False)

    def routed_generate():
        with routing(onehot(expert_of)):
            model.generate(prompt, **cfg)
    row(f"generate: {K} routed experts (tokens/s)", routed_generate, nseq * gen_tokens, grad=False)
    detach(model)
    return rows


def bench_agent(device, K, rank, warmup, repeats):
    """The `tiny` agent on the toy env: env steps/s of a rollout (experts off vs routed), one PPO update."""
    args = pamoe.parse_args(["--device", device.type, "--tiny_format_steps", "0", "--num_experts", str(K),
                             "--rank", str(rank)])
    torch.manual_seed(0)
    agent = pamoe.Agent(args, device)
    env_batch = envs.make_env_batch("toy", args.num_envs, args.max_steps)
    seeds = list(range(args.num_envs))
    rows = []

    def play(agent_routing, steps):
        def run():
            agent.routing = agent_routing  # a Routing the expert modules do not read leaves them off
            steps.append(len(pamoe.rollout(agent, env_batch, seeds, args.tau_start, 1.0, greedy_router=False)["k"]))
        return run

    shared = agent.routing
    for what, r in (("rollout: phase router, experts off (env steps/s)", pamoe.Routing()),
                    (f"rollout: phase router + {K} experts (env steps/s)", shared)):
        steps = []
        sec, peak = measure(play(r, steps), device, warmup, repeats)
        rows.append(dict(size="tiny", what=what, seconds=sec, per_s=statistics.median(steps) / sec, peak_bytes=peak))
    agent.routing = shared
    R = pamoe.rollout(agent, env_batch, seeds, args.tau_start, 1.0, greedy_router=False)
    B = pamoe.prepare_batch(agent, R)
    opt = torch.optim.AdamW(agent.param_groups(), weight_decay=args.weight_decay)
    sec, peak = measure(lambda: pamoe.ppo_update(agent, opt, R, B, {"updates": 0}), device, warmup, repeats)
    tokens = args.epochs * sum(len(s) for s in R["seq"])
    rows.append(dict(size="tiny", what="PPO update (fwd+bwd tokens/s)", seconds=sec, per_s=tokens / sec,
                     peak_bytes=peak))
    env_batch.close()
    return rows


def bench_table(rows):
    lines = [f"{'model':<13} {'measurement':<58} {'seconds':>9} {'per second':>11} {'vs 1 LoRA':>9} {'peak MiB':>9}"]
    for r in rows:
        if r["seconds"] is None:
            lines.append(f"{r['size']:<13} {r['what']:<58} {'not measured (needs CUDA)':>41}")
            continue
        ratio = f"{r['vs_one_lora']:.2f}x" if "vs_one_lora" in r else ""
        lines.append(f"{r['size']:<13} {r['what']:<58} {r['seconds']:>9.4f} {r['per_s']:>11.0f} {ratio:>9} "
                     f"{r['peak_bytes'] / 2**20:>9.0f}")
    return "\n".join(lines)


def bench(opts):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = opts.sizes.split(",") if opts.sizes else ["tiny", "mid", "qwen2.5-1.5b"]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"bench.py: error: unknown --sizes {unknown}; use {','.join(SIZES)}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    rows, t0 = [], time.time()
    for size in sizes:
        if size == "qwen2.5-1.5b" and device.type != "cuda":
            rows.append(dict(size=size, what="all rows", seconds=None))
            continue
        model_rows = bench_model(size, device, dtype, opts.experts, opts.rank, opts.warmup, opts.repeats,
                                 opts.gen_tokens)
        lora = next(r["seconds"] for r in model_rows if "one LoRA" in r["what"])
        for r in model_rows:
            if r["what"].startswith("fwd+bwd"):
                r["vs_one_lora"] = r["seconds"] / lora
        rows += model_rows
        if size == "tiny":
            rows += bench_agent(device, opts.experts, opts.rank, opts.warmup, opts.repeats)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    report = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "K": opts.experts,
              "rank": opts.rank, "repeats": opts.repeats, "warmup": opts.warmup, "seconds_total": time.time() - t0,
              "rows": rows}
    print(f"bench.py on {name}, K={opts.experts}, r={opts.rank}, median of {opts.repeats} after {opts.warmup} "
          f"warm-up ({report['seconds_total']:.0f} s in all)")
    print(bench_table(rows))
    with open(opts.out, "w") as f:
        json.dump(report, f, indent=1)
    return report


# ---------------------------------------------------------------------------------------------------------
# The routing ablation: pamoe.py runs in subprocesses, then one markdown table
# ---------------------------------------------------------------------------------------------------------
ABLATION = {"dense": ["--routing", "dense"], "token": ["--routing", "token"], "trajectory": ["--routing", "trajectory"],
            "phase": ["--routing", "phase"]}


RESERVED = ("--routing", "--seed", "--iterations", "--eval_every", "--eval_episodes", "--out_dir",
            "--resume")  # set by the ablation itself


def run_args(name, seed, out, opts, passthrough):
    """pamoe.py's arguments of one ablation run (without --resume)."""
    return [*passthrough, *ABLATION[name], "--seed", str(seed), "--iterations", str(opts.iterations),
            "--eval_every", str(opts.iterations), "--eval_episodes", str(opts.eval_episodes), "--out_dir", out]


def final_metrics(out_dir, args):
    """A run made with exactly these arguments and finished: its last metrics line (with the evaluation) and all its
    lines; else None."""
    try:
        with open(os.path.join(out_dir, "args.json")) as f:
            same = json.load(f) == args
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            lines = [json.loads(line) for line in f]
    except FileNotFoundError:
        return None
    done = same and lines and lines[-1]["iteration"] == int(args[args.index("--iterations") + 1]) \
        and "eval/success" in lines[-1]
    return (lines[-1], lines) if done else None


def run_ablation(opts, passthrough, command):
    names = opts.routings.split(",")
    unknown = [n for n in names if n not in ABLATION]
    if unknown:
        raise SystemExit(f"bench.py: error: unknown --routings {unknown}; use {','.join(ABLATION)}")
    clash = [f for f in passthrough if f.split("=")[0] in RESERVED]
    if clash or opts.iterations < 1:
        raise SystemExit(f"bench.py: error: the ablation sets {', '.join(RESERVED)} itself (got {clash}); use "
                         "--routings, --seeds, --iterations >= 1 and --eval_episodes of bench.py instead")
    seeds = [int(s) for s in opts.seeds.split(",")]
    pamoe.parse_args(passthrough + ["--iterations", str(opts.iterations)])  # bad pamoe flags stop here, not 15x
    jobs = [(n, s, os.path.join(opts.out_dir, f"{n}-seed{s}")) for n in names for s in seeds]
    jobs = [(n, s, out, run_args(n, s, out, opts, passthrough)) for n, s, out in jobs]
    todo = [j for j in jobs if final_metrics(j[2], j[3]) is None]
    workers = opts.jobs or max(1, min(len(todo), os.cpu_count() or 1))
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // workers)))
    print(f"ablation: {len(jobs)} runs ({len(jobs) - len(todo)} already done), {workers} at a time, "
          f"{opts.iterations} iterations each -> {opts.out_dir}", flush=True)
    t0, running, failed = time.time(), [], []
    while todo or running:
        while todo and len(running) < workers:
            name, seed, out, args = todo.pop(0)
            os.makedirs(out, exist_ok=True)
            ckpt, record = os.path.join(out, "checkpoint.pt"), os.path.join(out, "args.json")
            resumable = os.path.exists(ckpt) and os.path.exists(record) and json.load(open(record)) == args
            if not resumable:  # a run made with other arguments (or none yet) starts afresh
                for stale in ("checkpoint.pt", "metrics.jsonl", "eval.log"):
                    if os.path.exists(os.path.join(out, stale)):
                        os.remove(os.path.join(out, stale))
                with open(record, "w") as f:
                    json.dump(args, f)
            cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "pamoe.py"), *args,
                   *(["--resume", ckpt] if resumable else [])]
            log = open(os.path.join(out, "stdout.log"), "a")
            running.append((name, seed, out, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        time.sleep(1)
        for job in [j for j in running if j[3].poll() is not None]:
            running.remove(job)
            job[4].close()
            status = "done" if job[3].returncode == 0 else f"FAILED (exit {job[3].returncode}, see {job[2]}/stdout.log)"
            if job[3].returncode:
                failed.append(job[2])
            print(f"  {job[0]} seed {job[1]}: {status} at {(time.time() - t0) / 60:.1f} min", flush=True)
    results = {(n, s): final_metrics(out, args) for n, s, out, args in jobs}
    missing = [f"{n} seed {s}" for (n, s), r in results.items() if r is None]
    if missing:
        raise SystemExit(f"bench.py: error: ablation runs without results: {missing}; rerun the same command to "
                         f"resume them (their logs: {failed})")
    table = ablation_table(results, names, seeds)
    header = (f"Routing ablation, {time.strftime('%Y-%m-%d')}: `{command}`"
              f" ({opts.iterations} iterations per run, {len(seeds)} seeds, evaluation on {opts.eval_episodes} fixed "
              f"episodes at the end; {(time.time() - t0) / 60:.1f} min wall for the runs not already done)\n\n")
    with open(os.path.join(opts.out_dir, "ablation.md"), "w") as f:
        f.write(header + table + "\n")
    print(header + table)
    return results


def spread(values):
    """'mean ± sd' over seeds (sample standard deviation)."""
    values = [v for v in values if v is not None and not np.isnan(v)]
    if not values:
        return "-"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def ablation_table(results, names, seeds):
    """Markdown: success overall and per task type, switches, phase purity, PPO ratio statistics (mean ± sd over
    seeds); then expert usage per task type of every run (experts are named per run: letters do not match
    across seeds)."""
    tasks = envs.TASK_TYPES
    cols = ["routing", "success", *tasks, "switches / episode", "phase NMI", "task NMI", "experts >= 5%",
            "clip fraction", "ratio variance"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for n in names:
        finals = [results[(n, s)][0] for s in seeds]
        train = [results[(n, s)][1] for s in seeds]

        def over_training(key):  # mean over a run's iterations, per seed
            return [np.mean([m[key] for m in lines]) if key in lines[0] else None for lines in train]
        cells = [n, spread([m["eval/success"] for m in finals]),
                 *[spread([m.get(f"eval/success/{t}") for m in finals]) for t in tasks],
                 spread([m["eval/switches"] for m in finals]), spread([m["eval/phase_nmi"] for m in finals]),
                 spread([m["eval/task_nmi"] for m in finals]),
                 spread([sum(v >= 0.05 for k, v in m.items() if k.startswith("eval/expert_share/")) for m in finals]),
                 spread(over_training("clipfrac")), spread(over_training("ratio_var"))]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Expert usage per task type at the final evaluation (experts with >= 5% of the task's steps):", "",
            "| routing | seed | " + " | ".join(tasks) + " |", "|" + "---|" * (2 + len(tasks))]
    for n in names:
        for s in seeds:
            m = results[(n, s)][0]
            cells = []
            for t in tasks:
                use = sorted(((v, k.split("/")[-1]) for k, v in m.items() if k.startswith(f"eval/usage/{t}/")),
                             reverse=True)
                cells.append(" ".join(f"{e} {v:.2f}" for v, e in use if v >= 0.05) or "-")
            out.append(f"| {n} | {s} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    what = argv[0] if argv[:1] in (["bench"], ["ablation"]) else "bench"
    rest = argv[1:] if argv[:1] == [what] else argv
    parser = argparse.ArgumentParser(prog=f"bench.py {what}", allow_abbrev=False,
                                     description="PA-MoE cost benchmark" if what == "bench" else
                                     "PA-MoE routing ablation; flags not listed here go to every pamoe.py run")
    if what == "bench":
        parser.add_argument("--sizes", default="", help="comma list of tiny, mid, qwen2.5-1.5b (default: all; "
                            "qwen2.5-1.5b needs CUDA)")
        parser.add_argument("--experts", type=int, default=4, help="K")
        parser.add_argument("--rank", type=int, default=32, help="r of each expert and of the single LoRA")
        parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
        parser.add_argument("--repeats", type=int, default=5, help="timed calls (median reported)")
        parser.add_argument("--gen_tokens", type=int, default=32, help="sampled tokens per sequence")
        parser.add_argument("--out", default="bench.json", help="where the rows go")
        opts = parser.parse_args(rest)
        if min(opts.repeats, opts.experts, opts.rank, opts.gen_tokens) < 1 or opts.warmup < 0:
            parser.error("--repeats, --experts, --rank and --gen_tokens must be >= 1, --warmup >= 0")
        return bench(opts)
    parser.add_argument("--routings", default=",".join(ABLATION), help="comma list of " + ",".join(ABLATION))
    parser.add_argument("--seeds", default="1,2,3", help="comma list of seeds")
    parser.add_argument("--iterations", type=int, default=16, help="iterations per run (the fixed budget)")
    parser.add_argument("--eval_episodes", type=int, default=128, help="final evaluation episodes")
    parser.add_argument("--jobs", type=int, default=0, help="runs at once (0 = one per CPU core)")
    parser.add_argument("--out_dir", default="runs/ablation", help="one folder per run + ablation.md")
    opts, passthrough = parser.parse_known_args(rest)
    return run_ablation(opts, passthrough, " ".join(["python bench.py", *argv]))


if __name__ == "__main__":
    main()
