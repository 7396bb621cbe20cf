"""PA-MoE: Phase-Aware Mixture of Experts for agentic RL, in one file (arXiv 2602.17038).

A frozen causal LM carries K LoRA experts. A lightweight phase router picks ONE expert per environment step from
frozen-base features of the observation, the goal and the last few steps; every token of that step's response comes
from that expert, and PPO with a turn-level critic trains experts, router and critic together. A soft temporal-
consistency penalty keeps the router from switching without reason, so that experts can specialise on behavioural
phases (find, take, transform, carry, place) instead of on the frequent, easy tasks.

Run:
    bash run.sh                          # CPU: toy env + `tiny` (3-4 min on 2 cores); CUDA: ALFWorld + Qwen2.5-1.5B
    python pamoe.py --routing token      # ablations: phase (default) | token | trajectory | dense
    python pamoe.py --resume runs/pamoe/checkpoint.pt --eval_only --show 2   # or --export DIR (PEFT adapters)
    torchrun --nproc_per_node 8 pamoe.py ...                                   # data parallel
    python pamoe.py --help               # every flag

Departures from the paper, one line each (FINDINGS.md has the evidence):
- PPO with a turn-level critic and GAE (the brief), not GiGPO; the critic has its own copy of the router's encoder.
- The router learns straight-through (gates = onehot + p - stopgrad(p)); the paper does not say how.
- Behaviour information: the router also maximises lambda_i I(k; verb of the previous action) (not in the paper).
- Load balance: Switch Transformer's K sum_k f_k P_k, lambda_b 0.01 (paper: sum_k (P_k - 1/K)^2; --balance sq).
- Router input [observation ; goal context ; LSTM state]; the LSTM reads [observation ; previous action] features.
- Token routing (LoRA-MoE baseline) trains its per-layer routers through the gate value; no diversity term.
- ALFWorld: one alfworld 0.4.2 worker process per environment; 32 environments on one GPU; HF generate, not vLLM.
- CPU demo only: action numbers as answers; `tiny` warmed up on noisy-solver episodes (a weak prior); router and
  critic LSTM 64 x 1 (paper 256 x 3); lr 1e-3, clip 0.3, entropy 0.01, linearly annealed learning rates.
"""
import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm
from transformers import GenerationConfig

import envs


def arg(default, help):
    return field(default=default, metadata={"help": help})


def need(ok, msg):
    """A bad input stops the run at once with one line that names the flag, the value and the fix."""
    if not ok:
        raise SystemExit(f"pamoe.py: error: {msg}")


@dataclass
class Args:
    # run
    env: str = arg("toy", "environment: toy | alfworld")
    alfworld_data: str = arg("", "alfworld: games folder (default $ALFWORLD_DATA): official, or envs.py's mini set")
    eval_split: str = arg("eval_in_distribution", "alfworld: eval_in_distribution (seen) | eval_out_of_distribution")
    model: str = arg("tiny", "`tiny` (built from a config, no download) or a Hugging Face name / local path")
    device: str = arg("auto", "auto | cpu | cuda")
    dtype: str = arg("auto", "weights of the frozen base: auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16")
    seed: int = arg(1, "seeds the model build, the env episodes and every sampler")
    out_dir: str = arg("runs/pamoe", "where metrics.jsonl, eval.log, checkpoint.pt (and eval.json) go")
    resume: str = arg("", "a checkpoint: continue it to --iterations, or use it with --eval_only / --export")
    eval_only: bool = arg(False, "evaluate --resume into <out_dir>/eval.json, train nothing (other flags: trained)")
    show: int = arg(0, "with --eval_only: print this many whole evaluation episodes, step by step")
    export: str = arg("", "write --resume's experts as PEFT LoRA adapters (and its router) to this folder")
    iterations: int = arg(60, "training iterations (one rollout + one PPO update each)")
    num_envs: int = arg(32, "environments stepped in lockstep per iteration (one episode each)")
    max_steps: int = arg(15, "step limit per episode (truncation, bootstrapped; paper, ALFWorld: 50)")
    history: int = arg(0, "past observation/action pairs shown in the prompt (paper: 2; the toy needs none)")
    max_prompt_tokens: int = arg(2048, "prompt limit: the oldest history is dropped to fit, then the left is cut")
    action_format: str = arg("label", "label (number of an admissible action) | tagged (<think>/<action>)")
    max_new_tokens: int = arg(1, "response length limit per step (512 for the tagged format)")
    tiny_steps: int = arg(400, "`tiny` only: supervised warm-up steps of the base before it is frozen")
    tiny_prior: float = arg(0.15, "`tiny`: the toy solver's share of the warm-up's answers (0, and on ALFWorld: none)")
    temperature: float = arg(1.0, "rollout sampling temperature (also the temperature of PPO log-probs)")
    eval_temperature: float = arg(0.4, "evaluation sampling temperature")
    eval_every: int = arg(10, "evaluate every N iterations, before the first and after the last; 0 = never")
    eval_episodes: int = arg(128, "evaluation episodes, on a fixed set of seeds")
    ckpt_every: int = arg(10, "checkpoint every N iterations (and after the last)")
    # experts
    routing: str = arg("phase", "phase | token | trajectory | dense (the paper's granularity ablation)")
    num_experts: int = arg(4, "K: LoRA experts")
    rank: int = arg(32, "r: LoRA rank of each expert")
    alpha: float = arg(64.0, "LoRA alpha; the update is scaled by alpha / r")
    dense_rank: int = arg(0, "rank of the single expert with --routing dense (0 = --rank; K*rank matches size)")
    targets: str = arg("q_proj,k_proj,v_proj,o_proj", "comma-separated names of the linear layers given experts")
    # router
    router_window: int = arg(5, "L: past steps read by the router's recurrent encoder")
    router_hidden: int = arg(64, "LSTM units of the router and critic encoders (paper: 256)")
    router_layers: int = arg(1, "LSTM layers of the router and critic encoders (paper: 3)")
    tau_start: float = arg(2.0, "router softmax temperature at the start")
    tau_end: float = arg(0.5, "router softmax temperature after --tau_steps router updates")
    tau_steps: int = arg(3000, "router updates over which tau is annealed linearly")
    switch_coef: float = arg(0.05, "lambda_s: temporal-consistency (soft switch) penalty")
    balance: str = arg("switch", "load balance loss: switch (Switch Transformer) | sq (paper)")
    balance_coef: float = arg(0.01, "lambda_b: weight of the balance loss (switch: the usual 1e-2; paper's sq: 1e-3)")
    info_coef: float = arg(10.0, "lambda_i: weight of I(expert; previous action's verb), maximised (0: paper)")
    # PPO
    gamma: float = arg(0.95, "discount per environment step")
    gae_lambda: float = arg(0.95, "GAE lambda")
    clip: float = arg(0.3, "PPO clip range (paper pipeline: 0.2)")
    kl_coef: float = arg(0.01, "KL to the reference policy (experts off), k3 estimator")
    ent_coef: float = arg(0.01, "entropy bonus (paper pipeline: 0.001)")
    vf_coef: float = arg(0.5, "value loss weight")
    epochs: int = arg(1, "PPO epochs over each rollout")
    minibatch: int = arg(32, "environment steps per minibatch, at most (the rollout is cut into equal minibatches)")
    micro_batch: int = arg(0, "steps per forward/backward in a minibatch (gradient accumulation); 0 = the minibatch")
    grad_ckpt: bool = arg(False, "activation checkpointing of the base's decoder layers: less memory, one more forward")
    max_grad_norm: float = arg(1.0, "gradient clip, per parameter group")
    lr_experts: float = arg(1e-3, "learning rate of the LoRA experts (paper, 1.5B: 1e-6)")
    lr_router: float = arg(1e-4, "learning rate of the router (paper: 1e-4)")
    lr_critic: float = arg(1e-3, "learning rate of the critic")
    anneal_lr: bool = arg(True, "learning rates decay linearly to 0 over --iterations (cleanrl; paper: constant)")
    weight_decay: float = arg(0.01, "AdamW weight decay")

    def validate(self, games=True):
        """Every flag by its meaning, before any model loads. games=False: a run that plays no game (bench.py
        preflight) needs no ALFWorld data, unless `tiny` warms up on its episodes."""
        for name, valid in CHOICES.items():
            need(getattr(self, name) in valid, f"unknown --{name} {getattr(self, name)!r}; use {' | '.join(valid)}")
        for name, interval in RANGES.items():
            need(within(getattr(self, name), interval),
                 f"--{name} {getattr(self, name)} is out of range; use a value in {interval}")
        if self.env == "alfworld":
            need(importlib.util.find_spec("alfworld") is not None,
                 "--env alfworld needs the alfworld package: pip install alfworld==0.4.2 (bash run.sh installs it)")
            self.alfworld_data = self.alfworld_data or os.environ.get("ALFWORLD_DATA", "")
            error = envs.alfworld_data_error(self.alfworld_data, ("train", self.eval_split))
            need(error is None or not (games or self.model == "tiny"),
                 f"--alfworld_data {self.alfworld_data!r}: {error}")
        # combinations that cannot work, sizes that exhaust memory, paths that cannot be read or written
        n = max(self.num_envs, self.eval_episodes)  # episodes of one rollout: all their steps stay in memory
        need(n * self.max_steps <= 100_000, f"--num_envs/--eval_episodes {n} x --max_steps {self.max_steps} steps per "
             f"rollout would exhaust memory; keep the product <= 100000")
        need(self.eval_episodes or not self.eval_every, f"--eval_episodes 0 with --eval_every {self.eval_every} "
             f"evaluates nothing; set --eval_episodes >= 1 or --eval_every 0")
        world = rank_world()[1]  # torchrun's processes share the environments and the evaluation episodes
        need(min(self.num_envs, self.eval_episodes if self.eval_every else world) >= world, f"--num_envs "
             f"{self.num_envs} and --eval_episodes {self.eval_episodes}: too few for {world} processes; use >= {world}")
        need(self.action_format == "label" or self.max_new_tokens >= 16, f"--max_new_tokens {self.max_new_tokens} "
             f"cannot hold a tagged answer (<think></think><action>1</action>: ~15 tokens); use >= 16 (paper: 512)")
        need(all(t.isidentifier() for t in self.targets.split(",")),
             f"--targets {self.targets!r}: give module names separated by commas only, e.g. q_proj,v_proj")
        need(not (self.model.startswith(("/", ".")) or os.path.exists(self.model)) or os.path.isdir(self.model),
             f"--model {self.model}: no such folder; give a model folder, a Hugging Face name or tiny")
        for flag, folder in [("out_dir", self.out_dir)] + ([("export", self.export)] if self.export else []):
            with contextlib.suppress(OSError):  # created now: one that cannot be (read-only, under /proc) stops here
                os.makedirs(folder, exist_ok=True)
            need(os.path.isdir(folder) and os.access(folder, os.W_OK), f"--{flag} {folder!r}: not a folder that can be "
                 f"created and written; choose another one")
        need(not self.show or self.eval_only, f"--show {self.show} prints episodes of an evaluation: add --eval_only "
             f"--resume <checkpoint>")
        need(not (self.eval_only and self.eval_episodes == 0), "--eval_only with --eval_episodes 0 evaluates nothing; "
             "set --eval_episodes >= 1")
        need(not self.export or self.routing != "token", "--export: token routing picks an expert per token and layer, "
             "which no per-request adapter can serve; export a phase, trajectory or dense run")
        need(not self.resume or os.path.isfile(self.resume),
             f"--resume {self.resume}: no such file; point it at a checkpoint.pt or drop the flag")
        need(self.device != "cuda" or torch.cuda.is_available(),
             "--device cuda but no CUDA device is visible; use --device cpu (or auto)")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        return self

    @property
    def experts(self):
        """(K, rank) as built: dense routing is one expert."""
        return (1, self.dense_rank or self.rank) if self.routing == "dense" else (self.num_experts, self.rank)


