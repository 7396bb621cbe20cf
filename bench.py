"""bench.py: what phase-routed LoRA experts cost, and the ablations that compare routings and
training signals over seeds, with intervals and figures.

Run:
    python bench.py                  # timing table (CPU: tiny + mid; CUDA: + Qwen2.5-1.5B's shape)
    python bench.py ablation         # one LoRA (rank r and K*r), trajectory, token, phase routing
                                     # x seeds 1-8 -> runs/ablation/ablation.md (95% bootstrap
                                     # intervals, the reference against every arm), ablation.png
    python bench.py ablation --arm "grpo=--advantage grpo --group_size 8" --reference phase
                                     # an arm of one's own; flags bench.py does not know go to
                                     # every pamoe.py run (--diagnostics: occupancy and conflict)
    python bench.py memory           # activation bytes per token of one PPO micro-batch on
                                     # Qwen2.5-1.5B's shape, with and without --grad_ckpt
    python bench.py preflight [pamoe.py flags]   # one rollout step and one PPO micro-batch at the
                                     # largest sizes the flags allow: peak memory and time
    python bench.py gpu-rollout      # the prepared script for a lent GPU: decode, eager, compiled
    python bench.py probe            # linear probes: can the router's input tell the phases apart?
    bash run.sh bench | ablation | preflight     # the same, in the project's environment

Timing rows (medians over --repeats after --warmup, all measured in the same run):
- fwd+bwd of a fixed batch (next-token loss on random token ids) through: the frozen base (its
  backward reaches the input embeddings, so it pays the activation gradients an adapter pays);
  base + one LoRA of rank r; base + K routed experts of rank r in our stacked pass (sequence i
  uses expert i mod K, all in one pass); base + K experts done as K masked full passes (one
  fwd+bwd of the whole batch per expert, the loss masked to that expert's sequences: separate
  per-expert adapters, as in the released code). Ratios are to one LoRA.
- generation: sampled tokens/s of one batch (fixed length, no EOS), base vs K routed experts; env
  steps/s of one toy-env rollout (`tiny` only) with the experts off vs on.
- PPO update: tokens through fwd+bwd per second in one update over one toy rollout (`tiny`).
- peak memory of each row: CUDA max_memory_allocated; CPU the process's peak resident set.
Models are built from configs with random weights (no download); `qwen2.5-1.5b` has Qwen2.5-1.5B's
real shape."""

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

import analysis
import envs
import pamoe

# Qwen2 shapes: hidden, intermediate, layers, heads, kv heads, vocab; fwd+bwd batch: sequences x
# tokens
SIZES = {
    "tiny": dict(batch=(8, 256)),  # envs.build_tiny, the CI and CPU-demo model
    "mid": dict(shape=(512, 1408, 8, 8, 2, 32000), batch=(8, 256)),
    "qwen2.5-1.5b": dict(shape=(1536, 8960, 28, 12, 2, 151936), batch=(4, 1024)),
    "small": dict(shape=(64, 128, 2, 4, 2, 512), batch=(4, 64)),  # gpu-rollout's CPU test
}


def build(size, device, dtype):
    """The frozen base model of one size."""
    if size == "tiny":
        model = envs.build_tiny(envs.vocabulary(), seed=0)[0]
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        d, inter, layers, heads, kv, vocab = SIZES[size]["shape"]
        config = Qwen2Config(
            vocab_size=vocab,
            hidden_size=d,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            max_position_embeddings=32768,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            pad_token_id=0,
        )
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built on the device in its dtype: seconds, not minutes
        try:
            with torch.device(device):
                model = Qwen2ForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def byte_tokenizer():
    """A byte-level BPE tokenizer built here (256 byte symbols, no merges, Qwen's special tokens, a
    chat template): every character of an ASCII text is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    core = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tok


def attach(model, routing, K, rank):
    """pamoe's experts on the model: routing 'dense' gives one LoRA, 'phase' K step-routed
    experts."""
    return pamoe.attach_experts(
        model, pamoe.Args(routing=routing, num_experts=K, rank=rank, alpha=2.0 * rank)
    )[0]


def detach(model):
    """Undo attach: put the frozen base linears back."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, pamoe.LoRAExperts):
                setattr(parent, name, child.base)


class PeakMemory:
    """Peak memory while the block runs: the CUDA allocator's peak, or on CPU the resident set,
    sampled."""

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
    """Median seconds of fn() over `repeats` calls after `warmup` calls, and the peak memory during
    them."""
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
    ids = torch.randint(
        3, model.config.vocab_size, (nseq, ntok), generator=torch.Generator().manual_seed(0)
    )
    ids = ids.to(device)
    expert_of = torch.arange(nseq, device=device) % K  # sequence i -> expert i mod K
    rows = []

    def row(what, fn, units, grad=True):
        with contextlib.nullcontext() if grad else torch.no_grad():
            sec, peak = measure(fn, device, warmup, repeats)
        rows.append(dict(size=size, what=what, seconds=sec, per_s=units / sec, peak_bytes=peak))

    def fwd_bwd(routing, passes, embed_grad=False):
        """passes: [(gates (B, 1, K) or None for experts off, rows whose loss counts or None for
        all)]"""

        def run():
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(embed_grad)
            for gates, sel in passes:
                with routing(gates) if gates is not None else contextlib.nullcontext():
                    logits = model(inputs_embeds=embeds).logits[:, :-1].float()  # (B, T-1, V)
                    # (B,)
                    loss = F.cross_entropy(
                        logits.transpose(1, 2), ids[:, 1:], reduction="none"
                    ).mean(1)
                    (loss.mean() if sel is None else loss[sel].mean()).backward()
            for p in model.parameters():
                p.grad = None

        return run

    def onehot(k):  # (B, 1, K) gates of experts k (B,)
        return F.one_hot(k, K).float()[:, None]

    routing, on = attach(model, "dense", K, rank), torch.ones(nseq, 1, 1, device=device)
    row("fwd+bwd: frozen base", fwd_bwd(routing, [(None, None)], embed_grad=True), nseq * ntok)
    row(f"fwd+bwd: base + one LoRA (r={rank})", fwd_bwd(routing, [(on, None)]), nseq * ntok)
    # K separate rank-r adapters cost what K passes of one rank-r adapter cost, each loss masked to
    # its sequences
    row(
        f"fwd+bwd: base + {K} experts, {K} masked full passes",
        fwd_bwd(routing, [(on, expert_of == k) for k in range(K)]),
        nseq * ntok,
    )
    detach(model)
    routing = attach(model, "phase", K, rank)
    row(
        f"fwd+bwd: base + {K} routed experts, one stacked pass (ours)",
        fwd_bwd(routing, [(onehot(expert_of), None)]),
        nseq * ntok,
    )

    prompt = ids[:, :128]
    cfg = dict(
        do_sample=True,
        top_k=0,
        top_p=1.0,
        max_new_tokens=gen_tokens,
        min_new_tokens=gen_tokens,
        pad_token_id=0,
        eos_token_id=None,
        attention_mask=torch.ones_like(prompt),
    )
    row(
        "generate: base (tokens/s)",
        lambda: model.generate(prompt, **cfg),
        nseq * gen_tokens,
        grad=False,
    )

    def routed_generate():
        with routing(onehot(expert_of)):
            model.generate(prompt, **cfg)

    row(f"generate: {K} routed experts (tokens/s)", routed_generate, nseq * gen_tokens, grad=False)
    detach(model)
    return rows


def bench_agent(device, K, rank, warmup, repeats):
    """The `tiny` agent on the toy env: env steps/s of a rollout (experts off vs routed), one PPO
    update."""
    args = pamoe.parse_args(
        ["--device", device.type, "--tiny_steps", "0", "--num_experts", str(K), "--rank", str(rank)]
    )
    torch.manual_seed(0)
    agent = pamoe.Agent(args, device)
    env_batch = envs.make_env_batch("toy", args.num_envs, args.max_steps)
    seeds = list(range(args.num_envs))
    rows = []

    def play(agent_routing, steps):
        def run():
            # a Routing the expert modules do not read leaves them off
            agent.routing = agent_routing
            steps.append(
                len(
                    pamoe.rollout(
                        agent, env_batch, seeds, args.tau_start, 1.0, greedy_router=False
                    ).k
                )
            )

        return run

    shared = agent.routing
    for what, r in (
        ("rollout: phase router, experts off (env steps/s)", pamoe.Routing()),
        (f"rollout: phase router + {K} experts (env steps/s)", shared),
    ):
        steps = []
        sec, peak = measure(play(r, steps), device, warmup, repeats)
        rows.append(
            dict(
                size="tiny",
                what=what,
                seconds=sec,
                per_s=statistics.median(steps) / sec,
                peak_bytes=peak,
            )
        )
    agent.routing = shared
    R = pamoe.rollout(agent, env_batch, seeds, args.tau_start, 1.0, greedy_router=False)
    B = pamoe.prepare_batch(agent, R)
    opt = torch.optim.AdamW(agent.param_groups(), weight_decay=args.weight_decay)
    sec, peak = measure(lambda: pamoe.prepare_batch(agent, R), device, warmup, repeats)
    rows.append(
        dict(
            size="tiny",
            what="old + reference log-probs, values, GAE (env steps/s)",
            seconds=sec,
            per_s=len(R.seq) / sec,
            peak_bytes=peak,
        )
    )
    sec, peak = measure(
        lambda: pamoe.ppo_update(agent, opt, R, B, {"updates": 0}), device, warmup, repeats
    )
    tokens = args.epochs * sum(len(s) for s in R.seq)
    rows.append(
        dict(
            size="tiny",
            what="PPO update (fwd+bwd tokens/s)",
            seconds=sec,
            per_s=tokens / sec,
            peak_bytes=peak,
        )
    )

    # the part of that update spent in the router (this and the next step) and the critic
    def heads():
        for _ in range(args.epochs):
            for mb in torch.randperm(len(R.seq)).split(args.minibatch):
                w, lanes = B.windows[mb], B.lanes[mb]
                out = agent.router(
                    R.features[torch.cat([w, w])],
                    R.goal_states[lanes.repeat(2)],
                    R.goal_mask[lanes.repeat(2)],
                ).sum()
                (
                    out
                    + agent.critic(R.features[w], R.goal_states[lanes], R.goal_mask[lanes]).sum()
                ).backward()

    sec, peak = measure(heads, device, warmup, repeats)
    rows.append(
        dict(
            size="tiny",
            what="  of which router + critic fwd+bwd (env steps/s)",
            seconds=sec,
            per_s=args.epochs * len(R.seq) / sec,
            peak_bytes=peak,
        )
    )
    env_batch.close()
    return rows


def bench_table(rows):
    lines = [
        f"{'model':<13} {'measurement':<58} {'seconds':>9} {'per second':>11} {'vs 1 LoRA':>9} "
        f"{'peak MiB':>9}"
    ]
    for r in rows:
        if r["seconds"] is None:
            lines.append(f"{r['size']:<13} {r['what']:<58} {'not measured (needs CUDA)':>41}")
            continue
        ratio = f"{r['vs_one_lora']:.2f}x" if "vs_one_lora" in r else ""
        lines.append(
            f"{r['size']:<13} {r['what']:<58} {r['seconds']:>9.4f} {r['per_s']:>11.0f} {ratio:>9} "
            f"{r['peak_bytes'] / 2**20:>9.0f}"
        )
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
        model_rows = bench_model(
            size, device, dtype, opts.experts, opts.rank, opts.warmup, opts.repeats, opts.gen_tokens
        )
        lora = next(r["seconds"] for r in model_rows if "one LoRA" in r["what"])
        for r in model_rows:
            if r["what"].startswith("fwd+bwd"):
                r["vs_one_lora"] = r["seconds"] / lora
        rows += model_rows
        if size == "tiny":
            rows += bench_agent(device, opts.experts, opts.rank, opts.warmup, opts.repeats)
    name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    report = {
        "device": name,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "K": opts.experts,
        "rank": opts.rank,
        "repeats": opts.repeats,
        "warmup": opts.warmup,
        "seconds_total": time.time() - t0,
        "rows": rows,
    }
    print(
        f"bench.py on {name}, K={opts.experts}, r={opts.rank}, median of {opts.repeats} after "
        f"{opts.warmup} "
        f"warm-up ({report['seconds_total']:.0f} s in all)"
    )
    print(bench_table(rows))
    with open(opts.out, "w") as f:
        json.dump(report, f, indent=1)
    return report


# --------------------------------------------------------------------------------------------------
# The memory model: what one PPO micro-batch keeps for backward, measured on CPU; the GPU table
# derived from it
# --------------------------------------------------------------------------------------------------
GIB = 2**30


def saved_bytes(model, fn):
    """Bytes autograd keeps for backward while fn() runs, which is what a GPU holds between a
    micro-batch's forward
    and its backward: every saved tensor's storage once, the model's own parameters and buffers not
    counted (frozen weights are kept to compute input gradients, but they are there anyway). Returns
    (bytes, fn())."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(kept.values()), out


def qwen_1p5b(layers):
    """Qwen2.5-1.5B-Instruct's config written out (no download), with `layers` decoder layers,
    random bf16 weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # initialised in bf16: 3 GB at 28 layers, not 6
    try:
        return (
            Qwen2ForCausalLM(
                Qwen2Config(
                    vocab_size=151936,
                    hidden_size=1536,
                    intermediate_size=8960,
                    num_hidden_layers=layers,
                    num_attention_heads=12,
                    num_key_value_heads=2,
                    max_position_embeddings=32768,
                    rope_theta=1e6,
                    rms_norm_eps=1e-6,
                    tie_word_embeddings=True,
                    pad_token_id=151643,
                )
            )
            .eval()
            .requires_grad_(False)
        )
    finally:
        torch.set_default_dtype(torch.float32)


def micro_batch_bytes(model, routing, K, T, R):
    """One sequence of T tokens whose last R are the response, through pamoe's PPO forward (the
    experts' LoRA path, the chunked log-probs and entropies): (bytes kept by the decoder, bytes kept
    by the log-prob head, seconds of forward + backward)."""
    ids = torch.randint(
        3, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T)
    )
    gates = F.one_hot(torch.tensor([1]), K).float()[:, None]
    t = time.perf_counter()
    # backward inside the routing, as ppo_update does (--grad_ckpt replays layers there)
    with routing(gates):
        body, hidden = saved_bytes(
            model, lambda: model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        )
        # the positions that predict the response, gathered as pamoe does
        pos = torch.arange(T - R - 1, T - 1)
        head, out = saved_bytes(
            model,
            lambda: pamoe.token_logp_entropy(
                hidden[0, pos], model.get_output_embeddings(), ids[0, pos + 1], 1.0
            ),
        )
        out.sum().backward()
    return body, head, time.perf_counter() - t


def memory(opts):
    """Measure the bytes per token a micro-batch keeps for backward at two layer counts and two
    lengths, with and without --grad_ckpt; extrapolate per layer to 28 layers; derive the largest
    --micro_batch per GPU size."""
    layer_counts, lengths = (
        sorted(int(x) for x in opts.layers.split(",")),
        [int(x) for x in opts.lengths.split(",")],
    )
    rows, sizes, t0 = [], {}, time.time()
    for layers in layer_counts:
        model = qwen_1p5b(layers)
        routing = attach(model, "phase", opts.experts, opts.rank)
        if not sizes:  # parameter counts, from the model itself
            layer0 = list(model.model.layers[0].parameters())
            sizes = {
                "layer": sum(p.numel() for p in layer0 if not p.requires_grad),
                "experts_per_layer": sum(p.numel() for p in layer0 if p.requires_grad),
                "embedding": sum(
                    p.numel() for n, p in model.named_parameters() if ".layers." not in n
                ),
                "router_and_critic": sum(
                    p.numel()
                    for out in (opts.experts, 1)
                    for p in pamoe.StepHead(model.config.hidden_size, out, 256, 3).parameters()
                ),
            }
            h = torch.randn(
                pamoe.LOGIT_CHUNK,
                model.config.hidden_size,
                dtype=torch.bfloat16,
                requires_grad=True,
            )
            y = torch.randint(model.config.vocab_size, (pamoe.LOGIT_CHUNK,))
            lm_head = model.get_output_embeddings()
            real = pamoe.checkpoint
            pamoe.checkpoint = lambda fn, *args, **kwargs: fn(*args)  # one chunk, unchecked
            try:
                sizes["logits_chunk_saved"] = saved_bytes(
                    model, lambda: pamoe.token_logp_entropy(h, lm_head, y, 1.0)
                )[0]
            finally:
                pamoe.checkpoint = real
        for ckpt in (False, True):
            if ckpt:
                pamoe.checkpoint_layers(model)
            for T in lengths:
                body, head, sec = micro_batch_bytes(model, routing, opts.experts, T, opts.response)
                rows.append(
                    dict(
                        layers=layers,
                        T=T,
                        R=opts.response,
                        grad_ckpt=ckpt,
                        body_bytes=body,
                        head_per_response_token=head / opts.response,
                        seconds=sec,
                    )
                )
                print(
                    f"{layers:>3} layers, {T:>5} tokens ({opts.response} response), --grad_ckpt "
                    f"{str(ckpt):<5}: "
                    f"decoder keeps {body / T / 1024:7.1f} KiB/token, log-prob head "
                    f"{head / opts.response / 1024:5.1f} KiB/response token; fwd+bwd {sec:5.1f} s",
                    flush=True,
                )
        del model, routing
    derived = derive(rows, sizes, opts)
    with open(opts.out, "w") as f:
        json.dump(
            {
                "date": time.strftime("%Y-%m-%d"),
                "torch": torch.__version__,
                "K": opts.experts,
                "rank": opts.rank,
                "seconds_total": time.time() - t0,
                "rows": rows,
                "sizes": sizes,
                **derived,
            },
            f,
            indent=1,
        )
    print(f"({time.time() - t0:.0f} s; rows and table in {opts.out})")
    return derived