# Valid values of every numeric flag: "[" and "]" include the bound, "(" and ")" exclude it, so nan and inf never
# pass. Sizes are bounded generously, far above what fits one GPU; --num_experts by the letters A..P of the tables.
RANGES = {
    "seed": "[0, 4294967295]", "iterations": "[0, inf)", "num_envs": "[1, 4096]", "max_steps": "[1, 1000]",
    "history": "[0, 1000]", "max_prompt_tokens": "[64, 131072]", "max_new_tokens": "[1, 8192]",
    "tiny_steps": "[0, 100000]", "tiny_prior": "[0, 1]", "temperature": "(0, inf)", "eval_temperature": "(0, inf)",
    "eval_every": "[0, inf)", "eval_episodes": "[0, 4096]", "show": "[0, 4096]", "ckpt_every": "[1, inf)",
    "num_experts": "[1, 16]", "rank": "[1, 1024]", "alpha": "(0, inf)", "dense_rank": "[0, 16384]",
    "router_window": "[1, 1000]", "router_hidden": "[1, 4096]", "router_layers": "[1, 16]", "tau_start": "(0, inf)",
    "tau_end": "(0, inf)", "tau_steps": "[1, inf)", "switch_coef": "[0, inf)", "balance_coef": "[0, inf)",
    "info_coef": "[0, inf)", "gamma": "[0, 1]", "gae_lambda": "[0, 1]", "clip": "(0, 1)", "kl_coef": "[0, inf)",
    "ent_coef": "[0, inf)", "vf_coef": "[0, inf)", "epochs": "[1, 100]", "minibatch": "[1, 4096]",
    "max_grad_norm": "(0, inf)", "lr_experts": "[0, 1]", "lr_router": "[0, 1]", "lr_critic": "[0, 1]",
    "weight_decay": "[0, 1]", "micro_batch": "[0, 4096]"}
CHOICES = {"env": envs.ENVS, "eval_split": ("eval_in_distribution", "eval_out_of_distribution"),
           "device": ("auto", "cpu", "cuda"), "action_format": tuple(envs.ANSWER), "routing": ("phase", "token",
           "trajectory", "dense"), "balance": ("switch", "sq"), "dtype": ("auto", "float32", "bfloat16")}


LETTERS = "ABCDEFGHIJKLMNOP"  # expert names in tables, metrics and exports


def within(x, interval):
    lo, hi = map(float, interval[1:-1].split(","))
    return (lo <= x if interval[0] == "[" else lo < x) and (x <= hi if interval[-1] == "]" else x < hi)


def boolean(text):
    if text.lower() not in ("true", "false", "1", "0", "on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; use true or false")
    return text.lower() in ("true", "1", "on")


# where and how to evaluate or export a checkpoint: with --eval_only or --export every other flag is the checkpoint's
USE_FLAGS = ("resume", "eval_only", "show", "export", "eval_split", "eval_episodes", "eval_temperature", "out_dir",
             "device", "dtype", "alfworld_data")


def parse_args(argv=None, games=True):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Args):
        kind = boolean if isinstance(f.default, bool) else type(f.default)
        parser.add_argument(f"--{f.name}", type=kind, help=f"{f.metadata['help']} (default: {f.default!r})",
                            **({"nargs": "?", "const": True} if kind is boolean else {}))  # --flag alone: true
    given = vars(parser.parse_args(argv))  # only the flags on the command line; Args fills in the defaults
    if given.get("eval_only") or given.get("export"):
        given = trained_flags(given)
    return Args(**given).validate(games)


def trained_flags(given):
    """--eval_only / --export: the flags the checkpoint was trained with, but for USE_FLAGS given on the command line
    (--out_dir: the checkpoint's folder unless given; --device: auto unless given). A given flag that contradicts the
    checkpoint stops the run: the agent is what it was trained as."""
    need(given.get("resume"), "--eval_only and --export use a trained agent: add --resume <out_dir>/checkpoint.pt")
    trained, names = read_checkpoint(given["resume"])["args"], {f.name for f in dataclasses.fields(Args)}
    trained = {k: v for k, v in trained.items() if k in names}  # a flag of another version of pamoe.py: dropped
    differ = [f"--{k} {v} (trained: {trained.get(k)})" for k, v in given.items()
              if k not in USE_FLAGS and trained.get(k) != v]
    need(not differ, f"--resume {given['resume']} was trained with other flags: {', '.join(differ)}; drop them "
         f"(--eval_only and --export take the checkpoint's)")
    return {**trained, "device": "auto", "out_dir": os.path.dirname(given["resume"]) or ".",
            **{k: v for k, v in given.items() if k in USE_FLAGS}}