def derive(rows, sizes, opts):
    """Per-layer fit of the measured bytes, extrapolated to Qwen2.5-1.5B's 28 layers, and the
    largest --micro_batch whose PPO step fits each GPU size at the given lengths. Every GPU figure
    here is derived, not measured on a GPU."""
    # layers, vocabulary, K/V width (2 heads x 128), MLP width
    L, V, kv_width, inter = 28, 151936, 2 * 128, 8960
    lo, hi, T = (
        min(r["layers"] for r in rows),
        max(r["layers"] for r in rows),
        max(r["T"] for r in rows),
    )

    # decoder bytes = per_token T + per_pass (the experts' weights, concatenated once a pass)
    def linear(ckpt, layers):
        (t1, b1), (t2, b2) = sorted(
            (r["T"], r["body_bytes"])
            for r in rows
            if r["grad_ckpt"] == ckpt and r["layers"] == layers
        )[-2:]
        return np.array([(b2 - b1) / (t2 - t1), b1 - (b2 - b1) / (t2 - t1) * t1])

    per = {}
    for ckpt in (False, True):
        # [per token, per pass] of one more layer
        layer = (linear(ckpt, hi) - linear(ckpt, lo)) / (hi - lo)
        body = linear(ckpt, lo) + (L - lo) * layer
        head = next(r for r in rows if r["grad_ckpt"] == ckpt and r["layers"] == hi and r["T"] == T)
        per[ckpt] = dict(
            layer=float(layer[0]),
            body=float(body[0]),
            per_pass=float(body[1]),
            head=head["head_per_response_token"],
        )
    # --grad_ckpt: one layer's activations exist again while it is replayed in backward
    replay = per[False]["layer"]
    S = opts.prompt + opts.new  # tokens per sequence; opts.new of them are response tokens
    weights = (sizes["embedding"] + L * sizes["layer"]) * 2  # bf16, tied embeddings
    # fp32 value, gradient, 2 AdamW
    trained = (L * sizes["experts_per_layer"] + sizes["router_and_critic"]) * 16
    # one chunk's backward: saved + gradients
    chunk = sizes["logits_chunk_saved"] + 2 * pamoe.LOGIT_CHUNK * V * 4
    kv = opts.num_envs * S * L * 2 * kv_width * 2  # the rollout's KV cache, bf16
    # the widest no-grad intermediates (MLP) of the prefill
    prefill = opts.num_envs * opts.prompt * 3 * inter * 2
    fixed = weights + trained
    out = {
        "per_token": {f"grad_ckpt={k}": v for k, v in per.items()},
        "fixed_bytes": fixed,
        "rollout_bytes": fixed + kv + prefill,
        "table": [],
    }
    for gb in (24, 40, 80):
        usable = gb * 1e9 * 0.9 - GIB  # 10% for allocator fragmentation, 1 GiB for the CUDA context
        row = {"gpu_gb": gb, "rollout_fits": fixed + kv + prefill <= usable}
        for ckpt in (False, True):
            per_seq = (
                S * per[ckpt]["body"] + opts.new * per[ckpt]["head"] + (S * replay if ckpt else 0)
            )
            row[f"micro_batch grad_ckpt={ckpt}"] = max(
                0, int((usable - fixed - chunk - per[ckpt]["per_pass"]) // per_seq)
            )
            row[f"GiB per sequence grad_ckpt={ckpt}"] = per_seq / GIB
        out["table"].append(row)
    print(
        f"\nDerived for Qwen2.5-1.5B (28 layers), sequences of {opts.prompt} + {opts.new} tokens, "
        "--num_envs "
        f"{opts.num_envs}; NOT measured on a GPU:"
    )
    for ckpt in (False, True):
        print(
            f"  --grad_ckpt {str(ckpt).lower():<5}: {per[ckpt]['body'] / 1024:.1f} KiB per token "
            "kept for backward "
            f"({per[ckpt]['layer'] / 1024:.1f} KiB per layer) + {per[ckpt]['head'] / 1024:.2f} KiB "
            "per response token"
            f" + {per[ckpt]['per_pass'] / 2**20:.0f} MiB per micro-batch (the experts' "
            "concatenated weights)"
            + (
                f" + one layer replayed in backward, {replay / 1024:.1f} KiB per token"
                if ckpt
                else ""
            )
        )
    print(
        f"  (the log-prob head unchunked and not checkpointed would keep "
        f"{sizes['logits_chunk_saved'] / pamoe.LOGIT_CHUNK / 2**20:.2f} MiB per response token)"
    )
    print(
        f"  fixed: weights {weights / GIB:.2f} GiB, trained parameters with gradients and AdamW "
        f"{trained / GIB:.2f} "
        f"GiB; a logits chunk's backward {chunk / GIB:.2f} GiB; rollout: KV cache {kv / GIB:.2f} "
        "GiB + prefill "
        f"{prefill / GIB:.2f} GiB"
    )
    print(
        "| GPU | largest --micro_batch, --grad_ckpt false | largest --micro_batch, --grad_ckpt "
        "true | rollout fits |"
    )
    print("|---|---|---|---|")
    for r in out["table"]:
        print(
            f"| {r['gpu_gb']} GB | {r['micro_batch grad_ckpt=False']} | "
            f"{r['micro_batch grad_ckpt=True']} | "
            f"{'yes' if r['rollout_fits'] else 'no'} |"
        )
    return out


# --------------------------------------------------------------------------------------------------
# Statistics over seeds, for every comparison the project reports (Agarwal et al. 2021, "Deep
# reinforcement learning at the edge of the statistical precipice": interval estimates, IQM,
# probability of improvement)
# --------------------------------------------------------------------------------------------------
RESAMPLES = 10_000


def mean(x):
    return np.mean(x, axis=-1)


def iqm(x):
    """Interquartile mean over the last axis: the mean of the middle half of the runs (a quarter cut
    at each end)."""
    x = np.sort(x, axis=-1)
    cut = int(0.25 * x.shape[-1])
    return x[..., cut : x.shape[-1] - cut].mean(-1)


def resample(x, seed):
    """RESAMPLES bootstrap resamples of the runs x (n,), drawn with replacement: (RESAMPLES, n)."""
    x = np.asarray(x, dtype=float)
    return x[np.random.default_rng(seed).integers(0, len(x), (RESAMPLES, len(x)))]


def interval(x, stat=mean, seed=0):
    """95% percentile-bootstrap interval of stat over the runs x."""
    return tuple(np.percentile(stat(resample(x, seed)), [2.5, 97.5]))


def difference(x, y, stat=mean):
    """stat(x) - stat(y) and its 95% bootstrap interval, the runs of the two arms resampled
    independently."""
    d = stat(resample(x, 1)) - stat(resample(y, 2))
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return float(stat(x) - stat(y)), tuple(np.percentile(d, [2.5, 97.5]))


def improvement(x, y):
    """P(X > Y), the probability that a run of arm x beats a run of arm y (the Mann-Whitney
    statistic, ties count half), and its 95% bootstrap interval."""

    def p(a, b):
        a, b = a[..., :, None], b[..., None, :]
        return ((a > b) + 0.5 * (a == b)).mean((-2, -1))

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return float(p(x, y)), tuple(np.percentile(p(resample(x, 1), resample(y, 2)), [2.5, 97.5]))


def verdict(x, y, names):
    """What the interval of mean(x) - mean(y) allows one to say."""
    d, (lo, hi) = difference(x, y)
    if lo > 0 or hi < 0:
        better = "better" if lo > 0 else "worse"
        return f"{names[0]} {better} than {names[1]} by {abs(d):.2f} [{lo:+.2f}, {hi:+.2f}]"
    return (
        f"{names[0]} and {names[1]} indistinguishable: difference {d:+.2f} [{lo:+.2f}, {hi:+.2f}]; "
        "the data rule "
        f"out {names[0]} better by more than {hi:.2f} or worse by more than {max(0.0, -lo):.2f}"
    )


def ci(x, stat=mean):
    """'m [lo, hi]' of runs x."""
    x = [v for v in x if v is not None and not np.isnan(v)]
    if not x:
        return "-"
    lo, hi = interval(x, stat)
    return f"{float(stat(np.asarray(x))):.2f} [{lo:.2f}, {hi:.2f}]"


# --------------------------------------------------------------------------------------------------
# The routing ablation: pamoe.py runs in subprocesses, then the tables
# --------------------------------------------------------------------------------------------------
def arm_table(K, r, custom=()):
    """The arms an ablation can run: the paper's granularity ablation, one LoRA of the experts'
    total size, and the --arm NAME=FLAGS ones (pamoe.py flags of that arm)."""
    table = {
        "dense": ["--routing", "dense"],
        f"dense r={K * r}": ["--routing", "dense", "--dense_rank", str(K * r)],
        "trajectory": ["--routing", "trajectory"],
        "token": ["--routing", "token"],
        "phase": ["--routing", "phase"],
    }
    for spec in custom:
        name, _, flags = spec.partition("=")
        table[name] = flags.split()
    return table


# set by the ablation itself
RESERVED = (
    "--routing",
    "--dense_rank",
    "--seed",
    "--iterations",
    "--out_dir",
    "--resume",
    "--model",
)


def finished(out_dir, args):
    """A run made with exactly these arguments and finished: all its metrics lines; else None."""
    try:
        with open(os.path.join(out_dir, "args.json")) as f:
            same = json.load(f) == args
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            lines = [json.loads(line) for line in f]
    except FileNotFoundError:
        return None
    done = same and lines and lines[-1]["iteration"] == pamoe.parse_args(args).iterations
    return lines if done and "eval/success" in lines[-1] else None


def save_base(a, folder):
    """The frozen `tiny` base of a seed, built and warmed up once and saved as a Hugging Face
    folder: every routing of that seed loads it (--model folder) instead of repeating the warm-up;
    pamoe.Agent seeds the experts alike."""
    names = "env seed tiny_steps tiny_prior max_steps history action_format alfworld_data"
    record = {k: getattr(a, k) for k in names.split()}
    record["code"] = [
        open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f)).read()
        for f in ("pamoe.py", "envs.py")
    ]
    path = os.path.join(folder, "base.json")
    if os.path.exists(path) and json.load(open(path)) == record:
        return
    pamoe.seed_everything(a.seed)
    model, tok = pamoe.load_model(a, torch.device("cpu"))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    with open(path, "w") as f:
        json.dump(record, f)


def run_ablation(opts, passthrough, command):
    # bad flags stop here, once
    base_args = pamoe.parse_args([*passthrough, "--iterations", str(opts.iterations)])
    K, r = base_args.num_experts, base_args.rank
    table = arm_table(K, r, opts.arm)
    arms = [spec.partition("=")[0] for spec in opts.arm]
    if opts.routings:
        names = list(dict.fromkeys(opts.routings.split(",") + arms))
    else:
        names = arms or list(arm_table(K, r))
    problems = []
    unknown = [n for n in names if n not in table]
    if unknown:
        problems.append(f"unknown --routings {unknown}; use {', '.join(table)} or --arm NAME=FLAGS")
    clash = [f for f in passthrough if f.split("=")[0] in RESERVED]
    if clash:
        problems.append(f"the ablation sets {', '.join(RESERVED)} itself (got {', '.join(clash)})")
    if problems:
        raise SystemExit(f"bench.py: error: {'; '.join(problems)}")
    seeds, t0 = [int(s) for s in opts.seeds.split(",")], time.time()
    model = {s: [] for s in seeds}
    if base_args.model == "tiny":  # one warmed-up base per seed, shared by the arms
        for s in seeds:
            folder = os.path.join(opts.out_dir, f"base-seed{s}")
            save_base(pamoe.parse_args([*passthrough, "--seed", str(s)]), folder)
            model[s] = ["--model", folder]
    jobs = []
    for s in seeds:
        for n in names:
            out = os.path.join(opts.out_dir, f"{n.replace(' ', '-').replace('=', '')}-seed{s}")
            run = ["--seed", str(s), "--iterations", str(opts.iterations), "--out_dir", out]
            jobs.append((n, s, out, [*passthrough, *table[n], *model[s], *run]))
    todo = [j for j in jobs if finished(j[2], j[3]) is None]
    workers = opts.jobs or max(1, min(len(todo), os.cpu_count() or 1))
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // workers)))
    print(
        f"ablation: {len(jobs)} runs ({len(jobs) - len(todo)} already done), {workers} at a time "
        f"-> {opts.out_dir} (bases {time.time() - t0:.0f} s)",
        flush=True,
    )
    run_jobs(todo, workers, env, t0)
    results = {(n, s): finished(out, args) for n, s, out, args in jobs}
    missing = [f"{n} seed {s}" for (n, s), lines in results.items() if lines is None]
    if missing:
        raise SystemExit(
            f"bench.py: error: ablation runs without results: {missing}; rerun the same command to "
            f"resume them (their logs: stdout.log in each run's folder)"
        )
    minutes = (time.time() - t0) / 60
    header = (
        f"Ablation, {time.strftime('%Y-%m-%d')}: `{command}` ({len(seeds)} seeds, "
        f"{minutes:.1f} min wall for the runs not already done)"
    )
    report = header + "\n\n" + ablation_tables(results, names, seeds, opts.reference)
    with open(os.path.join(opts.out_dir, "ablation.md"), "w") as f:
        f.write(report + "\n")
    print(report)
    shown = opts.figure_arms.split(",") if opts.figure_arms else names
    unknown = [n for n in shown if n not in names]
    if unknown:
        raise SystemExit(f"bench.py: error: --figure_arms {unknown} are not arms of this ablation")
    figure = "ablation.png" if shown == names else f"ablation-{'-'.join(shown)}.png"
    figure = os.path.join(opts.out_dir, figure.replace(" ", "_").replace("=", ""))
    if importlib.util.find_spec("matplotlib") is None:
        print("no figure: matplotlib is not installed (pip install -r requirements.txt)")
    else:
        draw_ablation(results, shown, seeds, opts.reference, command, figure)
        print(f"figure: {figure}")
    return results


def draw_ablation(results, names, seeds, reference, command, path):
    """The ablation's figure, from the same runs and statistics as its tables: (1) evaluation
    success over iterations, (2) the rare types' mean success, each the mean over seeds with the
    95% bootstrap interval of the mean at every evaluation (interval); (3) the reference minus each
    arm in area under the curve, rare types' area and final success, the tables' difference (the
    arms' runs resampled independently, not paired by seed). matplotlib (Agg) is imported here
    only: bench.py's other commands run without it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    for ax, what in zip(axes[:2], ("success", "rare")):
        for n in names:
            its, curves = eval_curves([results[(n, s)] for s in seeds], what)
            bands = np.array([interval(curves[:, j]) for j in range(len(its))])
            (line,) = ax.plot(its, curves.mean(0), label=n, lw=2 if n == reference else 1.3)
            ax.fill_between(its, bands[:, 0], bands[:, 1], color=line.get_color(), alpha=0.15)
        title = "evaluation success" if what == "success" else "rare types' success (mean)"
        ax.set(title=f"{title}, mean of {len(seeds)} seeds", xlabel="iteration", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    if reference in names and len(names) > 1:
        draw_differences(axes[2], results, names, seeds, reference)
    else:
        axes[2].axis("off")
    title = textwrap.fill(command, 170)
    fig.suptitle(f"{title}\nshaded and bars: 95% percentile-bootstrap intervals of the mean")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def eval_curves(runs, what):
    """The evaluated iterations and, per run (seed), the success (all task types) or the rare
    types' mean success at each: (evaluations,), (runs, evaluations)."""
    curves = []
    for lines in runs:
        evals = [m for m in lines if "eval/success" in m]
        if what == "success":
            curves.append([m["eval/success"] for m in evals])
        else:
            rare = [
                [m[f"eval/success/{t}"] for t in RARE if f"eval/success/{t}" in m] for m in evals
            ]
            curves.append([np.mean(r) for r in rare])
    return [m["iteration"] for m in evals], np.array(curves)