# --- Data parallel (torchrun): each rank steps its share of the lanes; a few collectives, identities in one process
def rank_world():
    """This process's rank and the number of processes, as torchrun sets them; (0, 1) without torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def my_lanes(n):
    """This rank's contiguous share of n lanes (environments or evaluation episodes), as global lane numbers."""
    r, w = rank_world()
    return range(r * n // w, (r + 1) * n // w)


def all_sum(x):
    """A tensor or a number summed over all ranks; x itself in one process."""
    if not dist.is_initialized():
        return x
    t = x.detach().clone() if torch.is_tensor(x) else torch.tensor(float(x), dtype=torch.float64)
    dist.all_reduce(t)
    return t if torch.is_tensor(x) else t.item()


def summed(x):
    """x summed over all ranks, with the gradient of this rank's x only: each rank back-propagates its share."""
    return all_sum(x.detach()) + (x - x.detach())


def all_choices(k, K):
    """Experts chosen (n,) on this rank -> those of all ranks, sorted (what counting them needs)."""
    return torch.arange(K, device=k.device).repeat_interleave(all_sum(torch.bincount(k, minlength=K)))


def all_gather(obj):
    """Every rank's obj (any picklable value), in rank order; [obj] in one process."""
    out = [obj] * rank_world()[1]
    if dist.is_initialized():
        dist.all_gather_object(out, obj)
    return out


# --- Model: a frozen causal LM with K LoRA experts on the target linears ----------------------------------------------
def load_model(args, device):
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (  # of the frozen base; trained parts: float32
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.model == "tiny":
        model, tok = envs.build_tiny(envs.vocabulary(args.env), args.seed)
        envs.pretrain_tiny(model, tok, args)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        try:  # no such folder or name, no network for a hub name, no weights, not a causal LM, no tokenizer
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
            tok = envs.saved_tiny_tokenizer(args.model) or AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError) as e:
            raise SystemExit(f"pamoe.py: error: --model {args.model}: cannot load it as a causal LM with its "
                             f"tokenizer ({str(e).splitlines()[0]}); give a Hugging Face causal LM name (online, "
                             f"or cached with HF_HUB_OFFLINE=1), a folder that holds one, or tiny") from e
    need(tok.pad_token or tok.eos_token, f"--model {args.model}: its tokenizer has neither a pad nor an eos token; "
         f"add one (tokenizer.add_special_tokens) and pass the saved folder as --model")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.truncation_side = "left"  # an over-long prompt loses its start, never the admissible actions and question
    # Sample what PPO scores: generate fills every setting it is not given from the model's own generation config
    # (Qwen2.5-Instruct ships repetition_penalty 1.1, top_k 20, top_p 0.8), which response_logprobs never applies.
    # Only the special tokens are kept; `generate` states every sampling setting.
    model.generation_config = GenerationConfig(bos_token_id=model.generation_config.bos_token_id,
                                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.requires_grad_(False)  # base weights frozen
    model.eval()  # dropout off, for rollouts and PPO alike
    return model.to(device=device, dtype=dtype), tok


class Routing:
    """Shared by every LoRAExperts of a model: what the next forward pass routes to."""

    def __init__(self):
        self.on = False  # False: adapters off (frozen features, the reference policy)
        self.gates = None  # (B, 1, K) step gates for phase / trajectory / dense routing
        self.token_probs = []  # token routing: per-layer (B, T, K) router probabilities of the last pass
        self.token_choices = []  # and the chosen experts (B, T)

    @contextlib.contextmanager
    def __call__(self, gates=None):
        """`with routing(gates):` runs the experts with step gates (or token routers when gates is None); it nests."""
        outer = self.on, self.gates
        self.on, self.gates, self.token_probs, self.token_choices = True, gates, [], []
        try:
            yield self
        finally:
            self.on, self.gates = outer


class LoRAExperts(nn.Module):
    """A frozen nn.Linear plus K LoRA experts, stacked so that one pass serves a batch where every sequence
    (or token) has its own expert:  y = W x + (alpha/r) * ((x A_cat) * m) B_cat,  A_cat = [A_1 .. A_K] (in, K*r),
    B_cat = [B_1; ..; B_K] (K*r, out), m the gates of each expert repeated r times. Each expert's A_k (in, r) and
    B_k (r, out) is a parameter of its own, as K separate adapters are: an optimiser step skips the experts whose
    gradient optimizer_step drops (those no step routed to, `chosen`), so they keep their weights and AdamW state."""

    def __init__(self, base, num_experts, rank, alpha, routing, token_routing):
        super().__init__()
        self.base, self.routing, self.K, self.r, self.scale = base, routing, num_experts, rank, alpha / rank
        A = torch.empty(num_experts, rank, base.in_features)
        for a in A:  # each expert initialised like nn.Linear (kaiming-uniform); B zero so experts start as no-ops
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.A = nn.ParameterList(nn.Parameter(a.T.contiguous()) for a in A)  # K x (in, r)
        self.B = nn.ParameterList(nn.Parameter(torch.zeros(rank, base.out_features)) for _ in range(num_experts))
        self.router = nn.Linear(base.in_features, num_experts, bias=False) if token_routing else None
        # experts routed to by a forward pass with gradient since the last optimiser step (on this rank)
        self.register_buffer("chosen", torch.zeros(num_experts, dtype=torch.bool), persistent=False)

    def forward(self, x):
        y = self.base(x)
        if not self.routing.on:
            return y
        gates = self.routing.gates  # (B, 1, K)
        if self.router is not None:  # token routing: each token picks its expert in this layer, top-1 x gate
            probs = F.softmax(self.router(x.float()), dim=-1)  # (B, T, K)
            choice = probs.argmax(-1)
            gates = F.one_hot(choice, self.K) * probs
            self.routing.token_probs.append(probs)
            self.routing.token_choices.append(choice)
        if torch.is_grad_enabled():
            self.chosen |= gates.detach().flatten(0, -2).ne(0).any(0)  # (K,)
        h = x.float() @ torch.cat(list(self.A), dim=1)  # (B, T, K*r): all experts at once
        # Per-phase masked backprop: columns of unrouted experts are multiplied by 0 here, so their A and B
        # receive exactly zero gradient; only tokens routed to expert k train expert k.
        h = h * (self.scale * gates).repeat_interleave(self.r, dim=-1)  # (B, T, K*r); alpha/r folded in
        return y + (h @ torch.cat(list(self.B))).to(y.dtype)


def attach_experts(model, args):
    """Wrap every target linear in LoRAExperts; returns the shared Routing and the expert modules."""
    routing, names = Routing(), set(args.targets.split(","))
    K, r = args.experts
    wrapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in names and isinstance(child, nn.Linear):
                wrapped.append(LoRAExperts(child, K, r, args.alpha, routing, args.routing == "token"))
                setattr(parent, name, wrapped[-1].to(child.weight.device))
    need(wrapped, f"--targets {args.targets}: no nn.Linear of these names in {args.model}; name its linear layers")
    return routing, nn.ModuleList(wrapped)


def checkpoint_layers(model):
    """--grad_ckpt: each decoder layer keeps only its input for backward and runs again there (non-reentrant torch
    checkpointing: gradients reach the experts in the frozen layers, in eval mode too). The replay reads the routing
    of its moment, so backward must run inside the `with routing(gates)` of its forward pass (ppo_update's does)."""
    need(isinstance(getattr(model.base_model, "layers", None), nn.ModuleList),
         f"--grad_ckpt: {type(model).__name__} has no decoder layers at base_model.layers; drop --grad_ckpt")

    def wrap(forward):  # checkpointed where autograd records; plain in no-grad passes such as generation
        return lambda *args, **kwargs: checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False,
                                                  **kwargs) if torch.is_grad_enabled() else forward(*args, **kwargs)
    for layer in model.base_model.layers:
        layer.forward = wrap(layer.forward)


@torch.no_grad()
def encode_texts(model, tok, texts, device):
    """Frozen step features: final hidden states of the base model with adapters off, layer-normalised.
    Returns token states (B, T, d) and their mask (B, T)."""
    batch = tok(texts, padding=True, padding_side="right", return_tensors="pt", add_special_tokens=False).to(device)
    hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    return F.layer_norm(hidden.float(), hidden.shape[-1:]), batch.attention_mask.bool()


def mean_pool(states, mask):
    return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


# --- Phase router and critic: one step encoder class, separate parameters -------------------------------------------
class StepHead(nn.Module):
    """Frozen step features -> out_dim outputs (router logits, or a value).
    window (B, L, 2d): [observation ; previous action] features of the last L steps, zeros before the episode;
    goal (B, G, d) token states of the goal text with mask (B, G)."""

    def __init__(self, d, out_dim, hidden, layers, heads=4):
        super().__init__()
        self.d = d
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.lstm = nn.LSTM(2 * d, hidden, layers, batch_first=True)
        self.head = nn.Sequential(nn.Linear(2 * d + hidden, 512), nn.LayerNorm(512), nn.ReLU(),
                                  nn.Linear(512, out_dim))

    def forward(self, window, goal, goal_mask):
        obs = window[:, -1, :self.d]  # (B, d) current observation
        ctx, _ = self.attn(obs[:, None], goal, goal, key_padding_mask=~goal_mask)  # (B, 1, d): obs attends goal
        _, (h, _) = self.lstm(window)  # h: (layers, B, hidden)
        return self.head(torch.cat([obs, ctx[:, 0], h[-1]], dim=-1))


def router_probs(router, window, goal, goal_mask, tau):
    """p_t = softmax(logits / tau)  (B, K)."""
    return F.softmax(router(window, goal, goal_mask).float() / tau, dim=-1)


def step_gates(probs, k):
    """Hard top-1 gates (B, 1, K) for chosen experts k (B,), straight-through: the forward value is the one-hot
    choice, the backward pass flows through p (onehot + p - stopgrad(p))."""
    onehot = F.one_hot(k, probs.shape[-1]).to(probs.dtype)
    return (onehot + (probs - probs.detach()))[:, None]  # value exactly one-hot


# --- Pure algorithm functions -----------------------------------------------------------------------------------------
def tau_at(update, tau_start, tau_end, tau_steps):
    """Router temperature annealed linearly from tau_start to tau_end over tau_steps router updates."""
    return tau_start + (tau_end - tau_start) * min(update / tau_steps, 1.0)


def gae(rewards, values, next_values, terminated, dones, gamma, lam):
    """Generalised advantage estimation over environment steps (turn level). All inputs (N, T) float tensors:
    next_values[t] is V(s_{t+1}), for a truncated last step V of the final observation; terminated[t] = 1 stops
    bootstrapping; dones[t] = 1 (terminated or truncated, or padding) stops the recursion.
        delta_t = r_t + gamma (1 - term_t) V(s_{t+1}) - V(s_t)
        A_t = delta_t + gamma lam (1 - done_t) A_{t+1}
    Returns advantages and returns (A + V), both (N, T)."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * (1 - terminated[:, t]) * next_values[:, t] - values[:, t]
        last = delta + gamma * lam * (1 - dones[:, t]) * last
        adv[:, t] = last
    return adv, adv + values


def masked_mean(x, mask):
    if not mask.any():
        raise ValueError("masked_mean over an empty mask")
    return torch.where(mask, x, 0).sum() / mask.sum()


def whiten(x, mask):
    """(x - mean) / std, both over the entries in mask of all ranks."""
    n = all_sum(mask.sum())
    mean = all_sum(torch.where(mask, x, 0).sum()) / n
    std = (all_sum(torch.where(mask, (x - mean) ** 2, 0).sum()) / n).sqrt()
    return torch.where(mask, (x - mean) / (std + 1e-8), 0)


def ppo_policy_loss(logp, old_logp, adv, mask, clip):
    """Clipped surrogate, token-mean over the response tokens in `mask`. logp, old_logp, adv, mask: (B, R).
    Returns loss, clip fraction, approx KL (old || new)."""
    log_ratio = torch.where(mask, logp - old_logp, 0)
    ratio = log_ratio.exp()
    surrogate = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    clipfrac = masked_mean(((ratio - 1).abs() > clip).float(), mask)
    return masked_mean(surrogate, mask), clipfrac, masked_mean(-log_ratio, mask)


def kl_k3(logp, ref_logp, mask):
    """KL(pi || pi_ref) per token with the k3 estimator exp(r) - r - 1, r = log pi_ref - log pi; token-mean."""
    r = torch.where(mask, ref_logp - logp, 0)
    return masked_mean(r.exp() - r - 1, mask)


def switch_penalty(p, p_next, valid):
    """Soft temporal consistency: mean over consecutive steps (t, t+1) of one episode of 1 - sum_k p_t,k p_t+1,k.
    p, p_next: (B, K); valid: (B,) true where step t+1 exists. 0 for constant one-hot routing."""
    if not valid.any():
        return p.sum() * 0
    return masked_mean(1 - (p * p_next).sum(-1), valid)


def balance_loss(p, k, mode):
    """Load balance of routing decisions: router probabilities p (N, K), chosen experts k (N,); P_k = mean_n p_n,k.
    switch: K sum_k f_k P_k, f_k the hard share of decisions routed to k, no gradient (Switch Transformer,
            Fedus et al. 2021; GShard, Mixtral); 1 at uniform load, K when one expert takes everything;
    sq:     sum_k (P_k - 1/K)^2 (the paper's form)."""
    K, P = p.shape[-1], p.mean(0)
    if mode == "sq":
        return ((P - 1 / K) ** 2).sum()
    return K * (torch.bincount(k, minlength=K).to(p.dtype) / len(k) * P).sum()


def group_logratio(p, groups):
    """log(P_g / P) (N, K) for each item: P_g the mean router probabilities of the items of its group (groups (N,)
    integer ids), P the mean over all items. sum_k p_k log(P_g,k / P_k), averaged over items, is the mutual
    information I(k; g) of the soft expert choice and the group; held fixed, these log-ratios give the surrogate
    mean_n sum_k p_n,k log(P_g(n),k / P_k) whose gradient is exactly that of I (I's terms through P_g and P cancel:
    dI/dp_n,k = (log P_g(n),k + 1 - log P_k - 1) / N)."""
    P_g = torch.zeros(int(groups.max()) + 1, p.shape[1], dtype=p.dtype, device=p.device).index_add_(0, groups, p)
    P_g = P_g / torch.bincount(groups).clamp(min=1)[:, None]  # (G, K)
    return P_g[groups].clamp(min=1e-12).log() - p.mean(0).clamp(min=1e-12).log()  # (N, K)


def balance_share(p, P, k, mode, n):
    """One part's share of balance_loss over a batch of n decisions cut into parts (gradient accumulation): p (n_i, K)
    the part's probabilities; P (K,) and k (n,) the whole batch's mean probabilities and choices. balance_loss sees
    the probabilities only through P = mean p, so the parts' gradients sum to the batch loss's gradient exactly."""
    P = P.detach().requires_grad_()
    dP, = torch.autograd.grad(balance_loss(P[None], k, mode), P)  # (K,) at the whole batch's P
    return (dP * p.sum(0)).sum() / n


def nmi(a, b):
    """Normalised mutual information I(a; b) / mean(H(a), H(b)) of two labelings of the same items (lists of
    hashables): 1 for a one-to-one map, 0 for independent labelings or when either is constant."""
    n, pa, pb, pab = len(a), Counter(a), Counter(b), Counter(zip(a, b))
    mi = sum(c / n * math.log(c * n / (pa[x] * pb[y])) for (x, y), c in pab.items())
    h = [-sum(c / n * math.log(c / n) for c in cnt.values()) for cnt in (pa, pb)]
    return 0.0 if min(h) <= 0 else max(0.0, mi) / (sum(h) / 2)


LOGIT_CHUNK = 256  # response tokens whose float32 (chunk, V) logits exist at once: 0.16 GB per copy at V = 152k


def token_logp_entropy(hidden, head, targets, temperature):
    """log pi(y) and the entropy of pi = softmax(head(h) / temperature) (2, N), for rows h of hidden (N, d) and targets
    y (N,). In chunks of LOGIT_CHUNK rows, each checkpointed: its float32 (chunk, V) logits exist while it is computed
    and again in its backward, never for all N rows; nothing of size V is kept in between."""
    def chunk(h, y):
        logp_all = F.log_softmax(head(h).float() / temperature, dim=-1)  # (chunk, V)
        return torch.stack([logp_all.gather(-1, y[:, None])[:, 0], -(logp_all.exp() * logp_all).sum(-1)])
    return torch.cat([checkpoint(chunk, h, y, use_reentrant=False)
                      for h, y in zip(hidden.split(LOGIT_CHUNK), targets.split(LOGIT_CHUNK))], dim=1)


# --- The agent: frozen LM + experts + router + critic -----------------------------------------------------------------
class Agent(nn.Module):
    def __init__(self, args, device):
        super().__init__()
        self.args, self.device = args, device
        self.lm, self.tok = load_model(args, device)
        torch.manual_seed(args.seed)  # experts, router and critic start alike, whether the base was built or loaded
        self.routing, self.experts = attach_experts(self.lm, args)
        if args.grad_ckpt:
            checkpoint_layers(self.lm)
        d, K = self.lm.config.hidden_size, args.experts[0]
        step_routed = args.routing in ("phase", "trajectory")
        self.router = StepHead(d, K, args.router_hidden, args.router_layers).to(device) if step_routed else None
        self.critic = StepHead(d, 1, args.router_hidden, args.router_layers).to(device)

    def param_groups(self):
        a = self.args
        groups = [("experts", list(self.experts.parameters()), a.lr_experts),
                  ("router", list(self.router.parameters()) if self.router else [], a.lr_router),
                  ("critic", list(self.critic.parameters()), a.lr_critic)]
        return [{"name": n, "params": p, "lr": lr} for n, p, lr in groups if p]

    def trainable_state(self):
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def response_logprobs(self, seqs, prompt_lens, resp_lens, temperature, gates, experts_on=True):
        """Log-probs (B, R) and entropies (B, R) of each response token at the sampling temperature, from one
        plain forward over prompt + response (right-padded), and the mask (B, R) of real response tokens.
        gates (B, 1, K), or None for token routing."""
        R = max(resp_lens)
        ids = nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=self.tok.pad_token_id).to(self.device)
        attn = nn.utils.rnn.pad_sequence([torch.ones(len(s), dtype=torch.long) for s in seqs],
                                         batch_first=True).to(self.device)
        pl = torch.tensor(prompt_lens, device=self.device)
        j = torch.arange(R, device=self.device)
        mask = j[None] < torch.tensor(resp_lens, device=self.device)[:, None]  # (B, R)
        with self.routing(gates) if experts_on else contextlib.nullcontext():
            hidden = self.lm.base_model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        # the n real response tokens: the sequence b of each and the position pos that predicts it, (n,) each
        b, pos = mask.nonzero(as_tuple=True)[0], (pl[:, None] + j[None] - 1)[mask]
        logp_entropy = token_logp_entropy(hidden[b, pos], self.lm.get_output_embeddings(), ids[b, pos + 1], temperature)
        return (*(torch.zeros(mask.shape, device=self.device).masked_scatter(mask, x) for x in logp_entropy), mask)


# --- Rollout: N envs in lockstep, one routing decision and one generated response per env step ------------------------
class StepFeatures:
    """A rollout's frozen step features: a table whose row 0 is zeros (before an episode's start), then one row
    [observation ; previous action] (2d,) per lane and step; window(n, t) indexes lane n's rows of steps t-L+1..t."""

    def __init__(self, agent, N):
        self.agent, self.rows, self.lane_rows = agent, [torch.zeros(2 * agent.lm.config.hidden_size,
                                                                    device=agent.device)], [[] for _ in range(N)]

    def add(self, lanes, obs, last_action):
        lm, tok, dev = self.agent.lm, self.agent.tok, self.agent.device
        obs_f = mean_pool(*encode_texts(lm, tok, [obs[n] for n in lanes], dev))  # (A, d)
        act_f = torch.zeros_like(obs_f)
        has = [i for i, n in enumerate(lanes) if last_action[n]]
        if has:
            act_f[has] = mean_pool(*encode_texts(lm, tok, [last_action[lanes[i]] for i in has], dev))
        for n, f in zip(lanes, torch.cat([obs_f, act_f], -1)):
            self.lane_rows[n].append(len(self.rows))
            self.rows.append(f)

    def window(self, n, t):
        L = self.agent.args.router_window
        return [self.lane_rows[n][s] if s >= 0 else 0 for s in range(t - L + 1, t + 1)]


def generate(agent, prompts, gates, temperature):
    """One sampled response per prompt with the experts of gates (B, 1, K) (None: token routing). Returns per prompt
    (prompt ids, response ids up to the EOS or the end of the tagged answer, response text), and for token routing
    each response's most chosen expert over layers and tokens (tables only), else None."""
    a, tok, K = agent.args, agent.tok, agent.args.experts[0]
    stop = "</action>" if a.action_format == "tagged" else None  # a tagged answer ends with its action
    enc = tok(prompts, padding=True, padding_side="left", truncation=True, max_length=a.max_prompt_tokens,
              return_tensors="pt", add_special_tokens=False).to(agent.device)
    P = enc.input_ids.shape[1]
    with agent.routing(gates):
        out = agent.lm.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                max_new_tokens=a.max_new_tokens, pad_token_id=tok.pad_token_id,
                                eos_token_id=tok.eos_token_id,
                                stopping_criteria=[envs.stop_at(tok, stop, P)] if stop else None)
    voted = None if gates is not None else torch.cat([F.one_hot(c, K).reshape(len(prompts), -1, K)
                                                      for c in agent.routing.token_choices], 1).sum(1).argmax(-1)
    samples = []
    for i in range(len(prompts)):
        resp = out[i, P:].cpu()
        resp = resp[:envs.response_length(resp.tolist(), tok, stop)]  # the sampled EOS or stop kept, padding dropped
        samples.append((enc.input_ids[i][enc.attention_mask[i].bool()].cpu(), resp,
                        tok.decode(resp, skip_special_tokens=True)))
    return samples, voted