def draw_differences(ax, results, names, seeds, reference):
    """Panel 3: the reference minus each arm, difference of the means [95% interval] (difference),
    for three of the tables' columns, with the figures written beside each bar."""
    runs = {n: [run_summary(results[(n, s)]) for s in seeds] for n in names}
    others = [n for n in names if n != reference]
    keys = (("auc", "area under curve"), ("rare_auc", "rare types' area"), ("final", "final"))
    for j, (key, label) in enumerate(keys):
        for i, n in enumerate(others):
            d, (lo, hi) = difference([r[key] for r in runs[reference]], [r[key] for r in runs[n]])
            y = i * (len(keys) + 1) + j
            ax.errorbar(d, y, xerr=[[d - lo], [hi - d]], fmt="o", color=f"C{j}", capsize=3)
            ax.text(
                max(hi, 0) + 0.02, y, f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]", va="center", fontsize=8
            )
    ticks = [i * (len(keys) + 1) + 1 for i in range(len(others))]
    ax.set_yticks(ticks, [f"{reference} - {n}" for n in others])
    for j, (_, label) in enumerate(keys):
        ax.plot([], [], "o", color=f"C{j}", label=label)
    ax.axvline(0, color="k", lw=0.8)
    ax.invert_yaxis()
    ax.set(title=f"{reference} minus each arm (unpaired)", xlabel="difference of the means")
    ax.set_xlim(right=ax.get_xlim()[1] + 0.45)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8, frameon=False)
    ax.grid(alpha=0.3, axis="x")


def run_jobs(todo, workers, env, t0):
    """Run pamoe.py for each (name, seed, out_dir, args), `workers` at a time; a run interrupted
    earlier resumes from its checkpoint if its arguments are the same."""
    running = []
    while todo or running:
        while todo and len(running) < workers:
            name, seed, out, args = todo.pop(0)
            os.makedirs(out, exist_ok=True)
            ckpt, record = os.path.join(out, "checkpoint.pt"), os.path.join(out, "args.json")
            resumable = (
                os.path.exists(ckpt) and os.path.exists(record) and json.load(open(record)) == args
            )
            if not resumable:  # a run made with other arguments (or none yet) starts afresh
                for stale in ("checkpoint.pt", "metrics.jsonl", "eval.log"):
                    if os.path.exists(os.path.join(out, stale)):
                        os.remove(os.path.join(out, stale))
                with open(record, "w") as f:
                    json.dump(args, f)
            cmd = [
                sys.executable,
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "pamoe.py"),
                *args,
                *(["--resume", ckpt] if resumable else []),
            ]
            log = open(os.path.join(out, "stdout.log"), "a")
            running.append(
                (
                    name,
                    seed,
                    out,
                    subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                    log,
                )
            )
        time.sleep(1)
        for job in [j for j in running if j[3].poll() is not None]:
            running.remove(job)
            job[4].close()
            status = (
                "done"
                if job[3].returncode == 0
                else f"FAILED (exit {job[3].returncode}, see {job[2]}/stdout.log)"
            )
            print(
                f"  {job[0]} seed {job[1]}: {status} at {(time.time() - t0) / 60:.1f} min",
                flush=True,
            )


RARE = [t for t in envs.TASK_TYPES if t != "pick"]


def area(its, values):
    """The area under a curve of evaluations (trapezoids), divided by the iterations it spans: a
    mean over training."""
    its, values = np.asarray(its), np.asarray(values)
    return float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(its)) / (its[-1] - its[0]))


def mean_of(lines, prefix):
    """The mean of every metric named prefix<expert> over the lines; None where there is none."""
    found = [m[k] for m in lines for k in m if k.startswith(prefix) and not np.isnan(m[k])]
    return float(np.mean(found)) if found else None


def run_summary(lines):
    """One run's numbers: final evaluation (overall and per task type), the evaluation at the middle
    of the budget, the area under the evaluation curve (a mean success over training), that of the
    rare types' mean success, the routing statistics, and the mechanism diagnostics (pamoe.py
    --diagnostics) averaged over the evaluated training iterations."""
    evals = [m for m in lines if "eval/success" in m]
    its = [m["iteration"] for m in evals]
    final, mid = evals[-1], evals[int(np.argmin(np.abs(np.array(its) - its[-1] / 2)))]
    rare = [
        np.mean([m[f"eval/success/{t}"] for t in RARE if f"eval/success/{t}" in m]) for m in evals
    ]
    shares = [v for k, v in final.items() if k.startswith("eval/expert_share/")]
    out = {
        "final": final["eval/success"],
        "mid": mid["eval/success"],
        "mid_iteration": mid["iteration"],
        "auc": area(its, [m["eval/success"] for m in evals]),
        "rare_auc": area(its, rare),
        **{t: final.get(f"eval/success/{t}") for t in envs.TASK_TYPES},
        "switches": final["eval/switches"],
        "phase_nmi": final["eval/phase_nmi"],
        "experts_used": sum(v >= 0.05 for v in shares),
        "clipfrac": np.mean([m["clipfrac"] for m in lines if "clipfrac" in m]),
    }
    diag = [m for m in evals if any(k.startswith("occupancy/") for k in m)]
    # expert -> its occupancy by task type at each evaluated iteration it got steps in
    occ = defaultdict(list)
    for m in diag:
        for e in sorted({k.split("/")[1] for k in m if k.startswith("occupancy/")}):
            occ[e].append([m.get(f"occupancy/{e}/{t}", 0.0) for t in envs.TASK_TYPES])
    # each run's experts ordered from the most to the least pick-heavy (letters mean nothing
    # across runs)
    pick = envs.TASK_TYPES.index("pick")
    rows = sorted((np.mean(v, axis=0) for v in occ.values()), key=lambda row: -row[pick])
    out["occupancy"] = [dict(zip(envs.TASK_TYPES, map(float, row))) for row in rows]
    out["conflict"] = mean_of(diag, "conflict/")
    return out


def ablation_tables(results, names, seeds, reference="phase"):
    """Markdown: per arm, means over seeds with 95% bootstrap intervals (final, mid-budget, area
    under the curve), IQM, per task type; the reference arm against every other arm (difference of
    means, probability of improvement, a verdict); the mechanism diagnostics (occupancy,
    conflict)."""
    runs = {n: [run_summary(results[(n, s)]) for s in seeds] for n in names}
    mid_it = runs[names[0]][0]["mid_iteration"]
    types = " | ".join(envs.TASK_TYPES)
    out = [
        f"Success at the final evaluation, at iteration {mid_it} (mid-budget) and the area under "
        "the evaluation curve (mean success over training); mean over seeds [95% bootstrap "
        "interval]:",
        "",
        "| arm | final | final IQM | final sd | mid-budget | area under curve | rare types' area "
        f"| {types} | switches / episode | phase NMI | experts >= 5% | clip fraction |",
        "|" + "---|" * 15,
    ]
    for n in names:
        col = {key: [r[key] for r in runs[n]] for key in runs[n][0] if key != "occupancy"}
        per_type = []
        for t in envs.TASK_TYPES:
            seen = [x for x in col[t] if x is not None]
            per_type.append(f"{np.mean(seen):.2f}" if seen else "-")
        cells = [
            ci(col["final"]),
            ci(col["final"], iqm),
            f"{np.std(col['final'], ddof=1):.2f}",
            ci(col["mid"]),
            ci(col["auc"]),
            ci(col["rare_auc"]),
            *per_type,
            f"{np.mean(col['switches']):.1f}",
            f"{np.mean(col['phase_nmi']):.2f}",
            f"{np.mean(col['experts_used']):.1f}",
            f"{np.mean(col['clipfrac']):.2f}",
        ]
        out.append(f"| {n} | " + " | ".join(cells) + " |")
    if reference in names:
        out += comparison_tables(runs, names, reference)
    if any(r["occupancy"] for n in names for r in runs[n]):  # the runs had --diagnostics
        out += diagnostics_table(runs, names)
    return "\n".join(out)


def diagnostics_table(runs, names):
    """Markdown: each arm's experts' occupancy by task type and the conflict, mean over seeds."""
    types = " | ".join(envs.TASK_TYPES)
    out = [
        "",
        "Mechanism diagnostics over the evaluated iterations (mean over seeds): each task type's "
        "share of an expert's policy-gradient norm (occupancy; a run's experts ordered from the "
        "most to the least pick-heavy, experts that got no step left out) and the mean cosine "
        "between the task types' gradients (conflict):",
        "",
        f"| arm | expert | {types} | runs | conflict |",
        "|" + "---|" * (4 + len(envs.TASK_TYPES)),
    ]
    for n in names:
        conflict = ci([r["conflict"] for r in runs[n]])
        for rank in range(max(len(r["occupancy"]) for r in runs[n])):
            have = [r["occupancy"][rank] for r in runs[n] if len(r["occupancy"]) > rank]
            shares = " | ".join(f"{np.mean([h[t] for h in have]):.2f}" for t in envs.TASK_TYPES)
            first = rank == 0
            out.append(
                f"| {n if first else ''} | {rank + 1} | {shares} | {len(have)} | "
                f"{conflict if first else ''} |"
            )
    return out


def comparison_tables(runs, names, reference):
    """The reference arm against every other arm: differences of the means with their intervals,
    the probability of improvement, and what the intervals allow one to say."""
    ref = runs[reference]
    out = [
        "",
        f"{reference} against each arm: difference of the means [95% interval], probability that "
        f"a {reference} run beats a run of the arm, P({reference} > arm) [95% interval]:",
        "",
        f"| arm | final | mid-budget | area under curve | rare types' area | P({reference} > arm), "
        "area |",
        "|---|---|---|---|---|---|",
    ]
    verdicts = []
    for n in names:
        if n == reference:
            continue
        cells = []
        for key in ("final", "mid", "auc", "rare_auc"):
            d, (lo, hi) = difference([r[key] for r in ref], [r[key] for r in runs[n]])
            cells.append(f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]")
        p, (lo, hi) = improvement([r["auc"] for r in ref], [r["auc"] for r in runs[n]])
        out.append(f"| {n} | " + " | ".join(cells) + f" | {p:.2f} [{lo:.2f}, {hi:.2f}] |")
        what_of = {"auc": "area under the curve", "rare_auc": "rare types' area", "final": "final"}
        for key, what in what_of.items():
            said = verdict([r[key] for r in ref], [r[key] for r in runs[n]], (reference, n))
            verdicts.append(f"Verdict ({what}): {said}")
    return out + [""] + verdicts


def probe(opts, passthrough):
    """Linear probes on the phase router's input: how well the hidden phase and the task type of a
    step can be read off its frozen features, [observation ; previous action] alone and with the
    goal's mean token state. Steps of
    --rollouts toy rollouts (32 episodes each) of the demo's agent (untrained, or --checkpoint's
    experts and router; other flags go to pamoe.py's Args); a multinomial logistic regression fitted
    on 70% of the steps, scored on the rest."""
    agent = pamoe.Agent(
        pamoe.parse_args(["--seed", str(opts.seed), *passthrough]), torch.device("cpu")
    )
    if opts.checkpoint:
        agent.load_state_dict(
            torch.load(opts.checkpoint, map_location="cpu", weights_only=False)["trainable"],
            strict=False,
        )
    env_batch = envs.make_env_batch("toy", 32, agent.args.max_steps, "train", None)
    feats, labels = {"obs": [], "obs+goal": []}, {"phase": [], "task": []}
    with torch.no_grad(), contextlib.closing(env_batch):
        for r in range(opts.rollouts):
            S = pamoe.rollout(
                agent,
                env_batch,
                [10**6 + 32 * r + n for n in range(32)],
                agent.args.tau_start,
                agent.args.temperature,
                greedy_router=False,
            )
            goal = pamoe.mean_pool(S.goal_states, S.goal_mask)  # (lanes, d)
            # (steps, 2d) the step's own features
            rows = S.features[torch.tensor([w[-1] for w in S.window])]
            feats["obs"].append(rows)
            feats["obs+goal"].append(torch.cat([rows, goal[torch.tensor(S.lane)]], -1))
            labels["phase"] += S.phase
            labels["task"] += S.task_type
    feats = {name: torch.cat(x) for name, x in feats.items()}  # (steps, 2d) and (steps, 3d)
    result = {}
    for target, y_names in labels.items():
        classes = sorted(set(y_names))
        y = torch.tensor([classes.index(v) for v in y_names])
        split = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        train, test = split[: int(0.7 * len(y))], split[int(0.7 * len(y)) :]
        for name, x in feats.items():
            x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-5)
            w = torch.zeros(x.shape[1], len(classes), requires_grad=True)
            b = torch.zeros(len(classes), requires_grad=True)
            opt = torch.optim.Adam([w, b], lr=1e-2)
            for _ in range(500):
                opt.zero_grad()
                (F.cross_entropy(x[train] @ w + b, y[train]) + 1e-3 * w.pow(2).sum()).backward()
                opt.step()
            pred, yt = (x[test] @ w + b).argmax(-1), y[test]
            recall = [
                float((pred[yt == c] == c).float().mean())
                for c in range(len(classes))
                if (yt == c).any()
            ]
            result[f"{target} <- {name}"] = dict(
                accuracy=float((pred == yt).float().mean()),
                majority=max(float((yt == c).float().mean()) for c in yt.unique()),
                balanced=float(np.mean(recall)),
                chance=1 / len(classes),
            )
    print(
        f"linear probes on {len(labels['phase'])} steps ({opts.checkpoint or 'untrained agent'}), "
        "held-out 30%:"
    )
    for k, v in result.items():
        print(
            f"  {k:<17} accuracy {v['accuracy']:.2f} (majority class {v['majority']:.2f}), "
            "balanced accuracy "
            f"{v['balanced']:.2f} (chance {v['chance']:.2f})"
        )
    return result