@torch.no_grad()
def rollout(agent, env_batch, seeds, tau, temperature, greedy_router):
    """Play one episode per lane. Returns a dict: per-step samples as lists (ordered by step, then lane), the
    frozen step-feature table that `window` indexes, the goal token states per lane, and for truncated lanes the
    window of the final observation (to bootstrap from)."""
    a, dev, tok = agent.args, agent.device, agent.tok
    K, N = a.experts[0], len(seeds)
    obs, infos = map(list, zip(*env_batch.reset(seeds)))
    goal_states, goal_mask = encode_texts(agent.lm, tok, [i["goal"] for i in infos], dev)
    feats = StepFeatures(agent, N)
    history, last_action, done, cut = [[] for _ in range(N)], [""] * N, [False] * N, [False] * N
    last_verb = [""] * N  # the verb of each lane's previous action: "" before the first, <invalid> after a bad output
    episode_k = torch.zeros(N, dtype=torch.long, device=dev)
    episode_p = torch.ones(N, K, device=dev) / K  # the router's probabilities of each lane's current step
    R = defaultdict(list)
    for t in range(env_batch.max_steps):
        lanes = [n for n in range(N) if not done[n]]
        if not lanes:
            break
        feats.add(lanes, obs, last_action)
        lane_idx = torch.tensor(lanes, device=dev)
        win = torch.tensor([feats.window(n, t) for n in lanes], device=dev)  # (A, L)
        if agent.router is not None and (a.routing == "phase" or t == 0):  # trajectory: decide at step 0 only
            p = router_probs(agent.router, torch.stack(feats.rows)[win], goal_states[lane_idx], goal_mask[lane_idx],
                             tau)
            k = p.argmax(-1) if greedy_router else torch.multinomial(p, 1)[:, 0]
            episode_k[lane_idx], episode_p[lane_idx] = k, p
        k = episode_k[lane_idx]  # dense: expert 0
        gates = None if a.routing == "token" else F.one_hot(k, K).float()[:, None]  # (A, 1, K)
        prompts = [envs.fit_prompt(tok, a, infos[n], obs[n], history[n], t) for n in lanes]
        samples, voted = generate(agent, prompts, gates, temperature)
        k = k if voted is None else voted
        actions, invalid = [None] * N, {}
        for i, (n, (prompt_ids, resp, text)) in enumerate(zip(lanes, samples)):
            cmd, valid = envs.parse_action(text, infos[n]["admissible"])
            actions[n], invalid[n] = (cmd if valid else text), not valid
            for key, val in (("seq", torch.cat([prompt_ids, resp])), ("prompt_len", len(prompt_ids)),
                             ("resp_len", len(resp)), ("lane", n), ("t", t), ("k", int(k[i])),
                             ("router_p", episode_p[n].tolist()), ("window", win[i].tolist()),
                             ("last_verb", last_verb[n]), ("obs", obs[n]), ("response", text),
                             ("action", cmd if valid else None), ("goal", infos[n]["goal"]),
                             ("phase", env_batch.step_phase(infos[n], cmd if valid else None)),
                             ("task_type", infos[n]["task_type"])):
                R[key].append(val)
        results = env_batch.step(actions)
        for n in lanes:
            o, r, term, trunc, info = results[n]  # an invalid output costs -0.1 (paper) and is counted
            for key, val in (("reward", r - 0.1 * invalid[n]), ("invalid", invalid[n]), ("terminated", term),
                             ("truncated", trunc), ("won", info["won"])):
                R[key].append(val)
            history[n].append((obs[n], actions[n]))
            last_action[n], obs[n], infos[n], done[n], cut[n] = actions[n], o, info, term or trunc, trunc
            last_verb[n] = "<invalid>" if invalid[n] else actions[n].split()[0]
    truncated = [n for n in range(N) if cut[n]]
    if truncated:  # features of the final observation, to bootstrap from at truncation
        feats.add(truncated, obs, last_action)
    R.update(table=torch.stack(feats.rows), goal_states=goal_states, goal_mask=goal_mask,
             final_window={n: feats.window(n, len(feats.lane_rows[n]) - 1) for n in truncated})
    return dict(R)


def rollout_stats(S, N):
    """Per-episode summaries of a rollout: success, return, steps, switches, task type, experts and phases."""
    ep = defaultdict(lambda: {"return": 0.0, "won": False, "experts": [], "phases": []})
    for n, r, won, tt, k, ph in zip(*(S[key] for key in ("lane", "reward", "won", "task_type", "k", "phase"))):
        e = ep[n]
        e["return"], e["won"], e["task_type"] = e["return"] + r, e["won"] or won, tt
        e["experts"].append(k)
        e["phases"].append(ph)
    eps = [ep[n] for n in range(N)]
    for e in eps:
        e["steps"], e["switches"] = len(e["experts"]), sum(x != y for x, y in zip(e["experts"], e["experts"][1:]))
    return eps


def episode_metrics(S, eps, K, task_types, prefix=""):
    """Success (in all and per task type), return, length and expert switches of episodes eps, the share of invalid
    answers among steps S and of steps routed to each expert."""
    m = {"success": [e["won"] for e in eps], "return": [e["return"] for e in eps], "steps": [e["steps"] for e in eps],
         "switches": [e["switches"] for e in eps], "invalid": S["invalid"],
         **{f"success/{tt}": [e["won"] for e in eps if e["task_type"] == tt] for tt in task_types},
         **{f"expert_share/{LETTERS[k]}": np.equal(S["k"], k) for k in range(K)}}
    return {prefix + key: float(np.mean(v)) for key, v in m.items() if len(v)}  # a task type no episode drew: none


def gather_steps(S, lanes):
    """The per-step lists that statistics read, of every rank's rollout over its `lanes` (lane numbers made global)."""
    keys = ("lane", "reward", "won", "task_type", "k", "phase", "invalid", "resp_len")
    mine = {key: [lanes[n] for n in S[key]] if key == "lane" else S[key] for key in keys}
    return {key: sum((part[key] for part in all_gather(mine)), []) for key in keys}


# --- PPO update over one rollout --------------------------------------------------------------------------------------
def step_gates_for(agent, idx, k):
    """Gates of stored samples as they were in the rollout (no router gradient): None for token routing."""
    return None if agent.args.routing == "token" else F.one_hot(k[idx], agent.args.experts[0]).float()[:, None]


def real_tokens(token_probs, seqs):
    """Token routing: each layer's router probabilities (n, K) at the n real tokens of the last pass over seqs."""
    real = nn.utils.rnn.pad_sequence([torch.ones(len(s), dtype=torch.bool) for s in seqs], batch_first=True)
    return [pr[real.to(pr.device)] for pr in token_probs]


@torch.no_grad()
def prepare_batch(agent, R):
    """Values, GAE advantages (whitened over the batch) and returns; old and reference log-probs per sample."""
    a, dev = agent.args, agent.device
    lanes, steps = torch.tensor(R["lane"], device=dev), torch.tensor(R["t"], device=dev)
    N, T = R["goal_states"].shape[0], int(steps.max()) + 1
    windows = torch.tensor(R["window"], device=dev)  # (S, L)
    values = agent.critic(R["table"][windows], R["goal_states"][lanes], R["goal_mask"][lanes])[:, 0]

    def grid(x):  # per-sample values -> (N, T), zero where an episode has no step t
        return torch.zeros(N, T, device=dev).index_put_((lanes, steps), torch.as_tensor(x, device=dev).float())

    V, rew, term, trunc = grid(values), grid(R["reward"]), grid(R["terminated"]), grid(R["truncated"])
    lengths = torch.bincount(lanes, minlength=N)
    valid = torch.arange(T, device=dev)[None] < lengths[:, None]  # (N, T)
    next_V = torch.cat([V[:, 1:], torch.zeros(N, 1, device=dev)], 1)
    if R["final_window"]:  # truncation bootstraps from V of the final observation
        tl = torch.tensor(list(R["final_window"]), device=dev)
        fw = torch.tensor(list(R["final_window"].values()), device=dev)
        next_V[tl, lengths[tl] - 1] = agent.critic(R["table"][fw], R["goal_states"][tl], R["goal_mask"][tl])[:, 0]
    dones = torch.where(valid, torch.maximum(term, trunc), 1.0)
    adv, ret = gae(rew, V, next_V, term, dones, a.gamma, a.gae_lambda)
    adv = whiten(adv, valid)
    pos = {(n, t): i for i, (n, t) in enumerate(zip(R["lane"], R["t"]))}
    B = {"adv": adv[lanes, steps], "ret": ret[lanes, steps], "values": values, "windows": windows, "lanes": lanes,
         "k": torch.tensor(R["k"], device=dev),
         # the sample of step t+1 of the same episode (for the switch penalty), -1 if none
         "next": torch.tensor([pos.get((n, t + 1), -1) for n, t in zip(R["lane"], R["t"])], device=dev)}
    if a.routing == "phase":  # I(expert; last verb) over the rollout of all ranks: each step's previous verb and
        # the router probabilities it was routed with
        parts = all_gather((R["last_verb"], R["router_p"]))
        vocab = {v: i for i, v in enumerate(sorted({v for verbs, _ in parts for v in verbs}))}
        groups = torch.tensor([vocab[v] for verbs, _ in parts for v in verbs], device=dev)
        logratio = group_logratio(torch.tensor(sum((p for _, p in parts), []), device=dev), groups)  # (all steps, K)
        start = sum(len(verbs) for verbs, _ in parts[:rank_world()[0]])
        B["verb_logratio"] = logratio[start:start + len(R["last_verb"])]  # (S, K) this rank's steps
    # the trajectory router decides once, from the window of the episode's first step
    first = torch.tensor([pos[(n, 0)] for n in R["lane"]], device=dev)
    B["router_windows"] = windows[first] if a.routing == "trajectory" else windows
    B["old_logp"], B["ref_logp"] = [None] * len(R["seq"]), [None] * len(R["seq"])
    by_length = torch.tensor([len(s) for s in R["seq"]]).argsort()  # similar lengths together: less padding
    for mb in by_length.split(a.micro_batch or a.minibatch):  # memory within that of a PPO micro-batch
        seqs, pl, rl = ([R[key][i] for i in mb] for key in ("seq", "prompt_len", "resp_len"))
        old = agent.response_logprobs(seqs, pl, rl, a.temperature, step_gates_for(agent, mb.to(dev), B["k"]))[0]
        ref = agent.response_logprobs(seqs, pl, rl, a.temperature, None, experts_on=False)[0]
        for i, lp_old, lp_ref, n in zip(mb.tolist(), old, ref, rl):
            B["old_logp"][i], B["ref_logp"][i] = lp_old[:n], lp_ref[:n]
    return B


class NonFiniteError(RuntimeError):
    """A loss term, gradient norm or parameter became nan or inf: the run must stop before it trains on it."""


def check_finite(named):
    """Raise NonFiniteError naming the first of {name: tensor} that holds a nan or inf on any rank, on every rank."""
    finite = (all_sum(torch.stack([~t.detach().isfinite().all() for t in named.values()]).int()) == 0).tolist()
    if not all(finite):
        raise NonFiniteError(list(named)[finite.index(False)])