def preflight(argv):
    """The model and sizes of a pamoe.py command line (argv, its flags), before a run: one rollout
    step and one PPO micro-batch at the largest sizes the flags allow (prompts of
    --max_prompt_tokens random tokens, --max_new_tokens new ones); prints peak memory (CUDA:
    allocated tensors; CPU: the process's peak resident set), prefill and decode times, and the
    time of one iteration, typical and at most. Trains nothing and needs no ALFWorld games."""
    a = pamoe.parse_args(argv, games=False)
    dev, cuda = torch.device(a.device), a.device == "cuda"
    pamoe.seed_everything(a.seed)
    agent = pamoe.Agent(a, dev)
    opt = torch.optim.AdamW(agent.param_groups(), weight_decay=a.weight_decay)
    P, M, N, n = a.max_prompt_tokens, a.max_new_tokens, a.num_envs, a.micro_batch or a.minibatch
    ids = torch.randint(
        agent.lm.config.vocab_size, (max(N, n), P + M), generator=torch.Generator().manual_seed(0)
    )
    ids, k = ids.to(dev), torch.arange(max(N, n), device=dev) % a.experts[0]  # the experts in turn

    def generate():
        mark = analysis.DecodeMark(agent.clock)
        start = agent.clock.now()
        with torch.no_grad(), agent.routing(pamoe.step_gates_for(agent, slice(N), k)):
            agent.lm.generate(
                ids[:N, :P],
                attention_mask=torch.ones_like(ids[:N, :P]),
                do_sample=True,
                top_k=0,
                max_new_tokens=M,
                min_new_tokens=M,
                pad_token_id=agent.tok.pad_token_id,
                logits_processor=[mark],
            )
        agent.clock.generation(start, mark)

    def ppo_micro_batch():
        # backward inside (--grad_ckpt)
        with agent.routing(pamoe.step_gates_for(agent, slice(n), k)) as routing:
            logp, ent, mask = agent.response_logprobs(
                list(ids[:n]), [P] * n, [M] * n, a.temperature, routing.gates
            )
            (-(logp + ent).sum() / mask.sum()).backward()
        opt.step()  # allocates AdamW's state

    cost = []  # (seconds, peak GiB) of each
    for fn in (generate, ppo_micro_batch):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.time()
        try:
            fn()
        except torch.cuda.OutOfMemoryError as e:
            raise SystemExit(
                f"bench.py preflight: out of memory in {fn.__name__}; lower --micro_batch or "
                f"--num_envs, add --grad_ckpt true, or lower --max_prompt_tokens"
            ) from e
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        cost.append((time.time() - t, peak / 2**30))
    (t_gen, m_gen), (t_ppo, m_ppo) = cost
    spent = agent.clock.read()
    prefill, decode_ms = (
        spent["prefill_s"],
        1000 * spent["decode_s"] / max(spent["decode_steps"], 1),
    )
    # the PPO passes over every step of an iteration: the epochs and prepare_batch's passes
    ppo_s = (a.epochs + 1) * N * a.max_steps / n * t_ppo
    typical_prompt, typical_new = min(1500, P), min(256, M)
    typical = a.max_steps * (prefill * typical_prompt / P + typical_new * decode_ms / 1000) + ppo_s
    worst = a.max_steps * (prefill + M * decode_ms / 1000) + ppo_s
    gpu = "CPU"
    if cuda:
        gpu = f"{torch.cuda.get_device_name()}, {torch.cuda.mem_get_info()[1] / 2**30:.0f} GiB"
    lines = [
        f"preflight on {gpu}: {a.model}, {agent.lm.dtype}, --micro_batch {n}, --grad_ckpt "
        f"{a.grad_ckpt}, --compile_decode {a.compile_decode}",
        f"rollout step, {N} prompts of {P} tokens + {M} new: peak memory {m_gen:.1f} GiB, prefill "
        f"{prefill:.2f} s, {decode_ms:.1f} ms per decode step "
        f"({N * 1000 / decode_ms:.0f} tokens/s)",
        f"PPO micro-batch, {n} sequences of {P + M} tokens, forward + backward: peak memory "
        f"{m_ppo:.1f} GiB, {t_ppo:.1f} s, {t_ppo / (n * (P + M)) * 1e3:.3f} ms per token",
        f"one iteration ({N} x {a.max_steps} steps): typical {typical / 60:.1f} min (prompts of "
        f"{typical_prompt} tokens prefilled linearly, {typical_new} decode steps), at most "
        f"{worst / 60:.1f} min (every prompt and response at its limit); {a.iterations} "
        f"iterations {typical * a.iterations / 3600:.1f} h to {worst * a.iterations / 3600:.1f} h",
    ]
    print("\n".join(lines), flush=True)
    return {
        "peak_gib": max(m_gen, m_ppo),
        "prefill_s": prefill,
        "decode_ms_per_step": decode_ms,
        "iteration_s": worst,
        "iteration_s_typical": typical,
    }


def gpu_rollout(opts):
    """One prepared script for a lent GPU (nothing can be installed there; run it with the Python
    it has): a model of --size's shape (qwen2.5-1.5b: Qwen2.5-1.5B's real config, random bf16
    weights; small: a 2-layer one, for the CPU test) with a byte-level tokenizer, --batch prompts of
    --prompt tokens, --new new tokens through pamoe.generate. Prefill seconds and decode ms per
    step, eager and --compile_decode (a static KV cache; compiled on CUDA), the frozen base alone
    and with K routed experts; whether the compiled path samples the eager path's tokens with the
    same log-probs (one seed); one PPO micro-batch; peak memory; the preset's iteration estimated
    from them. Writes gpu-rollout.json."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    t0 = time.time()
    tok = byte_tokenizer()
    model = build(opts.size, device, dtype)
    model.config.eos_token_id = tok.eos_token_id
    flags = (
        f"--model random --num_envs {opts.batch} --max_prompt_tokens {max(opts.prompt + 8, 64)} "
        f"--max_new_tokens {opts.new} --num_experts {opts.experts} --rank {opts.rank} "
        f"--micro_batch 8 --grad_ckpt true --device {device.type}"
    ).split()
    args = pamoe.parse_args(flags, games=False)
    base = pamoe.freeze_base(model, tok, "random", device, dtype)
    agent = pamoe.Agent(args, device, base=base)
    rng = np.random.default_rng(0)
    letters = "abcdefghijklmnopqrstuvwxyz "
    prompts = ["".join(rng.choice(list(letters), opts.prompt)) for _ in range(opts.batch)]
    k = torch.arange(opts.batch, device=device) % opts.experts  # the experts in turn
    gates = pamoe.step_gates_for(agent, slice(None), k)
    generate, scores = agent.lm.generate, []

    def generate_with_scores(**kw):  # the sampler's log-probs, for the eager/compiled comparison
        out = generate(**kw, output_scores=True, return_dict_in_generate=True)
        scores.append(torch.stack(out.scores, 1).float().log_softmax(-1))
        return out.sequences

    agent.lm.generate = generate_with_scores
    rows, samples = [], {}
    for compiled in (False, True):
        agent.args.compile_decode = compiled
        for experts in (False, True):
            reset_compile()
            args.max_new_tokens = 8  # a short warm-up call (compiles the decode step)
            pamoe.generate(agent, prompts, gates, 1.0, opts.batch, experts_on=experts)
            args.max_new_tokens = opts.new
            warm = compile_counters()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            agent.clock.read()
            torch.manual_seed(0)
            out, _ = pamoe.generate(agent, prompts, gates, 1.0, opts.batch, experts_on=experts)
            spent = agent.clock.read()
            samples[compiled, experts] = (out, scores[-1])
            after = compile_counters()
            rows.append(
                dict(
                    compiled=compiled and cuda,  # the CPU runs the static cache, uncompiled
                    static_cache=compiled,
                    experts=experts,
                    prefill_s=spent["prefill_s"],
                    decode_ms_per_step=1000 * spent["decode_s"] / max(spent["decode_steps"], 1),
                    peak_gib=(torch.cuda.max_memory_allocated() if cuda else 0) / 2**30,
                    graphs=after["graphs"],  # captured since the reset, warm-up included
                    new_graphs=after["graphs"] - warm["graphs"],  # by the timed call
                    graph_breaks=after["graph_breaks"],
                    cudagraph_skips=after["cudagraph_skips"],
                )
            )
    agreement = compare_samples(samples[False, True], samples[True, True])
    ppo_s = ppo_micro_batch_seconds(agent, opts, device)
    best = min(rows[1]["decode_ms_per_step"], rows[3]["decode_ms_per_step"])
    prefill = (
        rows[3]["prefill_s"] if rows[3]["decode_ms_per_step"] == best else rows[1]["prefill_s"]
    )
    estimate = preset_estimate(prefill, best, ppo_s, opts)
    report = {
        "device": torch.cuda.get_device_name() if cuda else "CPU",
        "torch": torch.__version__,
        "size": opts.size,
        "batch": opts.batch,
        "prompt": opts.prompt,
        "new": opts.new,
        "rows": rows,
        "agreement": agreement,
        "ppo_micro_batch_s": ppo_s,
        "estimate": estimate,
        "seconds": time.time() - t0,
    }
    for r in rows:
        path = "eager"
        if r["static_cache"]:
            path = "static + compiled" if r["compiled"] else "static (no compile on the CPU)"
        graph = ""
        if r["compiled"]:  # did the captured path hold on this device?
            graph = (
                f"; {r['graphs']} graph(s), {r['new_graphs']} new in the timed call, "
                f"{r['graph_breaks']} graph breaks, {r['cudagraph_skips']} CUDA-graph skips"
            )
        print(
            f"{path:<30} {'4 routed experts' if r['experts'] else 'frozen base':<16} prefill "
            f"{r['prefill_s']:.3f} s, decode {r['decode_ms_per_step']:.2f} ms/step, peak "
            f"{r['peak_gib']:.1f} GiB{graph}"
        )
    print(
        f"compiled vs eager (experts, one seed): tokens identical {agreement['tokens_equal']:.3f},"
        f" largest log-prob difference {agreement['max_logp_diff']:.2e}; PPO micro-batch "
        f"{ppo_s:.2f} s; preset iteration ~{estimate['iteration_min']:.1f} min, 150 iterations "
        f"~{estimate['run_h']:.1f} h ({report['seconds']:.0f} s in all)"
    )
    with open(opts.out, "w") as f:
        json.dump(report, f, indent=1)
    return report


def reset_compile():
    """Forget every compiled graph and every count of compile_counters (torch._dynamo.reset alone
    keeps the counts)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