def router_losses(agent, R, B, mb, tau):
    """The step router on minibatch mb (this rank's steps; means over all ranks): p_t at each step and p_t+1 at the
    next step of the same episode, straight-through gates of the rollout's choices k, and its auxiliary losses
        switch  = lambda_s mean_t (1 - sum_k p_t,k p_t+1,k)           temporal consistency (phase routing)
        balance = lambda_b balance_loss(P, f)                          load balance
        info    = -lambda_i I(k; verb of the previous action)          behaviour information (phase routing)
    Trajectory routing decides once per episode, from its first step, so it never switches: its p_t+1 would be p_t
    and the switch term 1 - sum_k p_k^2 a sharpening of p weighted by the episode's length; it has no switch term.
    Returns gates (B, 1, K), {term: loss}, {statistic: value}."""
    a, n, lanes, k, nxt = agent.args, all_sum(len(mb)), B["lanes"][mb], B["k"][mb], B["next"][mb]  # nxt -1: no t+1
    phase = a.routing == "phase"
    wins = B["router_windows"][mb]
    if phase:
        wins = torch.cat([wins, B["router_windows"][nxt.clamp(min=0)]])  # and the next step's windows
    gl = lanes.repeat(len(wins) // len(mb))
    probs = router_probs(agent.router, R["table"][wins], R["goal_states"][gl], R["goal_mask"][gl], tau)
    p = probs[:len(mb)]
    terms, stats = {}, {}
    if phase:
        pairs = (nxt >= 0).sum()
        sw = summed(switch_penalty(p, probs[len(mb):], nxt >= 0) * pairs / max(all_sum(int(pairs)), 1))
        terms["switch"], stats["switch_penalty"] = a.switch_coef * sw, float(sw.detach())
    terms["balance"] = a.balance_coef * balance_loss(summed(p.sum(0))[None] / n, all_choices(k, p.shape[1]), a.balance)
    stats["router_entropy"] = all_sum(float(-(p * p.clamp(min=1e-12).log()).sum().detach())) / n
    if phase:  # the rollout's log-ratios log(P_verb / P) held fixed: the gradient of I (group_logratio)
        info = summed((p * B["verb_logratio"][mb]).sum() / n)
        terms["info"], stats["verb_information"] = -a.info_coef * info, float(info.detach())
    return step_gates(p, k), terms, stats


def policy_loss(agent, R, B, idx, gates):
    """PPO's loss on the response tokens of steps idx, token means (each token carries its step's advantage):
        L = clipped surrogate + kl_coef KL_k3(pi || pi_ref) - ent_coef entropy
    gates (b, 1, K), or None for token routing. Returns L, its statistics, and the number of response tokens."""
    a, pad = agent.args, nn.utils.rnn.pad_sequence
    seqs, pl, rl = ([R[key][i] for i in idx] for key in ("seq", "prompt_len", "resp_len"))
    logp, ent, mask = agent.response_logprobs(seqs, pl, rl, a.temperature, gates)  # (b, R) each
    old, ref = (pad([B[key][i] for i in idx], batch_first=True) for key in ("old_logp", "ref_logp"))  # (b, R)
    adv = B["adv"][idx][:, None].expand_as(logp)
    pg_loss, clipfrac, approx_kl = ppo_policy_loss(logp, old, adv, mask, a.clip)
    kl, entropy, ratio = kl_k3(logp, ref, mask), masked_mean(ent, mask), torch.where(mask, logp - old, 0).exp()
    stats = {"pg_loss": pg_loss, "clipfrac": clipfrac, "approx_kl": approx_kl, "kl": kl, "entropy": entropy,
             "ratio": masked_mean(ratio, mask), "ratio_sq": masked_mean(ratio ** 2, mask)}
    return pg_loss + a.kl_coef * kl - a.ent_coef * entropy, {k: v.detach() for k, v in stats.items()}, sum(rl)


def token_balance_stats(agent, R, mb):
    """Token routing over several micro-batches or ranks: each layer's mean router probabilities and choices over all
    tokens of the minibatch (one no-grad pass), so that each micro-batch's balance share is that of the whole."""
    seqs = [R["seq"][i] for i in mb]
    with torch.no_grad():
        agent.response_logprobs(seqs, [R["prompt_len"][i] for i in mb], [R["resp_len"][i] for i in mb],
                                agent.args.temperature, None)
    n_tok = all_sum(sum(map(len, seqs)))
    return [(all_sum(p.sum(0)) / n_tok, all_choices(p.argmax(-1), p.shape[1]))
            for p in real_tokens(agent.routing.token_probs, seqs)]


def policy_backward(agent, R, B, mb, gates):
    """Backward of the policy loss of minibatch mb in micro-batches of --micro_batch steps (gradient accumulation),
    each weighted by its share of the minibatch's response tokens on all ranks; token routing adds each layer's
    balance of its token router. gates: a leaf (B, 1, K) cut from the router's graph (its gradient collects there), or
    None. Returns token-weighted means of the statistics and the loss terms summed over micro-batches."""
    a, tokens = agent.args, all_sum(sum(R["resp_len"][i] for i in mb))
    parts = torch.arange(len(mb)).split(a.micro_batch or len(mb))
    n_tok = all_sum(sum(len(R["seq"][i]) for i in mb))  # every token of every sequence, prompts too
    token_stats = token_balance_stats(agent, R, mb) if a.routing == "token" and (
        len(parts) > 1 or dist.is_initialized()) else None
    mean, checked = defaultdict(float), defaultdict(float)
    for part in parts:
        idx, gates_ = mb[part], None if gates is None else gates[part]
        with agent.routing(gates_):  # --grad_ckpt replays the layers in backward: route them as before
            loss, stats, n_resp = policy_loss(agent, R, B, idx, gates_)
            extra = 0
            if a.routing == "token":  # this micro-batch's share of every layer's balance
                probs = real_tokens(agent.routing.token_probs, [R["seq"][i] for i in idx])  # per layer (n, K)
                stat = token_stats or [(p.detach().mean(0), p.argmax(-1)) for p in probs]
                extra = a.balance_coef * torch.stack([balance_share(p, P, c, a.balance, n_tok)
                                                      for p, (P, c) in zip(probs, stat)]).mean()
                checked["balance"] += extra.detach()
            (n_resp / tokens * loss + extra).backward()
        for key in ("pg_loss", "kl", "entropy"):
            checked[key] += stats[key]
        for key, val in stats.items():
            mean[key] += n_resp / tokens * float(val)
    mean = dict(zip(mean, all_sum(torch.tensor(list(mean.values()), dtype=torch.float64)).tolist()))
    mean["ratio_var"] = mean.pop("ratio_sq") - mean.pop("ratio") ** 2
    return mean, checked


def drop_unrouted_gradients(experts):
    """Train only what you route: the gradients of the experts that no forward pass routed to since the minibatch
    began (on any rank; per layer for token routing) are dropped, so that the optimiser skips them as it skips a
    separate adapter without a gradient: no AdamW momentum, weight decay or step count moves them."""
    chosen = all_sum(torch.stack([e.chosen for e in experts]).int()) > 0  # (modules, K)
    for e, routed in zip(experts, chosen.tolist()):
        for k in range(e.K):
            if not routed[k]:
                e.A[k].grad = None
                e.B[k].grad = None


def optimizer_step(agent, opt):
    """Sum every rank's share of the gradients (the whole minibatch's gradient on every rank), drop those of unrouted
    experts, clip each parameter group's norm, stop on a nan or inf before it trains on, step."""
    for q in agent.parameters():
        q.grad = None if q.grad is None else all_sum(q.grad)
    drop_unrouted_gradients(agent.experts)
    check_finite({f"gradient norm of {g['name']}": nn.utils.clip_grad_norm_(g["params"], agent.args.max_grad_norm)
                  for g in opt.param_groups})
    opt.step()


def ppo_update(agent, opt, R, B, tau_state):
    """--epochs of minibatch PPO over one rollout; experts, router and critic step together. Data parallel: each rank
    cuts its share R into the minibatches the whole needs; means, statistics and gradients are over all ranks."""
    a, stats, sizes = agent.args, defaultdict(list), all_gather(len(R["seq"]))
    for epoch in range(a.epochs):
        for mb in torch.randperm(len(R["seq"])).tensor_split(min(math.ceil(sum(sizes) / a.minibatch), *sizes)):
            mb, n = mb.to(agent.device), all_sum(len(mb))
            opt.zero_grad(set_to_none=True)
            for e in agent.experts:  # the minibatch's forward passes record the experts they route to
                e.chosen.zero_()
            gates, aux, out = step_gates_for(agent, mb, B["k"]), {}, {}
            if agent.router is not None:
                tau = tau_at(tau_state["updates"], a.tau_start, a.tau_end, a.tau_steps)
                gates, aux, out = router_losses(agent, R, B, mb, tau)
            lanes = B["lanes"][mb]
            v = agent.critic(R["table"][B["windows"][mb]], R["goal_states"][lanes], R["goal_mask"][lanes])[:, 0]
            v_loss = summed(0.5 * ((v - B["ret"][mb]) ** 2).sum() / n)
            # the LM's micro-batches see the gates as a leaf cut from the router's graph; their summed gradient goes
            # through the router once, with the critic's and the router's own terms
            cut = None if gates is None else gates.detach().requires_grad_(gates.requires_grad)
            mean, checked = policy_backward(agent, R, B, mb, cut)
            check_finite({**checked, "value_loss": v_loss, **aux})
            outs = [(a.vf_coef * v_loss + sum(aux.values()), None)]
            outs += [(gates, cut.grad)] if cut is not None and cut.grad is not None else []
            torch.autograd.backward(*zip(*outs))
            optimizer_step(agent, opt)
            tau_state["updates"] += 1
            for key, val in {**out, **mean, "value_loss": float(v_loss.detach())}.items():
                stats[key].append(val)
    check_finite({f"parameter {n}": p for n, p in agent.named_parameters() if p.requires_grad})
    out = {key: float(np.mean(v)) for key, v in stats.items()}
    v, ret = (torch.cat(all_gather(x.cpu())) for x in (B["values"], B["ret"]))
    out["explained_variance"] = float("nan") if ret.var() == 0 else float(1 - (ret - v).var() / ret.var())
    out["tau"] = tau_at(tau_state["updates"], a.tau_start, a.tau_end, a.tau_steps)
    return out


def expert_diagnostics(agent, R, B):
    """The paper's parameter occupancy (its Fig. 1) and gradient conflict, over one rollout at the rollout's parameters
    (ratio 1): g_k,c is the gradient, w.r.t. expert k's A and B, of the share of the policy loss that the steps of task
    type c carry (their response tokens / all).
        occupancy/<k>/<c> = |g_k,c| / sum_c' |g_k,c'|        which task types train expert k
        conflict/<k>      = mean over pairs c != c' of cos(g_k,c, g_k,c')   (pairs where both are non-zero)"""
    a, K = agent.args, agent.args.experts[0]
    params = [p for k in range(K) for e in agent.experts for p in (e.A[k], e.B[k])]  # expert by expert
    types, tokens = sorted({c for part in all_gather(R["task_type"]) for c in part}), all_sum(sum(R["resp_len"]))
    g = {}
    for c in types:
        acc = [torch.zeros_like(p) for p in params]
        idx = torch.tensor([i for i, t in enumerate(R["task_type"]) if t == c], dtype=torch.long)
        for part in idx.split(a.micro_batch or a.minibatch) if len(idx) else []:  # a rank may have no step of c
            gates = step_gates_for(agent, part.to(agent.device), B["k"])
            with agent.routing(gates):  # backward inside: --grad_ckpt replays the layers with these gates
                loss, _, n_resp = policy_loss(agent, R, B, part, gates)
                acc = [x + y for x, y in zip(acc, torch.autograd.grad(n_resp / tokens * loss, params))]
        g[c] = all_sum(torch.cat([x.flatten() for x in acc])).view(K, -1)  # (K, n): expert k's A and B, all layers
    out = {}
    for k in range(K):
        norms = {c: float(g[c][k].norm()) for c in types}
        if sum(norms.values()) == 0:  # an expert no step was routed to
            continue
        out.update({f"occupancy/{LETTERS[k]}/{c}": v / sum(norms.values()) for c, v in norms.items()})
        cos = [float(F.cosine_similarity(g[c][k], g[d][k], dim=0)) for i, c in enumerate(types)
               for d in types[i + 1:] if norms[c] > 0 and norms[d] > 0]
        out.update({f"conflict/{LETTERS[k]}": float(np.mean(cos))} if cos else {})  # none: one task type only
    return out


# --- Evaluation: success per task type, expert usage, phase timelines -------------------------------------------------
EVAL_SEED = 10_000_000


def evaluate(agent, tau):
    """The policy on --eval_episodes fixed episodes of --eval_split (temperature --eval_temperature, argmax router).
    Returns the eval/* metrics, the tables (text) and this rank's own steps (what --show prints)."""
    a, lanes = agent.args, my_lanes(agent.args.eval_episodes)  # this rank's share of the fixed episodes
    env_batch = envs.make_env_batch(a.env, len(lanes), a.max_steps, a.eval_split, a.alfworld_data)
    # a sampling stream of its own: the same policy always scores the same, and evaluating leaves training untouched
    with contextlib.closing(env_batch), torch.random.fork_rng([agent.device] if agent.device.type == "cuda" else []):
        torch.manual_seed(EVAL_SEED + rank_world()[0])
        mine = rollout(agent, env_batch, [EVAL_SEED + i for i in lanes], tau, a.eval_temperature, greedy_router=True)
    S, K = gather_steps(mine, lanes), a.experts[0]
    eps = rollout_stats(S, a.eval_episodes)
    by_task = {tt: [e for e in eps if e["task_type"] == tt] for tt in envs.TASK_COLUMNS[a.env]}  # paper's order
    m = episode_metrics(S, eps, K, by_task, "eval/")
    share = [m[f"eval/expert_share/{LETTERS[k]}"] for k in range(K)]
    m.update({"eval/phase_nmi": nmi(S["k"], S["phase"]), "eval/task_nmi": nmi(S["k"], S["task_type"]),
              "eval/share_entropy": -sum(x * math.log(x) for x in share if x > 0)})
    usage, tables = usage_tables(S, by_task, K)
    return {**m, **usage}, tables, mine


def usage_tables(S, by_task, K):
    """Expert usage by task type and by phase, and one phase timeline per task type: eval/usage/* and the text."""
    lines, m = [], {}
    for key, col in (("task type", "task_type"), ("phase", "phase")):
        usage = defaultdict(Counter)
        for k, label in zip(S["k"], S[col]):
            usage[label][k] += 1
        lines.append(f"expert usage by {key} (fraction of steps): " + " ".join(f"{LETTERS[k]:>5}" for k in range(K)))
        for name, c in sorted(usage.items()):
            n = sum(c.values())
            lines.append(f"  {name:<10}" + " ".join(f"{c[k] / n:5.2f}" for k in range(K)) + f"   (n={n})")
            m.update({f"eval/usage/{name}/{LETTERS[k]}": c[k] / n for k in range(K)} if col == "task_type" else {})
    code = {}
    for ph in sorted(set(S["phase"])):  # one letter per phase: its initial, upper-cased if already taken
        code[ph] = ph[0] if ph[0] not in code.values() else ph[0].upper()
    lines.append("phase timelines (expert per step, then phase per step: "
                 + ", ".join(f"{c}={ph}" for ph, c in code.items()) + "):")
    for tt, es in sorted(by_task.items()):
        lines += [f"  {tt:<6} {''.join(LETTERS[k] for k in es[0]['experts']):<21} "
                  f"{''.join(code[p] for p in es[0]['phases']):<21} {'won' if es[0]['won'] else 'lost'}"] if es else []
    return m, "\n".join(lines)


def show_episodes(S, n, routing):
    """--show: the first n episodes of a rollout's steps S, step by step: observation, the model's response, the
    action it parses to (or invalid), the step's expert with the router's probabilities, the reward."""
    lines = []
    for lane in sorted(set(S["lane"]))[:n]:
        steps = [i for i, x in enumerate(S["lane"]) if x == lane]
        lines.append(f"=== episode {lane + 1} ({S['task_type'][steps[0]]}): {S['goal'][steps[0]]}")
        for i in steps:
            p = "per token" if routing == "token" else " ".join(f"{x:.2f}" for x in S["router_p"][i])
            lines += [f"  step {S['t'][i] + 1} observation: {S['obs'][i]}",
                      f"    response {S['response'][i]!r} -> {S['action'][i] or 'invalid'} | expert "
                      f"{LETTERS[S['k'][i]]} (router p {p}) | reward {S['reward'][i]:+.1f}"]
        lines.append(f"  {'won' if any(S['won'][i] for i in steps) else 'lost'} after {len(steps)} steps")
    return "\n".join(lines)


def report_evaluation(agent, it, tau):
    """Evaluate; rank 0 prints the tables. Training appends them to eval.log; --eval_only prints --show's episodes
    first and writes the tables to <out_dir>/eval.json, leaving the run's files as they are. Returns eval/* metrics."""
    a, t = agent.args, time.time()
    em, tables, mine = evaluate(agent, tau)
    columns = " ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in em.items() if k.startswith("eval/success/"))
    report = f"[iteration {it}] eval success: All {em['eval/success']:.2f} {columns}\n{tables}"
    if rank_world()[0] == 0 and a.eval_only:
        print((show_episodes(mine, a.show, a.routing) + "\n" if a.show else "") + report)
        path = os.path.join(a.out_dir, "eval.json")
        with open(f"{path}.tmp", "w") as f:
            json.dump({"checkpoint": a.resume, "iteration": it, **{k: getattr(a, k) for k in (
                "eval_split", "eval_episodes", "eval_temperature")}, "metrics": em, "tables": tables}, f, indent=1)
        os.replace(f"{path}.tmp", path)
    elif rank_world()[0] == 0:
        tqdm.write(report)
        with open(os.path.join(a.out_dir, "eval.log"), "a") as f:
            f.write(report + "\n")
    return {**em, "eval_s": time.time() - t}


# --- Using a trained agent: evaluate a checkpoint, export its experts as PEFT LoRA adapters ---------------------------
def export_experts(agent, folder, it, tau):
    """--export: expert k as a PEFT LoRA adapter in folder/expert_<k>/ (lora_A (r, in) = A_k.T, lora_B (out, r) =
    B_k.T, scaled by lora_alpha / r as here), the router with the flags that rebuild
    it (router.pt), how to use them (README.md), and for `tiny` the frozen base itself (base/)."""
    from safetensors.torch import save_file
    a, (K, r) = agent.args, agent.args.experts
    paths = {id(m): name for name, m in agent.lm.named_modules()}
    for k in range(K):
        out = os.path.join(folder, f"expert_{LETTERS[k]}")
        os.makedirs(out, exist_ok=True)
        save_file({f"base_model.model.{paths[id(e)]}.lora_{x}.weight": w.T.contiguous() for e in agent.experts
                   for x, w in (("A", e.A[k]), ("B", e.B[k]))},  # PEFT's lora_A (r, in), lora_B (out, r)
                  os.path.join(out, "adapter_model.safetensors"))
        with open(os.path.join(out, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": a.alpha, "target_modules":
                       sorted(set(a.targets.split(","))), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
                       "use_rslora": False, "use_dora": False, "inference_mode": True,
                       "base_model_name_or_path": a.model}, f, indent=1)
    if agent.router is not None:
        flags = {k: getattr(a, k) for k in ("model", "env", "routing", "num_experts", "router_window", "router_hidden",
                                            "router_layers", "max_steps", "history", "action_format")}
        torch.save({"state": agent.router.state_dict(), "flags": flags, "tau": tau, "hidden_size":
                    agent.lm.config.hidden_size}, os.path.join(folder, "router.pt"))
    if a.model == "tiny":  # built in code: its weights go with the adapters, without the experts' wrappers
        trained = {name for name, w in agent.lm.named_parameters() if w.requires_grad}  # experts, token routers
        weights = {key.replace(".base.", "."): w for key, w in agent.lm.state_dict().items() if key not in trained}
        agent.lm.save_pretrained(os.path.join(folder, "base"), state_dict=weights)
        agent.tok.save_pretrained(os.path.join(folder, "base"))
    base, tiny = ("base", " (pamoe.py's `tiny`: weights in `base/`, tokenizer via PreTrainedTokenizerFast, not "
                  "AutoTokenizer)") if a.model == "tiny" else (a.model, "")
    vllm_ranks = [x for x in (8, 16, 32, 64, 128, 256, 320, 512) if x >= r]  # the values vLLM's max_lora_rank takes
    vllm = (f"with vLLM multi-LoRA (`enable_lora=True, max_loras={K}, max_lora_rank={vllm_ranks[0]}`)" if vllm_ranks
            else f"with a server that takes rank {r} (vLLM's max_lora_rank stops at 512)")
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(f"""# PA-MoE experts of {a.resume} (iteration {it})

Base `{a.model}`{tiny}; {a.routing} routing; {K} PEFT LoRA adapter(s) `expert_A`..`expert_{LETTERS[K - 1]}`, rank {r},
alpha {a.alpha}, on {a.targets}. One expert with PEFT:

    peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained("{base}"), "expert_A")

All experts {vllm}: one adapter per request, the router's choice for that environment step. `router.pt` (phase, trajectory): `state` of
`pamoe.StepHead(hidden_size, {K}, router_hidden, router_layers)`, sizes and prompt flags in `flags`. It reads
frozen-base features (adapters off: `pamoe.StepFeatures`) of the last {a.router_window} steps and the goal's token
states; the step's expert is argmax softmax(logits / {tau:.3f}) (trajectory routing: at the episode's first step only).
""")
    print(f"exported {K} expert(s) of {a.resume} (iteration {it}) to {folder}")


def use_checkpoint(agent):
    """--eval_only and --export: the checkpoint's trained agent, used as it is."""
    a, tau_state = agent.args, {"updates": 0}
    it = load_checkpoint(a.resume, agent, None, tau_state)
    tau = tau_at(tau_state["updates"], a.tau_start, a.tau_end, a.tau_steps)
    if a.export and rank_world()[0] == 0:
        export_experts(agent, a.export, it, tau)
    return report_evaluation(agent, it, tau) if a.eval_only else {}


# --- Checkpoints (atomic) and the training loop -----------------------------------------------------------------------
def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def save_checkpoint(path, agent, opt, iteration, tau_state):
    """Rank 0 writes the trained state (the same on every rank) and every rank's RNG streams; the others wait."""
    state = {"trainable": agent.trainable_state(), "optimizer": opt.state_dict(), "iteration": iteration,
             "tau_updates": tau_state["updates"], "rng": all_gather(rng_state()), "world_size": rank_world()[1],
             "args": dataclasses.asdict(agent.args)}
    if rank_world()[0] == 0:
        tmp = f"{path}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint intact
    if dist.is_initialized():
        dist.barrier()


# the flags that define what a checkpoint holds (`tiny` builds its frozen base from --env, --seed and the format steps)
MODEL_FLAGS = ("model", "env", "seed", "tiny_steps", "tiny_prior", "routing", "num_experts", "rank", "dense_rank",
               "alpha", "targets", "router_hidden", "router_layers")


def read_checkpoint(path):
    """The state a checkpoint holds; a file that is none stops the run with the fix."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)  # RNG states stay CPU tensors
    except Exception as e:  # whatever these bytes are (or no file at all), they are no checkpoint
        state = e
    need(isinstance(state, dict) and {"trainable", "optimizer", "iteration", "tau_updates", "args", "rng",
                                         "world_size"} <= set(state),
         f"--resume {path}: not a PA-MoE checkpoint; point it at the checkpoint.pt in a run's --out_dir")
    return state


def load_checkpoint(path, agent, opt, tau_state):
    """The trained state into agent and tau_state; with an optimizer (training goes on) also its state and every
    rank's RNG streams. Returns the checkpoint's iteration."""
    state = read_checkpoint(path)
    a = dataclasses.asdict(agent.args)
    differ = [f"--{k} {state['args'].get(k)} (this run: {a[k]})" for k in MODEL_FLAGS if state["args"].get(k) != a[k]]
    need(not differ, f"--resume {path} was trained with {', '.join(differ)}; resume with the flags it was trained with")
    shapes = {n: t.shape for n, t in agent.trainable_state().items()}
    need(shapes == {n: t.shape for n, t in state["trainable"].items()}, f"--resume {path}: its tensors do not fit "
         f"this model although the flags match (another version of pamoe.py?); start a new run")
    agent.load_state_dict(state["trainable"], strict=False)
    tau_state["updates"] = state["tau_updates"]
    if opt is None:
        return state["iteration"]
    (rank, world), saved_world = rank_world(), state["world_size"]
    need(saved_world == world, f"--resume {path} was written by {saved_world} processes and this run has {world}: "
         f"resume with as many (torchrun --nnodes x --nproc_per_node; plain python for 1)")
    need(state["iteration"] < agent.args.iterations, f"--resume {path} is at iteration {state['iteration']} already; "
         f"raise --iterations (now {agent.args.iterations}) to continue, or evaluate it with --eval_only")
    opt.load_state_dict(state["optimizer"])
    rng = state["rng"][rank]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["iteration"]


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start_run(args, agent, opt, tau_state):
    """Fresh run: remove the out_dir's old logs. Resume: load the checkpoint and drop what the logs hold of the
    iterations after it (metrics lines, evaluation reports). Returns the iteration to continue from."""
    files = {name: os.path.join(args.out_dir, name) for name in ("metrics.jsonl", "eval.log")}
    start = load_checkpoint(args.resume, agent, opt, tau_state) if args.resume else 0
    if rank_world()[0] == 0 and not args.resume:
        for path in files.values():
            if os.path.exists(path):
                os.remove(path)
    elif rank_world()[0] == 0:
        keep_until(files["metrics.jsonl"], start, lambda line: json.loads(line)["iteration"])
        keep_until(files["eval.log"], start, lambda line: int(line.split("]")[0][len("[iteration "):])
                   if line.startswith("[iteration ") else None)
    return start


def keep_until(path, start, iteration_of):
    """Keep the lines of a log that belong to iterations <= start: iteration_of(line) is the iteration a line begins
    (None: the line belongs to the one before it)."""
    if not os.path.exists(path):
        return
    kept, it = [], 0
    with open(path) as f:
        for line in f:
            begins = iteration_of(line)
            it = it if begins is None else begins
            if it <= start:
                kept.append(line)
    with open(path, "w") as f:
        f.writelines(kept)


def log_metrics(out_dir, m):
    """One line of metrics.jsonl (rank 0)."""
    if rank_world()[0] == 0:
        with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({k: float(v) if k != "iteration" else v for k, v in m.items()}) + "\n")


def train(args):
    """One process, or one rank under torchrun (each steps its share of the lanes; rank 0 alone writes files)."""
    cuda, rank = args.device == "cuda", rank_world()[0]
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ:  # started by torchrun: join the group of all ranks (CUDA tensors over NCCL)
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    seed_everything(args.seed)  # the same model, experts, router and critic on every rank
    agent = Agent(args, device)
    if args.eval_only or args.export:
        return use_checkpoint(agent)
    opt = torch.optim.AdamW(agent.param_groups(), weight_decay=args.weight_decay)
    lrs, tau_state = {g["name"]: g["lr"] for g in opt.param_groups}, {"updates": 0}
    torch.manual_seed(args.seed + rank)  # and from here one sampling stream per rank
    start = start_run(args, agent, opt, tau_state)
    saved, ckpt_path = args.resume, os.path.join(args.out_dir, "checkpoint.pt")  # saved: the last good checkpoint
    if start == 0 and args.eval_every:  # the frozen base's own success: where every routing mode starts
        log_metrics(args.out_dir, {"iteration": 0, **report_evaluation(agent, 0, args.tau_start)})
    lanes, last = my_lanes(args.num_envs), {}
    env_batch = envs.make_env_batch(args.env, len(lanes), args.max_steps, "train", args.alfworld_data)
    with contextlib.closing(env_batch):  # workers end with the run, however it ends
        bar = tqdm(range(start + 1, args.iterations + 1), initial=start, total=args.iterations, desc="PA-MoE",
                   dynamic_ncols=True, file=sys.stdout, disable=rank > 0)
        for it in bar:
            t0 = time.time()
            for g in opt.param_groups:  # --anneal_lr: linear decay to lr / iterations in the last iteration
                g["lr"] = lrs[g["name"]] * (1 - (it - 1) / args.iterations if args.anneal_lr else 1)
            tau = tau_at(tau_state["updates"], args.tau_start, args.tau_end, args.tau_steps)
            seeds = [args.seed * 1_000_003 + it * args.num_envs + n for n in lanes]
            S = rollout(agent, env_batch, seeds, tau, args.temperature, greedy_router=False)
            t_roll = time.time() - t0
            G = gather_steps(S, lanes)  # every rank's steps, for the statistics
            evaluating = args.eval_every and (it % args.eval_every == 0 or it == args.iterations)
            try:
                B = prepare_batch(agent, S)
                t_prep = time.time() - t0 - t_roll
                diagnostics = expert_diagnostics(agent, S, B) if evaluating else {}  # before the update changes them
                stats = {**ppo_update(agent, opt, S, B, tau_state), **diagnostics}
            except NonFiniteError as e:  # nothing of this iteration is written: the last checkpoint stays good
                fix = f"continue from the last good checkpoint with --resume {saved}" if saved else "rerun"
                raise SystemExit(f"pamoe.py: error: iteration {it}: {e} is not finite; stopped before writing anything "
                                 f"of it. Lower the learning rates (or --max_grad_norm) and {fix}") from e
            m = {"iteration": it, **episode_metrics(G, rollout_stats(G, args.num_envs), args.experts[0],
                                                    envs.TASK_COLUMNS[args.env]), **stats,
                 "resp_len_mean": np.mean(G["resp_len"]), "resp_len_max": max(G["resp_len"]), "env_steps": len(G["k"]),
                 "rollout_s": t_roll, "prepare_s": t_prep, "update_s": time.time() - t0 - t_roll - t_prep,
                 "iteration_s": time.time() - t0}
            m.update(sps=m["env_steps"] / m["iteration_s"], **(report_evaluation(agent, it, stats["tau"]) if evaluating
                                                               else {}))
            log_metrics(args.out_dir, m)
            if it % args.ckpt_every == 0 or it == args.iterations:
                save_checkpoint(ckpt_path, agent, opt, it, tau_state)
                saved = ckpt_path
            bar.set_postfix(success=f"{m['success']:.2f}", ret=f"{m['return']:.1f}", kl=f"{m['kl']:.3f}",
                            switches=f"{m['switches']:.1f}")
            last = m
    return last


def main(argv=None):
    args = parse_args(argv)
    try:
        return train(args)
    except envs.EnvWorkerError as e:  # metrics lines are whole iterations, checkpoints atomic: nothing half-written
        ckpt = os.path.join(args.out_dir, "checkpoint.pt")
        raise SystemExit(f"pamoe.py: error: {e}. The unfinished iteration was not logged and {ckpt} (if any) is "
                         f"intact: fix or remove that game, then rerun with --resume {ckpt}") from e
    finally:
        if dist.is_initialized():  # torchrun's group, which train joined
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