def compile_counters():
    """What torch.compile has done since reset_compile() (torch._dynamo.utils.counters): graph
    breaks and unimplemented features (each a reason counted), graphs captured, and the graphs CUDA
    graphs skipped (inductor's cudagraph_skips)."""
    from torch._dynamo.utils import counters

    return {
        "graph_breaks": sum(counters["graph_break"].values()),
        "unimplemented": sum(counters["unimplemented"].values()),
        "graphs": counters["stats"]["unique_graphs"],
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
    }


def compare_samples(eager, compiled):
    """The share of response tokens two runs sampled alike, and the largest difference of the
    sampler's log-probs at the eager run's tokens over the steps before the first difference."""
    (eager_out, eager_scores), (compiled_out, compiled_scores) = eager, compiled
    same, total, diff = 0, 0, 0.0
    for i, ((_, r1, _), (_, r2, _)) in enumerate(zip(eager_out, compiled_out)):
        n = min(len(r1), len(r2))
        equal = (r1[:n] == r2[:n]).long()
        upto = int(equal.cumprod(0).sum())  # steps before the first difference
        same += int(equal.sum())
        total += n
        if upto:
            picked = r1[:upto].to(eager_scores.device)
            a = eager_scores[i, torch.arange(upto), picked]
            b = compiled_scores[i, torch.arange(upto), picked]
            diff = max(diff, float((a - b).abs().max()))
    return {"tokens_equal": same / max(total, 1), "max_logp_diff": diff}


def ppo_micro_batch_seconds(agent, opts, device):
    """Forward + backward of one PPO micro-batch of 8 sequences of prompt + new tokens."""
    n, P, M = 8, opts.prompt, opts.new
    ids = torch.randint(agent.lm.config.vocab_size, (n, P + M), generator=torch.Generator())
    ids = ids.to(device)
    k = torch.arange(n, device=device) % opts.experts
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.time()
    with agent.routing(pamoe.step_gates_for(agent, slice(None), k)) as routing:
        logp, ent, mask = agent.response_logprobs(list(ids), [P] * n, [M] * n, 1.0, routing.gates)
        (-(logp + ent).sum() / mask.sum()).backward()
    sync()
    return time.time() - t


def preset_estimate(prefill_s, decode_ms, ppo_s, opts, steps=50, iterations=150):
    """The CUDA preset's time per iteration, stated assumptions: every episode takes `steps`
    steps, each a prefill of the batch's prompts (measured) plus opts.new decode steps (measured
    ms), and PPO passes over the steps of all 32 episodes in micro-batches of 8, twice (the old
    and reference log-probs, then forward + backward; measured: one micro-batch)."""
    rollout = steps * (prefill_s + opts.new * decode_ms / 1000)
    update = 2 * opts.batch * steps / 8 * ppo_s
    minutes = (rollout + update) / 60
    return {"iteration_min": minutes, "run_h": minutes * iterations / 60, "steps": steps}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    commands = ("bench", "ablation", "memory", "probe", "preflight", "gpu-rollout")
    what = argv[0] if argv[:1] and argv[0] in commands else "bench"
    rest = argv[1:] if argv[:1] == [what] else argv
    if what == "preflight":
        return preflight(rest)
    parser = argparse.ArgumentParser(
        prog=f"bench.py {what}",
        allow_abbrev=False,
        description={
            "bench": "PA-MoE cost benchmark",
            "memory": "PA-MoE's memory model on Qwen2.5-1.5B's shape (CPU) -> GPU table",
            "ablation": "PA-MoE routing ablation; flags not listed here go to every pamoe.py run",
            "probe": (
                "linear probes: hidden phase and task type from the phase router's input "
                "features; flags not listed here go to pamoe.py (the checkpoint run's model flags)"
            ),
            "gpu-rollout": "decode and prefill time, eager and compiled, on a lent GPU",
        }[what],
    )
    if what == "gpu-rollout":
        parser.add_argument("--size", default="qwen2.5-1.5b", help="qwen2.5-1.5b | small (CPU)")
        parser.add_argument("--batch", type=int, default=32, help="prompts at once (--num_envs)")
        parser.add_argument("--prompt", type=int, default=1500, help="tokens per prompt")
        parser.add_argument("--new", type=int, default=256, help="new tokens per response")
        parser.add_argument("--experts", type=int, default=4, help="K routed experts")
        parser.add_argument("--rank", type=int, default=32, help="r")
        parser.add_argument("--out", default="gpu-rollout.json", help="where the report goes")
        return gpu_rollout(parser.parse_args(rest))
    if what == "probe":
        parser.add_argument(
            "--checkpoint", default="", help="a demo run's checkpoint.pt (default: untrained)"
        )
        parser.add_argument(
            "--seed", type=int, default=1, help="--seed of the agent (as the checkpoint's run)"
        )
        parser.add_argument("--rollouts", type=int, default=4, help="rollouts of 32 toy episodes")
        return probe(*parser.parse_known_args(rest))
    if what == "memory":
        parser.add_argument(
            "--layers", default="2,4", help="decoder layer counts measured (the fit is per layer)"
        )
        parser.add_argument(
            "--lengths", default="512,1024", help="sequence lengths measured (linearity check)"
        )
        parser.add_argument(
            "--response", type=int, default=256, help="response tokens of each measured sequence"
        )
        parser.add_argument(
            "--prompt", type=int, default=2048, help="derived table: --max_prompt_tokens"
        )
        parser.add_argument(
            "--new", type=int, default=512, help="derived table: response tokens (--max_new_tokens)"
        )
        parser.add_argument(
            "--num_envs", type=int, default=32, help="derived table: sequences generated at once"
        )
        parser.add_argument("--experts", type=int, default=4, help="K")
        parser.add_argument("--rank", type=int, default=32, help="r")
        parser.add_argument(
            "--out", default="memory.json", help="where the measurements and the table go"
        )
        return memory(parser.parse_args(rest))
    if what == "bench":
        parser.add_argument(
            "--sizes",
            default="",
            help="comma list of tiny, mid, qwen2.5-1.5b (default: all; qwen2.5-1.5b needs CUDA)",
        )
        parser.add_argument("--experts", type=int, default=4, help="K")
        parser.add_argument(
            "--rank", type=int, default=32, help="r of each expert and of the single LoRA"
        )
        parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
        parser.add_argument("--repeats", type=int, default=5, help="timed calls (median reported)")
        parser.add_argument(
            "--gen_tokens", type=int, default=32, help="sampled tokens per sequence"
        )
        parser.add_argument("--out", default="bench.json", help="where the rows go")
        opts = parser.parse_args(rest)
        if min(opts.repeats, opts.experts, opts.rank, opts.gen_tokens) < 1 or opts.warmup < 0:
            parser.error(
                "--repeats, --experts, --rank and --gen_tokens must be >= 1, --warmup >= 0"
            )
        return bench(opts)
    parser.add_argument(
        "--routings",
        default="",
        help="comma list of dense, 'dense r=<K*r>', trajectory, token, phase, run beside the "
        "--arm ones (default: all, or the --arm ones alone)",
    )
    parser.add_argument(
        "--arm",
        action="append",
        default=[],
        help="an arm of its own, NAME=FLAGS (pamoe.py flags, e.g. 'grpo=--advantage grpo'); repeat",
    )
    parser.add_argument(
        "--reference", default="phase", help="the arm every other is compared with (default: phase)"
    )
    parser.add_argument("--seeds", default="1,2,3,4,5,6,7,8", help="comma list of seeds")
    parser.add_argument(
        "--iterations", type=int, default=40, help="iterations per run (the demo runs 60)"
    )
    parser.add_argument("--jobs", type=int, default=0, help="runs at once (0 = one per CPU core)")
    parser.add_argument(
        "--out_dir", default="runs/ablation", help="one folder per run + ablation.md, ablation.png"
    )
    parser.add_argument(
        "--figure_arms",
        default="",
        help="comma list: the arms the figure shows (default all; ablation-<arms>.png)",
    )
    opts, passthrough = parser.parse_known_args(rest)
    return run_ablation(opts, passthrough, " ".join(["python bench.py", *argv]))


if __name__ == "__main__":
    main()
