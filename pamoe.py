"""PA-MoE: Phase-Aware Mixture of Experts for agentic RL, in one file (arXiv 2602.17038).

A frozen causal LM carries K LoRA experts. A lightweight phase router picks ONE expert per
environment step from frozen-base features of the observation, the goal and the last few steps;
every token of that step's response comes from that expert, and PPO with a turn-level critic trains
experts, router and critic together. A soft temporal-consistency penalty keeps the router from
switching without reason, so that experts can specialise on behavioural phases (find, take,
transform, carry, place) instead of on the frequent, easy tasks.

Run:
    bash run.sh                      # CPU: toy env + `tiny`; CUDA: ALFWorld + Qwen2.5-1.5B
    python pamoe.py --routing token  # ablations: phase (default) | token | trajectory | dense
    python pamoe.py --resume runs/pamoe/checkpoint.pt --eval_only --show 2  # or --export DIR
    torchrun --nproc_per_node 8 pamoe.py ...  # data parallel
    python pamoe.py --help           # every flag

The file runs in the method's order: the arguments; the method (model and LoRA experts, router,
the pure algorithm functions, rollout, update, training loop); the plumbing (data parallel,
checkpoints); using a trained agent (metrics, evaluation, --show, --export); main.

Departures from the paper, one line each (FINDINGS.md has the evidence):
- PPO with a turn-level critic and GAE (the brief), not GiGPO; the critic has its own encoder.
- The router learns straight-through (gates = onehot + p - stopgrad(p)); the paper does not say how.
- Behaviour information: the router also maximises lambda_i I(k; verb of the previous action).
- Load balance: Switch Transformer's K sum_k f_k P_k, lambda_b 0.01 (paper: sum_k (P_k - 1/K)^2).
- Router input [observation ; goal context ; LSTM state]; the LSTM reads [observation ; previous
  action] features.
- Token routing (the LoRA-MoE baseline) trains its per-layer routers through the gate value.
- No diversity term.
- ALFWorld: one alfworld 0.4.2 worker process per environment; 32 environments on one GPU; HF
  generate, not vLLM.
- CPU demo only: action numbers as answers; `tiny` warmed up on noisy-solver episodes (a weak
  prior); router and critic LSTM 64 x 1 (paper 256 x 3); lr 1e-3, clip 0.3, entropy 0.01,
  learning rates annealed linearly.
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
from transformers import GenerationConfig, StaticCache

import envs

# ==================================================================================================
# Arguments
# ==================================================================================================


def arg(default, help_text):
    return field(default=default, metadata={"help": help_text})


def need(ok, message):
    """A bad input stops the run at once: one line that names the flag, the value and the fix."""
    if not ok:
        raise SystemExit(f"pamoe.py: error: {message}")


@dataclass
class Args:
    # run
    env: str = arg("toy", "environment: toy | alfworld")
    train_tasks: str = arg(
        "",
        "toy: task types of the training episodes, comma-separated (default all; evaluation: all)",
    )
    toy_variant: str = arg(
        "demo",
        "toy: demo (the CPU demo's) | conflict (closer to ALFWorld: task types that want different "
        "answers in one state; envs.py)",
    )
    alfworld_data: str = arg(
        "", "alfworld: games folder (default $ALFWORLD_DATA): official, or envs.py's mini set"
    )
    eval_split: str = arg(
        "eval_in_distribution",
        "alfworld: eval_in_distribution (seen) | eval_out_of_distribution",
    )
    model: str = arg(
        "tiny", "`tiny` (built from a config, no download), a Hugging Face name or path"
    )
    device: str = arg("auto", "auto | cpu | cuda")
    dtype: str = arg(
        "auto",
        "weights of the frozen base: auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16",
    )
    seed: int = arg(1, "seeds the model build, the env episodes and every sampler")
    out_dir: str = arg(
        "runs/pamoe", "where metrics.jsonl, eval.log, checkpoint.pt (and eval.json) go"
    )
    resume: str = arg(
        "", "a checkpoint: continue it to --iterations, or use it with --eval_only / --export"
    )
    eval_only: bool = arg(
        False, "evaluate --resume into <out_dir>/eval.json, train nothing (other flags: trained)"
    )
    show: int = arg(0, "with --eval_only: print this many whole evaluation episodes, step by step")
    export: str = arg("", "write --resume's experts as PEFT LoRA adapters (and its router) here")
    iterations: int = arg(60, "training iterations (one rollout + one PPO update each)")
    num_envs: int = arg(32, "environments stepped in lockstep per iteration (one episode each)")
    max_steps: int = arg(
        15, "step limit per episode (truncation, bootstrapped; paper, ALFWorld: 50)"
    )
    history: int = arg(0, "past observation/action pairs in the prompt (paper: 2; the toy: none)")
    max_prompt_tokens: int = arg(
        2048, "prompt limit: the oldest history is dropped to fit, then the left is cut"
    )
    action_format: str = arg(
        "label", "label (number of an admissible action) | tagged (<think>/<action>)"
    )
    max_new_tokens: int = arg(1, "response length limit per step (512 for the tagged format)")
    tiny_steps: int = arg(
        400, "`tiny` only: supervised warm-up steps of the base before it is frozen"
    )
    tiny_prior: float = arg(
        0.15, "`tiny`: the toy solver's share of the warm-up's answers (0, and on ALFWorld: none)"
    )
    temperature: float = arg(1.0, "rollout sampling temperature (also the one of PPO log-probs)")
    eval_temperature: float = arg(0.4, "evaluation sampling temperature")
    eval_every: int = arg(
        10, "evaluate every N iterations, before the first and after the last; 0 = never"
    )
    eval_episodes: int = arg(128, "evaluation episodes, on a fixed set of seeds")
    ckpt_every: int = arg(10, "checkpoint every N iterations (and after the last)")
    # experts
    routing: str = arg(
        "phase",
        "phase | token | trajectory | dense (the paper's granularity ablation) | task_oracle | "
        "phase_oracle (the expert is the task type's, or the toy's hidden phase's; no router)",
    )
    num_experts: int = arg(4, "K: LoRA experts")
    rank: int = arg(32, "r: LoRA rank of each expert")
    alpha: float = arg(64.0, "LoRA alpha; the update is scaled by alpha / r")
    dense_rank: int = arg(
        0, "rank of the single expert with --routing dense (0 = --rank; K*rank matches size)"
    )
    targets: str = arg(
        "q_proj,k_proj,v_proj,o_proj", "comma-separated names of the linear layers given experts"
    )
    # router
    router_window: int = arg(5, "L: past steps read by the router's recurrent encoder")
    router_hidden: int = arg(64, "LSTM units of the router and critic encoders (paper: 256)")
    router_layers: int = arg(1, "LSTM layers of the router and critic encoders (paper: 3)")
    tau_start: float = arg(2.0, "router softmax temperature at the start")
    tau_end: float = arg(0.5, "router softmax temperature after --tau_steps router updates")
    tau_steps: int = arg(3000, "router updates over which tau is annealed linearly")
    switch_coef: float = arg(0.05, "lambda_s: temporal-consistency (soft switch) penalty")
    balance: str = arg("switch", "load balance loss: switch (Switch Transformer) | sq (paper)")
    balance_coef: float = arg(
        0.01, "lambda_b: weight of the balance loss (switch: the usual 1e-2; paper's sq: 1e-3)"
    )
    info_coef: float = arg(
        10.0, "lambda_i: weight of I(expert; previous action's verb), maximised (0: paper)"
    )
    # advantages
    advantage: str = arg(
        "gae",
        "gae (a critic, turn-level GAE) | grpo | gigpo (critic-free, within game groups: the "
        "paper's pipeline)",
    )
    group_size: int = arg(
        1, "G: environments per game group, each playing the same game (grpo, gigpo: >= 2; paper 8)"
    )
    adv_norm: str = arg(
        "mean_std",
        "grpo, gigpo: within a group, mean_std ((x - mean) / (std + 1e-6)) | mean (x - mean)",
    )
    step_weight: float = arg(1.0, "gigpo: w, the weight of the step (anchor-state) advantage")
    gamma: float = arg(0.95, "discount per environment step")
    gae_lambda: float = arg(0.95, "GAE lambda")
    # PPO
    clip: float = arg(0.3, "PPO clip range (paper pipeline: 0.2)")
    clip_c: float = arg(
        0.0, "dual clip: the loss of a token with A < 0 is at most -c A (verl: 3; > 1); 0 = off"
    )
    rspo: bool = arg(
        False, "RSPO: each step's ratio times stopgrad(max(exp(-router shift), --rspo_floor))"
    )
    rspo_floor: float = arg(
        0.8, "RSPO's gamma_min (public re-implementations: 0.8; the paper's value is unverified)"
    )
    kl_coef: float = arg(0.01, "KL to the reference policy (experts off), k3 estimator")
    ent_coef: float = arg(0.01, "entropy bonus (paper pipeline: 0.001)")
    vf_coef: float = arg(0.5, "value loss weight")
    epochs: int = arg(1, "PPO epochs over each rollout")
    minibatches: int = arg(
        0,
        "PPO minibatches per epoch, fixed (equal optimiser steps across runs); 0 = by --minibatch",
    )
    minibatch: int = arg(
        32, "environment steps per minibatch, at most (the rollout is cut into equal minibatches)"
    )
    micro_batch: int = arg(
        0, "steps per forward/backward in a minibatch (gradient accumulation); 0 = the minibatch"
    )
    compile_decode: bool = arg(
        False,
        "CUDA: a static KV cache and transformers' compiled decode step (CUDA graphs), batches "
        "filled to --num_envs; off until bench.py gpu-rollout shows it samples what eager does",
    )
    grad_ckpt: bool = arg(
        False,
        "activation checkpointing of the base's decoder layers: less memory, one more forward",
    )
    max_grad_norm: float = arg(1.0, "gradient clip, per parameter group")
    lr_experts: float = arg(1e-3, "learning rate of the LoRA experts (paper, 1.5B: 1e-6)")
    lr_router: float = arg(1e-4, "learning rate of the router (paper: 1e-4)")
    lr_critic: float = arg(1e-3, "learning rate of the critic")
    anneal_lr: bool = arg(
        True, "learning rates decay linearly to 0 over --iterations (cleanrl; paper: constant)"
    )
    weight_decay: float = arg(0.01, "AdamW weight decay")
    task_norm: bool = arg(
        False,
        "gae: whiten advantages within each task type, not over the whole batch (a per-task scale, "
        "as PopArt; a remedy for interference that does not route)",
    )
    diagnose_until: int = arg(
        0, "the mechanism diagnostics (occupancy, conflict) at every iteration up to N too"
    )

    def validate(self, games=True):
        """Every flag by its meaning, before any model loads. games=False: a run that plays no game
        (bench.py preflight) needs no ALFWorld data, unless `tiny` warms up on its episodes."""
        for name, valid in CHOICES.items():
            value = getattr(self, name)
            need(value in valid, f"unknown --{name} {value!r}; use {' | '.join(valid)}")
        for name, interval in RANGES.items():
            value = getattr(self, name)
            need(
                within(value, interval),
                f"--{name} {value} is out of range; use a value in {interval}",
            )
        need(
            self.toy_variant == "demo" or self.env == "toy",
            f"--toy_variant {self.toy_variant} is a variant of the toy env; drop it or use "
            f"--env toy",
        )
        need(
            not self.train_tasks or self.env == "toy",
            "--train_tasks chooses the toy's task types; drop it or use --env toy",
        )
        unknown = (
            set(self.train_tasks.split(",")) - set(envs.TASK_TYPES) if self.train_tasks else ()
        )
        need(
            not unknown,
            f"--train_tasks {self.train_tasks}: no task type {', '.join(sorted(unknown))}; use "
            f"some of {','.join(envs.TASK_TYPES)}",
        )
        need(
            self.routing != "phase_oracle" or self.env == "toy",
            "--routing phase_oracle reads the toy's hidden phase; use --env toy",
        )
        if self.env == "alfworld":
            need(
                importlib.util.find_spec("alfworld") is not None,
                "--env alfworld needs the alfworld package: pip install alfworld==0.4.2 "
                "(bash run.sh installs it)",
            )
            self.alfworld_data = self.alfworld_data or os.environ.get("ALFWORLD_DATA", "")
            error = envs.alfworld_data_error(self.alfworld_data, ("train", self.eval_split))
            need(
                error is None or not (games or self.model == "tiny"),
                f"--alfworld_data {self.alfworld_data!r}: {error}",
            )
        # combinations that cannot work, sizes that exhaust memory, paths that cannot be used
        n = max(self.num_envs, self.eval_episodes)  # a rollout's steps all stay in memory
        need(
            n * self.max_steps <= 100_000,
            f"--num_envs/--eval_episodes {n} x --max_steps {self.max_steps} steps per rollout "
            f"would exhaust memory; keep the product <= 100000",
        )
        need(
            self.eval_episodes or not self.eval_every,
            f"--eval_episodes 0 with --eval_every {self.eval_every} evaluates nothing; "
            f"set --eval_episodes >= 1 or --eval_every 0",
        )
        # torchrun's processes share the environments and the evaluation episodes
        world = rank_world()[1]
        evaluated = self.eval_episodes if self.eval_every else world
        need(
            min(self.num_envs, evaluated) >= world,
            f"--num_envs {self.num_envs} and --eval_episodes {self.eval_episodes}: too few for "
            f"{world} processes; use >= {world}",
        )
        task_types = len(envs.TASK_COLUMNS[self.env])
        need(
            self.routing != "task_oracle" or self.num_experts >= task_types,
            f"--routing task_oracle gives each of the {task_types} task types its expert: use "
            f"--num_experts >= {task_types}",
        )
        need(
            not self.task_norm or self.advantage == "gae",
            f"--task_norm whitens GAE advantages per task type; --advantage {self.advantage} "
            f"normalises within game groups already: drop one of them",
        )
        need(
            self.advantage == "gae" or self.group_size >= 2,
            f"--advantage {self.advantage} normalises returns within game groups: a group of one "
            f"would turn raw returns into advantages; use --group_size >= 2 (paper: 8)",
        )
        need(
            self.num_envs % (self.group_size * world) == 0,
            f"--num_envs {self.num_envs} is not a multiple of --group_size {self.group_size} x "
            f"{world} processes: a game group never spans processes; use a multiple of "
            f"{self.group_size * world}",
        )
        need(
            self.clip_c == 0 or self.clip_c > 1,
            f"--clip_c {self.clip_c}: the dual clip bounds a negative advantage's loss at -c A, "
            f"which needs c > 1; use 0 (off) or e.g. 3 (verl)",
        )
        need(
            not self.rspo or self.routing != "dense",
            "--rspo weighs ratios by how far the router moved; dense routing has no router: drop "
            "--rspo or use --routing phase, trajectory or token",
        )
        need(
            self.action_format == "label" or self.max_new_tokens >= 16,
            f"--max_new_tokens {self.max_new_tokens} cannot hold a tagged answer "
            f"(<think></think><action>1</action>: ~15 tokens); use >= 16 (paper: 512)",
        )
        need(
            all(t.isidentifier() for t in self.targets.split(",")),
            f"--targets {self.targets!r}: give module names separated by commas only, "
            f"e.g. q_proj,v_proj",
        )
        a_path = self.model.startswith(("/", ".")) or os.path.exists(self.model)
        need(
            not a_path or os.path.isdir(self.model),
            f"--model {self.model}: no such folder; give a model folder, a Hugging Face name "
            f"or tiny",
        )
        folders = [("out_dir", self.out_dir)]
        if self.export:
            folders.append(("export", self.export))
        for flag, folder in folders:
            with contextlib.suppress(OSError):  # one that cannot be created stops below
                os.makedirs(folder, exist_ok=True)
            need(
                os.path.isdir(folder) and os.access(folder, os.W_OK),
                f"--{flag} {folder!r}: not a folder that can be created and written; "
                f"choose another one",
            )
        need(
            not self.show or self.eval_only,
            f"--show {self.show} prints episodes of an evaluation: add --eval_only "
            f"--resume <checkpoint>",
        )
        need(
            not (self.eval_only and self.eval_episodes == 0),
            "--eval_only with --eval_episodes 0 evaluates nothing; set --eval_episodes >= 1",
        )
        need(
            self.action_format == "label" or self.model != "tiny",
            "--action_format tagged with --model tiny: tiny's words are the toy's and cannot "
            "write the tags; use the label format with tiny, or a pretrained model for tags",
        )
        need(
            not self.compile_decode or not self.token_routed,
            "--compile_decode: token routing records each token's choice, which a CUDA graph's "
            "replay would overwrite; drop --compile_decode for --routing token",
        )
        need(
            not self.export or not self.token_routed,
            "--export: token routing picks an expert per token and layer, which no per-request "
            "adapter can serve; export a phase, trajectory or dense run",
        )
        need(
            not self.resume or os.path.isfile(self.resume),
            f"--resume {self.resume}: no such file; point it at a checkpoint.pt or drop the flag",
        )
        need(
            self.device != "cuda" or torch.cuda.is_available(),
            "--device cuda but no CUDA device is visible; use --device cpu (or auto)",
        )
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        return self

    # The routing mode, decided once: what every other part asks of it.
    @property
    def experts(self):
        """(K, rank) as built: dense routing is one expert."""
        if self.routing == "dense":
            return 1, self.dense_rank or self.rank
        return self.num_experts, self.rank

    @property
    def token_routed(self):
        """Each token picks its expert in every wrapped layer (LoRA-MoE), not one per step."""
        return self.routing == "token"

    @property
    def step_router(self):
        """A learnt router picks each step's expert (phase, trajectory); dense always takes A."""
        return self.routing in ("phase", "trajectory")

    @property
    def routes_every_step(self):
        """The router decides at every step (phase), not once per episode (trajectory)."""
        return self.routing == "phase"

    @property
    def oracle(self):
        """The expert of a step is given by the environment (task type or hidden phase)."""
        return self.routing in ("task_oracle", "phase_oracle")

    @property
    def has_critic(self):
        """GAE needs a critic; grpo and gigpo are critic-free."""
        return self.advantage == "gae"


# Valid values of every numeric flag: "[" and "]" include the bound, "(" and ")" exclude it, so
# nan and inf never pass. Sizes are bounded generously, far above what fits one GPU;
# --num_experts by the letters A..P of the tables.
RANGES = {
    "seed": "[0, 4294967295]",
    "iterations": "[0, inf)",
    "num_envs": "[1, 4096]",
    "max_steps": "[1, 1000]",
    "history": "[0, 1000]",
    "max_prompt_tokens": "[64, 131072]",
    "max_new_tokens": "[1, 8192]",
    "tiny_steps": "[0, 100000]",
    "tiny_prior": "[0, 1]",
    "temperature": "(0, inf)",
    "eval_temperature": "(0, inf)",
    "eval_every": "[0, inf)",
    "eval_episodes": "[0, 4096]",
    "show": "[0, 4096]",
    "ckpt_every": "[1, inf)",
    "num_experts": "[1, 16]",
    "rank": "[1, 1024]",
    "alpha": "(0, inf)",
    "dense_rank": "[0, 16384]",
    "router_window": "[1, 1000]",
    "router_hidden": "[1, 4096]",
    "router_layers": "[1, 16]",
    "tau_start": "(0, inf)",
    "tau_end": "(0, inf)",
    "tau_steps": "[1, inf)",
    "switch_coef": "[0, inf)",
    "balance_coef": "[0, inf)",
    "info_coef": "[0, inf)",
    "gamma": "[0, 1]",
    "gae_lambda": "[0, 1]",
    "clip": "(0, 1)",
    "kl_coef": "[0, inf)",
    "ent_coef": "[0, inf)",
    "vf_coef": "[0, inf)",
    "epochs": "[1, 100]",
    "minibatch": "[1, 4096]",
    "max_grad_norm": "(0, inf)",
    "lr_experts": "[0, 1]",
    "lr_router": "[0, 1]",
    "lr_critic": "[0, 1]",
    "weight_decay": "[0, 1]",
    "micro_batch": "[0, 4096]",
    "group_size": "[1, 4096]",
    "step_weight": "[0, inf)",
    "clip_c": "[0, inf)",
    "rspo_floor": "[0, 1]",
    "diagnose_until": "[0, inf)",
    "minibatches": "[0, 4096]",
}
CHOICES = {
    "env": envs.ENVS,
    "eval_split": ("eval_in_distribution", "eval_out_of_distribution"),
    "device": ("auto", "cpu", "cuda"),
    "action_format": tuple(envs.ANSWER),
    "routing": ("phase", "token", "trajectory", "dense", "task_oracle", "phase_oracle"),
    "balance": ("switch", "sq"),
    "dtype": ("auto", "float32", "bfloat16"),
    "advantage": ("gae", "grpo", "gigpo"),
    "toy_variant": tuple(envs.TOY_VARIANTS),
    "adv_norm": ("mean_std", "mean"),
}
LETTERS = "ABCDEFGHIJKLMNOP"  # expert names in tables, metrics and exports


def within(x, interval):
    lo, hi = map(float, interval[1:-1].split(","))
    above = lo <= x if interval[0] == "[" else lo < x
    below = x <= hi if interval[-1] == "]" else x < hi
    return above and below


def boolean(text):
    if text.lower() not in ("true", "false", "1", "0", "on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; use true or false")
    return text.lower() in ("true", "1", "on")


# Where and how to evaluate or export a checkpoint: with --eval_only or --export every other flag
# is the checkpoint's.
USE_FLAGS = (
    "resume eval_only show export eval_split eval_episodes eval_temperature out_dir device dtype "
    "alfworld_data"
).split()


def parse_args(argv=None, games=True):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS
    )
    for f in dataclasses.fields(Args):
        kind = boolean if isinstance(f.default, bool) else type(f.default)
        help_text = f"{f.metadata['help']} (default: {f.default!r})"
        if kind is boolean:  # --flag alone: true
            parser.add_argument(f"--{f.name}", type=kind, help=help_text, nargs="?", const=True)
        else:
            parser.add_argument(f"--{f.name}", type=kind, help=help_text)
    # only the flags on the command line; Args fills in the defaults
    given = vars(parser.parse_args(argv))
    if given.get("eval_only") or given.get("export"):
        given = trained_flags(given)
    return Args(**given).validate(games)


def trained_flags(given):
    """--eval_only / --export: the flags the checkpoint was trained with, but for USE_FLAGS given on
    the command line (--out_dir: the checkpoint's folder unless given; --device: auto unless
    given). A given flag that contradicts the checkpoint stops the run: the agent is what it was
    trained as."""
    need(
        given.get("resume"),
        "--eval_only and --export use a trained agent: add --resume <out_dir>/checkpoint.pt",
    )
    trained = read_checkpoint(given["resume"])["args"]
    names = {f.name for f in dataclasses.fields(Args)}
    trained = {k: v for k, v in trained.items() if k in names}  # drop another version's flags
    differ = [
        f"--{k} {v} (trained: {trained.get(k)})"
        for k, v in given.items()
        if k not in USE_FLAGS and trained.get(k) != v
    ]
    need(
        not differ,
        f"--resume {given['resume']} was trained with other flags: {', '.join(differ)}; "
        f"drop them (--eval_only and --export take the checkpoint's)",
    )
    where = {"device": "auto", "out_dir": os.path.dirname(given["resume"]) or "."}
    use = {k: v for k, v in given.items() if k in USE_FLAGS}
    return {**trained, **where, **use}


# ==================================================================================================
# The method
# ==================================================================================================


# --- Model: a frozen causal LM with K LoRA experts on the target linears --------------------------
def load_model(args, device):
    """The frozen base and its tokenizer: `tiny` built and warmed up here, anything else loaded."""
    if args.dtype != "auto":
        dtype = getattr(torch, args.dtype)  # of the frozen base; trained parts stay float32
    elif device.type == "cuda":
        dtype = torch.bfloat16
    else:
        dtype = torch.float32
    if args.model == "tiny":
        vocabulary = envs.vocabulary(args.env, variant=args.toy_variant)
        model, tok = envs.build_tiny(vocabulary, args.seed)
        envs.pretrain_tiny(
            model,
            tok,
            env=args.env,
            seed=args.seed,
            steps=args.tiny_steps,
            prior=args.tiny_prior,
            prompt_format=prompt_format(args),
            alfworld_data=args.alfworld_data,
            variant=args.toy_variant,
        )
    else:
        model, tok = load_pretrained(args.model, dtype)
    return freeze_base(model, tok, args.model, device, dtype)


def freeze_base(model, tok, name, device, dtype):
    """A causal LM and its tokenizer made the frozen base: a pad token, left truncation, only the
    special tokens of its generation config, no gradient, eval mode, on device in dtype."""
    need(
        tok.pad_token or tok.eos_token,
        f"--model {name}: its tokenizer has neither a pad nor an eos token; add one "
        f"(tokenizer.add_special_tokens) and pass the saved folder as --model",
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.truncation_side = "left"  # an over-long prompt loses its start, never its actions
    # Sample what PPO scores: generate fills every setting it is not given from the model's own
    # generation config (Qwen2.5-Instruct ships repetition_penalty 1.1, top_k 20, top_p 0.8),
    # which response_logprobs never applies. Only the special tokens are kept; `generate`
    # states every sampling setting.
    model.generation_config = GenerationConfig(
        bos_token_id=model.generation_config.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model.requires_grad_(False)  # base weights frozen
    model.eval()  # dropout off, for rollouts and PPO alike
    return model.to(device=device, dtype=dtype), tok


def load_pretrained(name, dtype):
    """A Hugging Face causal LM and its tokenizer; what cannot load stops with the fix."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # no such folder or name, no network, no weights, not a causal LM, no tokenizer
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        tok = envs.saved_tiny_tokenizer(name) or AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        first_line = str(e).splitlines()[0]
        raise SystemExit(
            f"pamoe.py: error: --model {name}: cannot load it as a causal LM with its tokenizer "
            f"({first_line}); give a Hugging Face causal LM name (online, or cached with "
            f"HF_HUB_OFFLINE=1), a folder that holds one, or tiny"
        ) from e
    return model, tok


def prompt_format(args):
    """How a step's prompt is written (envs.fit_prompt)."""
    return envs.PromptFormat(
        history=args.history,
        max_steps=args.max_steps,
        action_format=args.action_format,
        max_prompt_tokens=args.max_prompt_tokens,
    )


class Routing:
    """Shared by every LoRAExperts of a model: what the next forward pass routes to."""

    def __init__(self):
        self.on = False  # False: adapters off (frozen features, the reference policy)
        self.gates = None  # (B, 1, K) step gates for phase / trajectory / dense routing
        self.token_probs = []  # token routing: per-layer (B, T, K) router probabilities
        self.token_choices = []  # and the chosen experts (B, T)

    @contextlib.contextmanager
    def __call__(self, gates=None):
        """`with routing(gates):` runs the experts with step gates (or, with gates None, the token
        routers); it nests."""
        outer = self.on, self.gates
        self.on = True
        self.gates = gates
        self.token_probs = []
        self.token_choices = []
        try:
            yield self
        finally:
            self.on, self.gates = outer


class LoRAExperts(nn.Module):
    """A frozen nn.Linear plus K LoRA experts, stacked so that one pass serves a batch where every
    sequence (or token) has its own expert:

        y = W x + (alpha/r) * ((x A_cat) * m) B_cat

    A_cat = [A_1 .. A_K] (in, K*r), B_cat = [B_1; ..; B_K] (K*r, out), m the gates of each expert
    repeated r times. Each expert's A_k (in, r) and B_k (r, out) is a parameter of its own, as K
    separate adapters are: an optimiser step skips the experts that no step routed to (`chosen`,
    read by drop_unrouted_gradients), so they keep their weights and AdamW state."""

    def __init__(self, base, num_experts, rank, alpha, routing, token_routing):
        super().__init__()
        self.base = base
        self.routing = routing
        self.K = num_experts
        self.r = rank
        self.scale = alpha / rank
        A = torch.empty(num_experts, rank, base.in_features)
        for a in A:  # each expert initialised like nn.Linear; B zero: experts start as no-ops
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.A = nn.ParameterList(nn.Parameter(a.T.contiguous()) for a in A)  # K x (in, r)
        B = [torch.zeros(rank, base.out_features) for _ in range(num_experts)]
        self.B = nn.ParameterList(nn.Parameter(b) for b in B)  # K x (r, out)
        self.router = None
        if token_routing:
            self.router = nn.Linear(base.in_features, num_experts, bias=False)
        # the experts a forward pass with gradient routed to, since the minibatch began
        self.register_buffer("chosen", torch.zeros(num_experts, dtype=torch.bool), persistent=False)

    def forward(self, x):
        y = self.base(x)
        if not self.routing.on:
            return y
        gates = self.routing.gates  # (B, 1, K)
        if self.router is not None:  # token routing: each token picks its expert, top-1 x gate
            probs = F.softmax(self.router(x.float()), dim=-1)  # (B, T, K)
            choice = probs.argmax(-1)  # (B, T)
            gates = F.one_hot(choice, self.K) * probs
            self.routing.token_probs.append(probs)
            self.routing.token_choices.append(choice)
        if torch.is_grad_enabled():
            self.chosen |= gates.detach().flatten(0, -2).ne(0).any(0)  # (K,)
        h = x.float() @ torch.cat(list(self.A), dim=1)  # (B, T, K*r): all experts at once
        # Per-phase masked backprop: the columns of unrouted experts are multiplied by 0 here, so
        # their A and B get exactly zero gradient; only tokens routed to expert k train it.
        m = (self.scale * gates).repeat_interleave(self.r, dim=-1)  # (B, 1 or T, K*r); alpha/r
        h = h * m
        return y + (h @ torch.cat(list(self.B))).to(y.dtype)


def attach_experts(model, args):
    """Wrap every target linear in LoRAExperts; returns the shared Routing and the experts."""
    routing = Routing()
    names = set(args.targets.split(","))
    K, r = args.experts
    wrapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in names and isinstance(child, nn.Linear):
                experts = LoRAExperts(child, K, r, args.alpha, routing, args.token_routed)
                wrapped.append(experts)
                setattr(parent, name, experts.to(child.weight.device))
    need(
        wrapped,
        f"--targets {args.targets}: no nn.Linear of these names in {args.model}; "
        f"name its linear layers",
    )
    return routing, nn.ModuleList(wrapped)


def checkpoint_layers(model):
    """--grad_ckpt: each decoder layer keeps only its input for backward and runs again there
    (non-reentrant torch checkpointing: gradients reach the experts in the frozen layers, in eval
    mode too). The replay reads the routing of its moment, so backward must run inside the
    `with routing(gates)` of its forward pass (ppo_update's does)."""
    layers = getattr(model.base_model, "layers", None)
    need(
        isinstance(layers, nn.ModuleList),
        f"--grad_ckpt: {type(model).__name__} has no decoder layers at base_model.layers; "
        f"drop --grad_ckpt",
    )

    def wrap(forward):  # checkpointed where autograd records; plain in no-grad passes
        def checkpointed(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            return checkpoint(
                forward, *args, use_reentrant=False, preserve_rng_state=False, **kwargs
            )

        return checkpointed

    for layer in layers:
        layer.forward = wrap(layer.forward)


@torch.no_grad()
def encode_texts(model, tok, texts, device):
    """Frozen step features: final hidden states of the base model with adapters off,
    layer-normalised. Returns token states (B, T, d) and their mask (B, T)."""
    batch = tok(
        texts,
        padding=True,
        padding_side="right",
        return_tensors="pt",
        add_special_tokens=False,
    ).to(device)
    hidden = model.base_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask
    ).last_hidden_state
    return F.layer_norm(hidden.float(), hidden.shape[-1:]), batch.attention_mask.bool()


def mean_pool(states, mask):
    return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


# --- Phase router and critic: one step encoder class, separate parameters -------------------------
class StepHead(nn.Module):
    """Frozen step features -> out_dim outputs (router logits, or a value).
    window (B, L, 2d): [observation ; previous action] features of the last L steps, zeros before
    the episode; goal (B, G, d) token states of the goal text with mask (B, G)."""

    def __init__(self, d, out_dim, hidden, layers, heads=4):
        super().__init__()
        self.d = d
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.lstm = nn.LSTM(2 * d, hidden, layers, batch_first=True)
        self.head = nn.Sequential(
            nn.Linear(2 * d + hidden, 512),
            nn.LayerNorm(512),
            nn.ReLU(),
            nn.Linear(512, out_dim),
        )

    def forward(self, window, goal, goal_mask):
        obs = window[:, -1, : self.d]  # (B, d) the current observation
        # the observation attends the goal's tokens: (B, 1, d)
        context, _ = self.attn(obs[:, None], goal, goal, key_padding_mask=~goal_mask)
        _, (h, _) = self.lstm(window)  # h: (layers, B, hidden)
        return self.head(torch.cat([obs, context[:, 0], h[-1]], dim=-1))


def router_probs(router, window, goal, goal_mask, tau):
    """p_t = softmax(logits / tau)  (B, K)."""
    return F.softmax(router(window, goal, goal_mask).float() / tau, dim=-1)


def step_gates(probs, k):
    """Hard top-1 gates (B, 1, K) for chosen experts k (B,), straight-through: the forward value is
    the one-hot choice, the backward pass flows through p (onehot + p - stopgrad(p))."""
    onehot = F.one_hot(k, probs.shape[-1]).to(probs.dtype)
    return (onehot + (probs - probs.detach()))[:, None]  # value exactly one-hot


INVALID_PENALTY = 0.1  # reward lost by an answer that is no admissible action (paper: 0.1)


# --- Pure algorithm functions ---------------------------------------------------------------------
def tau_at(update, tau_start, tau_end, tau_steps):
    """Router temperature annealed linearly from tau_start to tau_end over tau_steps updates."""
    return tau_start + (tau_end - tau_start) * min(update / tau_steps, 1.0)


def gae(rewards, values, next_values, terminated, dones, gamma, lam):
    """Generalised advantage estimation over environment steps (turn level). All inputs are
    (episodes, steps) float tensors: next_values[t] is V(s_{t+1}), for a truncated last step V of
    the final observation; terminated[t] = 1 stops bootstrapping; dones[t] = 1 (terminated or
    truncated, or padding) stops the recursion.
        delta_t = r_t + gamma (1 - term_t) V(s_{t+1}) - V(s_t)
        A_t = delta_t + gamma lam (1 - done_t) A_{t+1}
    Returns advantages and returns (A + V)."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        bootstrap = gamma * (1 - terminated[:, t]) * next_values[:, t]
        delta = rewards[:, t] + bootstrap - values[:, t]
        last = delta + gamma * lam * (1 - dones[:, t]) * last
        advantages[:, t] = last
    return advantages, advantages + values


def masked_mean(x, mask):
    if not mask.any():
        raise ValueError("masked_mean over an empty mask")
    return torch.where(mask, x, 0).sum() / mask.sum()


def whiten(x, mask):
    """(x - mean) / std, both over the entries in mask of all ranks."""
    n = global_sum(mask.sum())
    mean = global_sum(torch.where(mask, x, 0).sum()) / n
    std = (global_sum(torch.where(mask, (x - mean) ** 2, 0).sum()) / n).sqrt()
    return torch.where(mask, (x - mean) / (std + 1e-8), 0)


def ppo_policy_loss(logp, old_logp, adv, mask, clip, clip_c=0.0, weight=None):
    """Clipped surrogate, token-mean over the response tokens in `mask`, as verl computes it:
        r_t = exp(clamp(log pi - log pi_old, -20, 20)) w_t
        L = mean_t max(-A_t r_t, -A_t clip(r_t, 1 - eps, 1 + eps))
    and with the dual clip (clip_c = c > 1; Ye et al. 2020, verl's default 3) a token with A_t < 0
    costs at most -c A_t, however large its ratio. w_t: RSPO's router-shift weight, else 1.
    logp, old_logp, adv, mask, weight: (B, T). Returns L, the clip fraction and the approximate
    KL(old || new)."""
    log_ratio = torch.where(mask, logp - old_logp, 0).clamp(-20, 20)
    ratio = log_ratio.exp()
    if weight is not None:
        ratio = ratio * weight
    surrogate = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    if clip_c:
        surrogate = torch.where(adv < 0, torch.min(surrogate, -adv * clip_c), surrogate)
    clipfrac = masked_mean(((ratio - 1).abs() > clip).float(), mask)
    return masked_mean(surrogate, mask), clipfrac, masked_mean(-log_ratio, mask)


def router_shift_weight(logp_new, logp_old, floor):
    """RSPO (arXiv 2510.23027): the weight of an importance ratio, stopgrad(max(exp(-d), floor)),
    d = mean over routing layers of |log p_new(k) - log p_old(k)| at the expert k the rollout
    chose. logp_new, logp_old (..., layers): a step router has one layer."""
    shift = (logp_new - logp_old).abs().mean(-1)
    return torch.exp(-shift).clamp(min=floor).detach()


def kl_k3(logp, ref_logp, mask):
    """KL(pi || pi_ref) per token with the k3 estimator exp(r) - r - 1, r = log pi_ref - log pi;
    token-mean."""
    r = torch.where(mask, ref_logp - logp, 0)
    return masked_mean(r.exp() - r - 1, mask)


def group_normalise(x, groups, use_std, singleton_baseline):
    """Each value of x (n,) against the values of its group (groups (n,) integer ids), as verl-agent
    normalises them: mean_std (use_std) (x - mean_g) / (std_g + 1e-6) with the unbiased std
    (torch.std), or mean x - mean_g. A group of one value has std 1 and the mean 0
    (singleton_baseline False: GRPO's episode groups, the raw score) or the value itself (True:
    GiGPO's anchor groups, advantage 0). Equal values give 0."""
    out = torch.empty_like(x)
    for g in groups.unique():
        members = groups == g
        values = x[members]
        if len(values) > 1:
            mean, std = values.mean(), values.std()
        elif singleton_baseline:
            mean, std = values[0], 1.0
        else:
            mean, std = 0.0, 1.0
        centred = values - mean
        out[members] = centred / (std + 1e-6) if use_std else centred
    return out


def episode_returns(rewards, episodes):
    """Each step's episode total of rewards (n,), for steps of episodes (n,) integer ids."""
    totals = torch.zeros(int(episodes.max()) + 1).index_add_(0, episodes, rewards)
    return totals[episodes]


def grpo_advantages(env_rewards, invalid, episodes, games, use_std):
    """GRPO's advantage of each step, as verl-agent computes it for multi-turn episodes: a step's
    score is its episode's return (10 per win) minus the invalid-answer penalty of that step alone;
    scores are normalised within their game group over every step (verl-agent's default
    compute_mean_std_cross_steps: a longer episode weighs more). env_rewards, invalid (n,) float,
    episodes, games (n,) integer ids."""
    scores = episode_returns(env_rewards, episodes) - INVALID_PENALTY * invalid
    return group_normalise(scores, games, use_std, singleton_baseline=False)


def discounted_returns(rewards, episodes, gamma):
    """R_t = r_t + gamma R_t+1 within each episode, from its last step backwards; rewards (n,) with
    each episode's steps in order."""
    returns = torch.empty_like(rewards)
    running = defaultdict(float)
    for i in reversed(range(len(rewards))):
        e = int(episodes[i])
        running[e] = rewards[i] + gamma * running[e]
        returns[i] = running[e]
    return returns


def anchor_groups(games, observations):
    """GiGPO's anchor states: one integer id per (game group, current observation text), so that
    the steps of one game group whose observations are identical share a group, wherever they
    occur (several times in one episode included)."""
    ids = {}
    keys = zip(games.tolist(), observations)
    return torch.tensor([ids.setdefault(key, len(ids)) for key in keys])


def gigpo_advantages(env_rewards, invalid, episodes, games, observations, gamma, w, use_std):
    """GiGPO (Feng et al. 2025) as verl-agent computes it: A = A_episode + w A_step. A_episode is
    grpo_advantages; A_step is the discounted return from the step (env rewards, then minus that
    step's own invalid-answer penalty, not discounted into earlier steps), normalised within its
    anchor group (anchor_groups; a group of one step gives 0)."""
    step_returns = discounted_returns(env_rewards, episodes, gamma) - INVALID_PENALTY * invalid
    anchors = anchor_groups(games, observations)
    step_adv = group_normalise(step_returns, anchors, use_std, singleton_baseline=True)
    return grpo_advantages(env_rewards, invalid, episodes, games, use_std) + w * step_adv


def switch_penalty(p, p_next, valid):
    """Soft temporal consistency: mean over consecutive steps (t, t+1) of one episode of
    1 - sum_k p_t,k p_t+1,k. p, p_next: (B, K); valid: (B,) true where step t+1 exists.
    0 for constant one-hot routing."""
    if not valid.any():
        return p.sum() * 0
    return masked_mean(1 - (p * p_next).sum(-1), valid)


def balance_loss(p, k, mode):
    """Load balance of routing decisions: router probabilities p (N, K), chosen experts k (N,);
    P_k = mean_n p_n,k.
    switch: K sum_k f_k P_k, f_k the hard share of decisions routed to k, no gradient (Switch
            Transformer, Fedus et al. 2021; GShard, Mixtral); 1 at uniform load, K when one
            expert takes everything;
    sq:     sum_k (P_k - 1/K)^2 (the paper's form)."""
    K = p.shape[-1]
    P = p.mean(0)
    if mode == "sq":
        return ((P - 1 / K) ** 2).sum()
    f = torch.bincount(k, minlength=K).to(p.dtype) / len(k)
    return K * (f * P).sum()


def group_logratio(p, groups):
    """log(P_g / P) (N, K) for each item: P_g the mean router probabilities of the items of its
    group (groups (N,) integer ids), P the mean over all items. sum_k p_k log(P_g,k / P_k),
    averaged over items, is the mutual information I(k; g) of the soft expert choice and the group;
    held fixed, these log-ratios give the surrogate mean_n sum_k p_n,k log(P_g(n),k / P_k) whose
    gradient is exactly that of I (I's terms through P_g and P cancel:
    dI/dp_n,k = (log P_g(n),k + 1 - log P_k - 1) / N)."""
    G = int(groups.max()) + 1
    P_g = torch.zeros(G, p.shape[1], dtype=p.dtype, device=p.device).index_add_(0, groups, p)
    P_g = P_g / torch.bincount(groups).clamp(min=1)[:, None]  # (G, K)
    return P_g[groups].clamp(min=1e-12).log() - p.mean(0).clamp(min=1e-12).log()  # (N, K)


def balance_share(p, P, k, mode, n):
    """One part's share of balance_loss over a batch of n decisions cut into parts (gradient
    accumulation): p (n_i, K) the part's probabilities; P (K,) and k (n,) the whole batch's mean
    probabilities and choices. balance_loss sees the probabilities only through P = mean p, so the
    parts' gradients sum to the batch loss's gradient exactly."""
    P = P.detach().requires_grad_()
    (dP,) = torch.autograd.grad(balance_loss(P[None], k, mode), P)  # (K,) at the whole batch's P
    return (dP * p.sum(0)).sum() / n


# response tokens whose float32 (chunk, V) logits exist at once: 0.16 GB per copy at V = 152k
LOGIT_CHUNK = 256


def token_logp_entropy(hidden, head, targets, temperature):
    """log pi(y) and the entropy of pi = softmax(head(h) / temperature) (2, N), for rows h of hidden
    (N, d) and targets y (N,). In chunks of LOGIT_CHUNK rows, each checkpointed: its float32
    (chunk, V) logits exist while it is computed and again in its backward, never for all N rows;
    nothing of size V is kept in between."""

    def chunk(h, y):
        logp_all = F.log_softmax(head(h).float() / temperature, dim=-1)  # (chunk, V)
        logp = logp_all.gather(-1, y[:, None])[:, 0]
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return torch.stack([logp, entropy])

    parts = zip(hidden.split(LOGIT_CHUNK), targets.split(LOGIT_CHUNK))
    return torch.cat([checkpoint(chunk, h, y, use_reentrant=False) for h, y in parts], dim=1)


# --- The agent: frozen LM + experts + router + critic ---------------------------------------------
class Agent(nn.Module):
    """The frozen LM with its experts, the router and the critic. base: a (model, tokenizer) pair
    already frozen (freeze_base) instead of --model's (bench.py's random-weight models)."""

    def __init__(self, args, device, base=None):
        super().__init__()
        self.args = args
        self.device = device
        self.lm, self.tok = base if base is not None else load_model(args, device)
        self.prompt_format = prompt_format(args)
        self.clock = Clock(device)
        self.caches, self.gate_buffers = {}, {}  # --compile_decode: one of each per batch size
        torch.manual_seed(args.seed)  # experts, router and critic start alike, built or loaded
        self.routing, self.experts = attach_experts(self.lm, args)
        if args.grad_ckpt:
            checkpoint_layers(self.lm)
        d, K = self.lm.config.hidden_size, args.experts[0]
        hidden, layers = args.router_hidden, args.router_layers
        self.router = None
        if args.step_router:
            self.router = StepHead(d, K, hidden, layers).to(device)
        self.critic = None  # grpo and gigpo are critic-free
        if args.has_critic:
            self.critic = StepHead(d, 1, hidden, layers).to(device)

    def param_groups(self):
        a = self.args
        groups = [
            ("experts", list(self.experts.parameters()), a.lr_experts),
            ("router", list(self.router.parameters()) if self.router else [], a.lr_router),
            ("critic", list(self.critic.parameters()) if self.critic else [], a.lr_critic),
        ]
        return [{"name": n, "params": p, "lr": lr} for n, p, lr in groups if p]

    def static_cache(self, batch_size):
        """--compile_decode: one static KV cache per batch size (prompt + response long), reset and
        reused by every call, so that the compiled decode step keeps its shapes."""
        if batch_size not in self.caches:
            length = self.args.max_prompt_tokens + self.args.max_new_tokens
            self.caches[batch_size] = StaticCache(config=self.lm.config, max_cache_len=length)
        self.caches[batch_size].reset()
        return self.caches[batch_size]

    def fixed_gates(self, gates, batch_size):
        """--compile_decode: gates (b, 1, K) copied into one buffer (batch_size, 1, K) per batch
        size, the rows beyond b on expert A: a CUDA graph reads its inputs at fixed addresses."""
        if batch_size not in self.gate_buffers:
            self.gate_buffers[batch_size] = torch.zeros(
                batch_size, 1, gates.shape[-1], device=gates.device
            )
        buffer = self.gate_buffers[batch_size]
        buffer.zero_()
        buffer[:, 0, 0] = 1
        buffer[: len(gates)] = gates
        return buffer

    def trainable_state(self):
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def response_logprobs(self, seqs, prompt_lens, resp_lens, temperature, gates, experts_on=True):
        """Log-probs (B, T) and entropies (B, T) of each response token at the sampling temperature,
        from one plain forward over prompt + response (right-padded), and the mask (B, T) of real
        response tokens. gates (B, 1, K), or None for token routing."""
        pad_id = self.tok.pad_token_id
        ids = nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=pad_id)
        ids = ids.to(self.device)
        ones = [torch.ones(len(s), dtype=torch.long) for s in seqs]
        attention = nn.utils.rnn.pad_sequence(ones, batch_first=True).to(self.device)
        routed = self.routing(gates) if experts_on else contextlib.nullcontext()
        with routed:
            hidden = self.lm.base_model(
                input_ids=ids, attention_mask=attention, use_cache=False
            ).last_hidden_state
        mask, b, pos = response_positions(prompt_lens, resp_lens, self.device)
        head = self.lm.get_output_embeddings()
        logp, entropy = token_logp_entropy(hidden[b, pos], head, ids[b, pos + 1], temperature)
        blank = torch.zeros(mask.shape, device=self.device)
        return blank.masked_scatter(mask, logp), blank.masked_scatter(mask, entropy), mask

    def response_router_probs(self, prompt_lens, resp_lens):
        """Token routing: every layer's router probabilities (n, layers, K) at the positions that
        predict the n real response tokens of the last pass (in response_logprobs' order)."""
        _, b, pos = response_positions(prompt_lens, resp_lens, self.device)
        return torch.stack([probs[b, pos] for probs in self.routing.token_probs], 1)


def response_positions(prompt_lens, resp_lens, device):
    """Right-padded prompt + response sequences: the mask (B, T) of real response tokens, and for
    the n real ones the sequence b (n,) of each and the position pos (n,) that predicts it."""
    starts = torch.tensor(prompt_lens, device=device)
    j = torch.arange(max(resp_lens), device=device)
    lengths = torch.tensor(resp_lens, device=device)
    mask = j[None] < lengths[:, None]  # (B, T)
    b = mask.nonzero(as_tuple=True)[0]  # (n,)
    pos = (starts[:, None] + j[None] - 1)[mask]  # (n,)
    return mask, b, pos


# --- Where an iteration's time goes -------------------------------------------------------------
class Clock:
    """Seconds spent in named parts of an iteration (prefill, decode, env, features, ...). On CUDA
    each span is a pair of CUDA events, read after one synchronisation at the end (no host sync
    inside the loop); on the CPU, perf_counter."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.spans = defaultdict(list)
        self.counts = defaultdict(int)

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextlib.contextmanager
    def __call__(self, name):
        start = self.now()
        yield
        self.spans[name].append((start, self.now()))

    def generation(self, start, mark):
        """A generate call that began at start: prefill until the first token's logits (mark),
        decode after it; its decode steps and generated tokens counted."""
        self.spans["prefill"].append((start, mark.first))
        self.spans["decode"].append((mark.first, self.now()))
        self.counts["decode_steps"] += mark.calls - 1
        self.counts["generated"] += mark.calls * mark.batch

    def read(self):
        """{name_s: seconds} and the counts since the last read, which starts the next span."""
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for name, spans in self.spans.items():
            if self.cuda:
                out[f"{name}_s"] = sum(s.elapsed_time(e) for s, e in spans) / 1000
            else:
                out[f"{name}_s"] = sum(e - s for s, e in spans)
        out.update(self.counts)
        self.spans.clear()
        self.counts.clear()
        return out


class DecodeMark:
    """A logits processor that changes nothing: it marks the first token's logits (the end of the
    prefill) on the clock and counts the tokens sampled."""

    def __init__(self, clock):
        self.clock = clock
        self.calls = 0
        self.batch = 0
        self.first = None

    def __call__(self, input_ids, scores):
        if self.calls == 0:
            self.first = self.clock.now()
            self.batch = len(input_ids)
        self.calls += 1
        return scores


# --- Rollout: N envs in lockstep, one routing decision and one generated response per env step ----


class StepFeatures:
    """A rollout's frozen step features: a table whose row 0 is zeros (before an episode's start),
    then one row [observation ; previous action] (2d,) per lane and step; window(n, t) indexes lane
    n's rows of steps t-L+1..t."""

    def __init__(self, agent, N):
        self.agent = agent
        self.rows = [torch.zeros(2 * agent.lm.config.hidden_size, device=agent.device)]
        self.lane_rows = [[] for _ in range(N)]

    def add(self, lanes, obs, last_action):
        lm, tok, device = self.agent.lm, self.agent.tok, self.agent.device
        obs_features = mean_pool(*encode_texts(lm, tok, [obs[n] for n in lanes], device))  # (A, d)
        action_features = torch.zeros_like(obs_features)
        acted = [i for i, n in enumerate(lanes) if last_action[n]]
        if acted:
            texts = [last_action[lanes[i]] for i in acted]
            action_features[acted] = mean_pool(*encode_texts(lm, tok, texts, device))
        for n, row in zip(lanes, torch.cat([obs_features, action_features], -1)):
            self.lane_rows[n].append(len(self.rows))
            self.rows.append(row)

    def window(self, n, t):
        L = self.agent.args.router_window
        return [self.lane_rows[n][s] if s >= 0 else 0 for s in range(t - L + 1, t + 1)]

    def table(self):
        return torch.stack(self.rows)  # (rows, 2d)


def generate(agent, prompts, gates, temperature, batch_size=None, experts_on=True):
    """One sampled response per prompt with the experts of gates (B, 1, K) (None: token routing),
    with only the sampling settings stated here (load_model cleared the model's own); a tagged
    answer ends at its `</action>` (transformers' stop strings, checked on the device).
    --compile_decode with batch_size: the batch is filled up to batch_size with copies of the first
    prompt (on expert A), so that every call has one shape and reuses one static KV cache, one
    gates buffer and one compiled decode step. Returns per prompt (prompt ids, response ids up to
    the EOS or the end of the tagged answer, response text), and for token routing each response's
    most chosen expert over layers and tokens (tables only), else None. The prefill and decode
    times go to agent.clock. experts_on False: the frozen base alone (the reference policy)."""
    a, tok = agent.args, agent.tok
    n = len(prompts)
    static = a.compile_decode and batch_size is not None
    if static:
        prompts = prompts + [prompts[0]] * (batch_size - n)
        gates = agent.fixed_gates(gates, batch_size)
    enc = tok(
        prompts,
        padding=True,
        padding_side="left",
        truncation=True,
        max_length=a.max_prompt_tokens,
        return_tensors="pt",
        add_special_tokens=False,
    ).to(agent.device)
    P = enc.input_ids.shape[1]
    mark = DecodeMark(agent.clock)
    settings = dict(
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=a.max_new_tokens,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        logits_processor=[mark],
    )
    stop = "</action>" if a.action_format == "tagged" else None  # a tagged answer ends with it
    if stop:
        settings.update(stop_strings=[stop], tokenizer=tok)
    if static:
        settings.update(past_key_values=agent.static_cache(batch_size))
    start = agent.clock.now()
    with agent.routing(gates) if experts_on else contextlib.nullcontext():
        out = agent.lm.generate(**enc, **settings)
    agent.clock.generation(start, mark)
    voted = None
    if a.token_routed:  # count each expert's choices over layers and tokens: (B, K)
        K = a.experts[0]
        chosen = [F.one_hot(c, K).reshape(n, -1, K) for c in agent.routing.token_choices]
        voted = torch.cat(chosen, 1).sum(1).argmax(-1)
    samples = []
    for i in range(n):
        response = out[i, P:].cpu()
        # the sampled EOS or stop kept, padding dropped
        response = response[: envs.response_length(response.tolist(), tok, stop)]
        prompt = enc.input_ids[i][enc.attention_mask[i].bool()].cpu()
        samples.append((prompt, response, tok.decode(response, skip_special_tokens=True)))
    return samples, voted


def choose(p, greedy):
    """Experts (B,) from router probabilities p (B, K): the argmax (evaluation) or a sample."""
    if greedy:
        return p.argmax(-1)
    return torch.multinomial(p, 1)[:, 0]


def oracle_expert(args, info):
    """task_oracle: the index of the step's task type; phase_oracle: the index of the toy's hidden
    phase, the last expert taking the phases beyond K."""
    if args.routing == "task_oracle":
        return envs.TASK_COLUMNS[args.env].index(info["task_type"])
    return min(envs.PHASES.index(info["phase"]), args.num_experts - 1)


def record(steps, **fields):
    """Append one step's fields to the rollout's per-step lists."""
    for key, value in fields.items():
        steps[key].append(value)


class Lanes:
    """N episodes played in lockstep: each lane's observation and info, its prompt history, its
    previous action and that action's verb ("" before the first, <invalid> after a bad answer)."""

    def __init__(self, first):  # first: env_batch.reset's (observation, info) per lane
        self.obs, self.infos = map(list, zip(*first))
        N = len(self.obs)
        self.history = [[] for _ in range(N)]
        self.last_action = [""] * N
        self.last_verb = [""] * N
        self.done = [False] * N
        self.truncated = [False] * N  # ended by the step limit

    def live(self):
        return [n for n, done in enumerate(self.done) if not done]

    def prompt(self, n, t, tok, prompt_format):
        """Lane n's prompt at step t."""
        return envs.fit_prompt(tok, prompt_format, self.infos[n], self.obs[n], self.history[n], t)

    def advance(self, n, action, invalid, result):
        """Lane n took `action` (its answer's text if invalid) and env_batch.step gave result."""
        next_obs, _, terminated, truncated, info = result
        self.history[n].append((self.obs[n], action))
        self.last_action[n] = action
        self.last_verb[n] = "<invalid>" if invalid else action.split()[0]
        self.obs[n] = next_obs
        self.infos[n] = info
        self.done[n] = terminated or truncated
        self.truncated[n] = truncated


@torch.no_grad()
def rollout(agent, env_batch, seeds, tau, temperature, greedy_router):
    """Play one episode per lane. Returns `steps`: per-step lists (ordered by step, then lane), the
    frozen step-feature table that `window` indexes, the goal token states per lane and, for
    truncated lanes, the window of the final observation (to bootstrap from)."""
    a, device = agent.args, agent.device
    K, N = a.experts[0], len(seeds)
    lanes = Lanes(env_batch.reset(seeds))
    goals = [info["goal"] for info in lanes.infos]
    goal_states, goal_mask = encode_texts(agent.lm, agent.tok, goals, device)
    features = StepFeatures(agent, N)
    expert = torch.zeros(N, dtype=torch.long, device=device)  # each lane's current expert
    expert_p = torch.ones(N, K, device=device) / K  # the router's probabilities it came from
    steps = defaultdict(list)
    for t in range(env_batch.max_steps):
        live = lanes.live()
        if not live:
            break
        with agent.clock("features"):  # the frozen base's features of the step, then the router
            features.add(live, lanes.obs, lanes.last_action)
        live_idx = torch.tensor(live, device=device)
        windows = torch.tensor([features.window(n, t) for n in live], device=device)  # (A, L)
        if a.step_router and (a.routes_every_step or t == 0):  # trajectory: at step 0 only
            goal, mask = goal_states[live_idx], goal_mask[live_idx]
            p = router_probs(agent.router, features.table()[windows], goal, mask, tau)  # (A, K)
            expert[live_idx] = choose(p, greedy_router)
            expert_p[live_idx] = p
        if a.oracle:
            given = [oracle_expert(a, lanes.infos[n]) for n in live]
            expert[live_idx] = torch.tensor(given, device=device)
        prompts = [lanes.prompt(n, t, agent.tok, agent.prompt_format) for n in live]
        gates = step_gates_for(agent, live_idx, expert)  # (A, 1, K); token routing: None
        samples, voted = generate(agent, prompts, gates, temperature, batch_size=N)
        k = expert[live_idx] if voted is None else voted  # dense: expert 0
        actions, invalid = [None] * N, {}
        for i, (n, (prompt, response, text)) in enumerate(zip(live, samples)):
            info = lanes.infos[n]
            command, valid = envs.parse_action(text, info["admissible"])
            actions[n] = command if valid else text
            invalid[n] = not valid
            record(
                steps,
                seq=torch.cat([prompt, response]),
                prompt_len=len(prompt),
                resp_len=len(response),
                lane=n,
                t=t,
                k=int(k[i]),
                router_p=expert_p[n].tolist(),
                window=windows[i].tolist(),
                last_verb=lanes.last_verb[n],
                obs=lanes.obs[n],
                response=text,
                action=command,
                goal=info["goal"],
                phase=env_batch.step_phase(info, command),
                task_type=info["task_type"],
            )
        with agent.clock("env"):
            results = env_batch.step(actions)
        for n in live:
            _, reward, terminated, truncated, info = results[n]
            record(
                steps,
                reward=reward - INVALID_PENALTY * invalid[n],  # the invalid output is counted
                env_reward=reward,
                invalid=invalid[n],
                terminated=terminated,
                truncated=truncated,
                won=info["won"],
            )
            lanes.advance(n, actions[n], invalid[n], results[n])
    truncated = [n for n in range(N) if lanes.truncated[n]]
    if truncated:  # features of the final observation, to bootstrap from at truncation
        features.add(truncated, lanes.obs, lanes.last_action)
    steps["table"] = features.table()
    steps["goal_states"] = goal_states
    steps["goal_mask"] = goal_mask
    final_window = {n: features.window(n, len(features.lane_rows[n]) - 1) for n in truncated}
    steps["final_window"] = final_window
    return dict(steps)


# --- PPO update over one rollout ------------------------------------------------------------------
def step_gates_for(agent, idx, k):
    """Gates (b, 1, K) of stored steps idx as they were in the rollout (no router gradient);
    None for token routing."""
    if agent.args.token_routed:
        return None
    return F.one_hot(k[idx], agent.args.experts[0]).float()[:, None]


def real_tokens(token_probs, seqs):
    """Token routing: each layer's router probabilities (n, K) at the n real tokens of the last
    pass over seqs."""
    ones = [torch.ones(len(s), dtype=torch.bool) for s in seqs]
    real = nn.utils.rnn.pad_sequence(ones, batch_first=True)
    return [probs[real.to(probs.device)] for probs in token_probs]


@torch.no_grad()
def prepare_batch(agent, steps):
    """Per step: its advantage (--advantage), the old and reference log-probs of its response, the
    router's inputs and what its losses pair and group."""
    a, device = agent.args, agent.device
    lanes = torch.tensor(steps["lane"], device=device)
    windows = torch.tensor(steps["window"], device=device)  # (S, L)
    index_of = {(n, t): i for i, (n, t) in enumerate(zip(steps["lane"], steps["t"]))}
    # the step t+1 of the same episode (the switch term's pair), -1 if none
    next_step = [index_of.get((n, t + 1), -1) for n, t in zip(steps["lane"], steps["t"])]
    batch = {
        "windows": windows,
        "lanes": lanes,
        "k": torch.tensor(steps["k"], device=device),
        "next": torch.tensor(next_step, device=device),
        "router_windows": windows,
        "router_p": torch.tensor(steps["router_p"], device=device),  # (S, K) at rollout time
    }
    if a.has_critic:
        batch.update(critic_advantages(agent, steps, lanes, windows))
    else:
        batch["adv"] = group_advantages(steps, a).to(device)
    if not a.routes_every_step:  # trajectory: the router decided once, from the first step
        first = torch.tensor([index_of[(n, 0)] for n in steps["lane"]], device=device)
        batch["router_windows"] = windows[first]
    if a.routes_every_step:
        batch["verb_logratio"] = verb_logratio(steps, device)
    batch.update(old_and_reference_logprobs(agent, steps, batch))
    return batch


def critic_advantages(agent, steps, lanes, windows):
    """--advantage gae: the critic's values, turn-level GAE advantages (whitened over the batch
    of all ranks) and returns (A + V) per step."""
    a, device = agent.args, agent.device
    ts = torch.tensor(steps["t"], device=device)
    N, T = steps["goal_states"].shape[0], int(ts.max()) + 1  # episodes, steps
    table, goal_states, goal_mask = steps["table"], steps["goal_states"], steps["goal_mask"]
    values = agent.critic(table[windows], goal_states[lanes], goal_mask[lanes])[:, 0]

    def grid(x):  # per-step values -> (N, T), zero where an episode has no step t
        x = torch.as_tensor(x, device=device).float()
        return torch.zeros(N, T, device=device).index_put_((lanes, ts), x)

    V = grid(values)
    rewards = grid(steps["reward"])
    terminated = grid(steps["terminated"])
    truncated = grid(steps["truncated"])
    lengths = torch.bincount(lanes, minlength=N)
    valid = torch.arange(T, device=device)[None] < lengths[:, None]  # (N, T)
    next_V = torch.cat([V[:, 1:], torch.zeros(N, 1, device=device)], 1)
    if steps["final_window"]:  # truncation bootstraps from V of the final observation
        cut = torch.tensor(list(steps["final_window"]), device=device)
        final = torch.tensor(list(steps["final_window"].values()), device=device)
        final_V = agent.critic(table[final], goal_states[cut], goal_mask[cut])[:, 0]
        next_V[cut, lengths[cut] - 1] = final_V
    dones = torch.where(valid, torch.maximum(terminated, truncated), 1.0)
    adv, ret = gae(rewards, V, next_V, terminated, dones, a.gamma, a.gae_lambda)
    if a.task_norm:  # each task type's advantages whitened among themselves
        columns = envs.TASK_COLUMNS[a.env]
        task = grid([columns.index(c) for c in steps["task_type"]])
        adv = sum(whiten(adv, valid & (task == c)) for c in range(len(columns)))
    else:
        adv = whiten(adv, valid)
    return {"adv": adv[lanes, ts], "ret": ret[lanes, ts], "values": values}


def group_advantages(steps, a):
    """--advantage grpo | gigpo: critic-free advantages within game groups (the lanes n // G of
    this rank; a group never spans ranks), with no second whitening over the batch."""
    games = torch.tensor([n // a.group_size for n in steps["lane"]])
    episodes = torch.tensor(steps["lane"])
    env_rewards = torch.tensor(steps["env_reward"], dtype=torch.float32)
    invalid = torch.tensor(steps["invalid"], dtype=torch.float32)
    use_std = a.adv_norm == "mean_std"
    if a.advantage == "grpo":
        return grpo_advantages(env_rewards, invalid, episodes, games, use_std)
    observations = steps["obs"]
    return gigpo_advantages(
        env_rewards, invalid, episodes, games, observations, a.gamma, a.step_weight, use_std
    )


def verb_logratio(steps, device):
    """log(P_verb / P) (S, K) of this rank's steps, over the rollout of all ranks: each step's
    previous verb and the router probabilities it was routed with (group_logratio)."""
    parts = all_gather((steps["last_verb"], steps["router_p"]))
    verbs = [v for part_verbs, _ in parts for v in part_verbs]
    vocabulary = {v: i for i, v in enumerate(sorted(set(verbs)))}
    groups = torch.tensor([vocabulary[v] for v in verbs], device=device)
    probs = torch.tensor(sum((p for _, p in parts), []), device=device)
    logratio = group_logratio(probs, groups)  # (all steps, K)
    start = sum(len(part_verbs) for part_verbs, _ in parts[: rank_world()[0]])
    return logratio[start : start + len(steps["last_verb"])]


def old_and_reference_logprobs(agent, steps, batch):
    """Per step, the response's log-probs under the rollout's policy (its experts, old) and under
    the frozen base (experts off, the reference), in batches of similar lengths (less padding)
    whose memory is that of a PPO micro-batch. Token routing with --rspo: also each response
    token's expert per layer and its log-probability under the rollout's routers."""
    a = agent.args
    n_steps = len(steps["seq"])
    out = {"old_logp": [None] * n_steps, "ref_logp": [None] * n_steps}
    if a.rspo and a.token_routed:
        out["old_choice"], out["old_choice_logp"] = [None] * n_steps, [None] * n_steps
    by_length = torch.tensor([len(s) for s in steps["seq"]]).argsort()
    for mb in by_length.split(a.micro_batch or a.minibatch):
        seqs = [steps["seq"][i] for i in mb]
        starts = [steps["prompt_len"][i] for i in mb]
        lengths = [steps["resp_len"][i] for i in mb]
        gates = step_gates_for(agent, mb.to(agent.device), batch["k"])
        routed = agent.response_logprobs(seqs, starts, lengths, a.temperature, gates)[0]
        if "old_choice" in out:  # (n, layers) per response token, before the next pass resets them
            probs = agent.response_router_probs(starts, lengths)  # (n, layers, K)
            choice = probs.argmax(-1)
            choice_logp = probs.gather(-1, choice[..., None])[..., 0].log()
            for i, c, lp in zip(mb.tolist(), choice.split(lengths), choice_logp.split(lengths)):
                out["old_choice"][i] = c
                out["old_choice_logp"][i] = lp
        base = agent.response_logprobs(seqs, starts, lengths, a.temperature, None, experts_on=False)
        for i, lp_old, lp_ref, n in zip(mb.tolist(), routed, base[0], lengths):
            out["old_logp"][i] = lp_old[:n]
            out["ref_logp"][i] = lp_ref[:n]
    return out


def router_losses(agent, steps, batch, mb, tau):
    """The step router on minibatch mb (this rank's steps; means over all ranks): p_t at each step
    and p_t+1 at the next step of the same episode, straight-through gates of the rollout's choices
    k, and its auxiliary losses
        switch  = lambda_s mean_t (1 - sum_k p_t,k p_t+1,k)    temporal consistency (phase)
        balance = lambda_b balance_loss(P, f)                   load balance
        info    = -lambda_i I(k; verb of the previous action)   behaviour information (phase)
    Trajectory routing decides once per episode, from its first step, so it never switches: its
    p_t+1 would be p_t and the switch term 1 - sum_k p_k^2 a sharpening of p weighted by the
    episode's length; it has no switch term.
    With --rspo, the router-shift weight of each step's ratio (router_shift_weight): the update
    replays the rollout's expert choice, so the policy's tokens do not move with the router; the
    weight damps the steps whose routing probability moved (a trust region on the router).
    Returns gates (b, 1, K), {term: loss}, {statistic: value}, the RSPO weights (b,) or None."""
    a = agent.args
    n_steps = global_sum(len(mb))
    lanes, k = batch["lanes"][mb], batch["k"][mb]
    next_step = batch["next"][mb]  # -1: no step t+1
    windows = batch["router_windows"][mb]
    if a.routes_every_step:  # and the next steps' windows, in the same pass
        windows = torch.cat([windows, batch["router_windows"][next_step.clamp(min=0)]])
    goal_lanes = lanes.repeat(len(windows) // len(mb))
    goal, goal_mask = steps["goal_states"][goal_lanes], steps["goal_mask"][goal_lanes]
    probs = router_probs(agent.router, steps["table"][windows], goal, goal_mask, tau)
    p = probs[: len(mb)]
    terms, stats = {}, {}
    if a.routes_every_step:
        has_next = next_step >= 0
        pairs = has_next.sum()
        all_pairs = max(global_sum(int(pairs)), 1)
        switch = shared_sum(switch_penalty(p, probs[len(mb) :], has_next) * pairs / all_pairs)
        terms["switch"] = a.switch_coef * switch
        stats["switch_penalty"] = float(switch.detach())
    P = shared_sum(p.sum(0))[None] / n_steps  # mean router probabilities over all ranks' steps
    balance = balance_loss(P, all_choices(k, p.shape[1]), a.balance)
    terms["balance"] = a.balance_coef * balance
    entropy = -(p * p.clamp(min=1e-12).log()).sum()
    stats["router_entropy"] = global_sum(float(entropy.detach())) / n_steps
    if a.routes_every_step:
        # the rollout's log-ratios log(P_verb / P) held fixed: the gradient of I (group_logratio)
        info = shared_sum((p * batch["verb_logratio"][mb]).sum() / n_steps)
        terms["info"] = -a.info_coef * info
        stats["verb_information"] = float(info.detach())
    shift = None  # RSPO: how far each step's routing probability of its expert moved (b,)
    if a.rspo:
        chosen = k[:, None]
        logp_old = batch["router_p"][mb].gather(1, chosen).log()
        shift = router_shift_weight(p.gather(1, chosen).log(), logp_old, a.rspo_floor)
    return step_gates(p, k), terms, stats, shift


def policy_loss(agent, steps, batch, idx, gates, step_shift=None, pg_only=False):
    """PPO's loss on the response tokens of steps idx, token means (each token carries its step's
    advantage):
        L = clipped surrogate + kl_coef KL_k3(pi || pi_ref) - ent_coef entropy
    gates (b, 1, K), or None for token routing; step_shift (b,): RSPO's weights of a step router.
    Returns L, its statistics (detached, but with pg_only the surrogate itself: the diagnostics'
    gradient), and the number of response tokens."""
    a = agent.args
    seqs = [steps["seq"][i] for i in idx]
    starts = [steps["prompt_len"][i] for i in idx]
    lengths = [steps["resp_len"][i] for i in idx]
    logp, entropy, mask = agent.response_logprobs(seqs, starts, lengths, a.temperature, gates)
    old = nn.utils.rnn.pad_sequence([batch["old_logp"][i] for i in idx], batch_first=True)
    ref = nn.utils.rnn.pad_sequence([batch["ref_logp"][i] for i in idx], batch_first=True)
    adv = batch["adv"][idx][:, None].expand_as(logp)  # (b, T)
    weight = None  # RSPO's router-shift weight of each token's ratio
    if a.rspo and a.token_routed:
        weight = token_router_shift(agent, batch, idx, starts, lengths, mask)
    elif a.rspo:
        weight = step_shift[:, None].expand_as(logp)
    pg_loss, clipfrac, approx_kl = ppo_policy_loss(logp, old, adv, mask, a.clip, a.clip_c, weight)
    kl = kl_k3(logp, ref, mask)
    entropy = masked_mean(entropy, mask)
    ratio = torch.where(mask, logp - old, 0).exp()
    stats = {
        "pg_loss": pg_loss,
        "clipfrac": clipfrac,
        "approx_kl": approx_kl,
        "kl": kl,
        "entropy": entropy,
        "ratio": masked_mean(ratio, mask),
        "ratio_sq": masked_mean(ratio**2, mask),
    }
    if weight is not None:
        stats["rspo_weight"] = masked_mean(weight, mask)
    loss = pg_loss + a.kl_coef * kl - a.ent_coef * entropy
    stats = {k: v.detach() for k, v in stats.items()}
    if pg_only:
        stats["pg_loss"] = pg_loss
    return loss, stats, sum(lengths)


def token_router_shift(agent, batch, idx, starts, lengths, mask):
    """RSPO for token routing: each response token's weight (b, T), from the shift of every layer's
    router at the expert it chose in the rollout (router_shift_weight), read off the pass that
    just ran; the per-layer choices of this pass are recomputed, as in the paper."""
    probs = agent.response_router_probs(starts, lengths)  # (n, layers, K)
    choice = torch.cat([batch["old_choice"][i] for i in idx])  # (n, layers)
    logp_new = probs.gather(-1, choice[..., None])[..., 0].log()
    logp_old = torch.cat([batch["old_choice_logp"][i] for i in idx])
    weight = router_shift_weight(logp_new, logp_old, agent.args.rspo_floor)  # (n,)
    return torch.ones(mask.shape, device=mask.device).masked_scatter(mask, weight)


def token_balance_stats(agent, steps, mb):
    """Token routing over several micro-batches or ranks: each layer's mean router probabilities
    and choices over all tokens of the minibatch (one no-grad pass), so that each micro-batch's
    balance share is that of the whole."""
    seqs = [steps["seq"][i] for i in mb]
    starts = [steps["prompt_len"][i] for i in mb]
    lengths = [steps["resp_len"][i] for i in mb]
    with torch.no_grad():
        agent.response_logprobs(seqs, starts, lengths, agent.args.temperature, None)
    n_tokens = global_sum(sum(map(len, seqs)))
    layers = real_tokens(agent.routing.token_probs, seqs)
    return [
        (global_sum(p.sum(0)) / n_tokens, all_choices(p.argmax(-1), p.shape[1])) for p in layers
    ]


def policy_backward(agent, steps, batch, mb, gates, shift=None):
    """Backward of the policy loss of minibatch mb in micro-batches of --micro_batch steps
    (gradient accumulation), each weighted by its share of the minibatch's response tokens on all
    ranks; token routing adds each layer's balance of its token router. gates: a leaf (b, 1, K)
    cut from the router's graph (its gradient collects there), or None; shift (b,): a step
    router's RSPO weights, or None. Returns token-weighted means of the statistics and the loss
    terms summed over micro-batches."""
    a = agent.args
    tokens = global_sum(sum(steps["resp_len"][i] for i in mb))  # response tokens, all ranks
    parts = torch.arange(len(mb)).split(a.micro_batch or len(mb))
    n_tokens = global_sum(sum(len(steps["seq"][i]) for i in mb))  # prompts too
    token_stats = None
    if a.token_routed and (len(parts) > 1 or dist.is_initialized()):
        token_stats = token_balance_stats(agent, steps, mb)
    mean, checked = defaultdict(float), defaultdict(float)
    for part in parts:
        idx = mb[part]
        part_gates = None if gates is None else gates[part]
        part_shift = None if shift is None else shift[part]
        with agent.routing(part_gates):  # --grad_ckpt replays the layers in backward: route alike
            loss, stats, n_resp = policy_loss(agent, steps, batch, idx, part_gates, part_shift)
            balance = 0
            if a.token_routed:  # this micro-batch's share of every layer's balance
                seqs = [steps["seq"][i] for i in idx]
                probs = real_tokens(agent.routing.token_probs, seqs)  # per layer (n, K)
                stat = token_stats or [(p.detach().mean(0), p.argmax(-1)) for p in probs]
                shares = [
                    balance_share(p, P, c, a.balance, n_tokens) for p, (P, c) in zip(probs, stat)
                ]
                balance = a.balance_coef * torch.stack(shares).mean()
                checked["balance"] += balance.detach()
            (n_resp / tokens * loss + balance).backward()
        for key in ("pg_loss", "kl", "entropy"):
            checked[key] += stats[key]
        for key, val in stats.items():
            mean[key] += n_resp / tokens * float(val)
    totals = global_sum(torch.tensor(list(mean.values()), dtype=torch.float64)).tolist()
    mean = dict(zip(mean, totals))
    mean["ratio_var"] = mean.pop("ratio_sq") - mean.pop("ratio") ** 2
    return mean, checked


def drop_unrouted_gradients(experts):
    """Train only what you route: the gradients of the experts that no forward pass routed to
    since the minibatch began (on any rank; per layer for token routing) are dropped, so that the
    optimiser skips them as it skips a separate adapter without a gradient: no AdamW momentum,
    weight decay or step count moves them."""
    chosen = global_sum(torch.stack([e.chosen for e in experts]).int()) > 0  # (modules, K)
    for e, routed in zip(experts, chosen.tolist()):
        for k in range(e.K):
            if not routed[k]:
                e.A[k].grad = None
                e.B[k].grad = None


def optimizer_step(agent, opt):
    """Sum every rank's share of the gradients (the whole minibatch's gradient on every rank), drop
    those of unrouted experts, clip each parameter group's norm, stop on a nan or inf before it
    trains on, step."""
    for q in agent.parameters():
        if q.grad is not None:
            q.grad = global_sum(q.grad)
    drop_unrouted_gradients(agent.experts)
    norms = {}
    for group in opt.param_groups:
        norm = nn.utils.clip_grad_norm_(group["params"], agent.args.max_grad_norm)
        norms[f"gradient norm of {group['name']}"] = norm
    check_finite(norms)
    opt.step()


def ppo_minibatch(agent, opt, steps, batch, mb, tau):
    """One optimiser step on minibatch mb (this rank's steps): the router's losses and gates, the
    critic's value loss (gae), the policy loss through the LM, backward, step. Returns its
    statistics."""
    a = agent.args
    n_steps = global_sum(len(mb))
    opt.zero_grad(set_to_none=True)
    for e in agent.experts:  # the minibatch's forward passes record the experts they route to
        e.chosen.zero_()
    gates = step_gates_for(agent, mb, batch["k"])
    router_terms, stats, shift = {}, {}, None
    if a.step_router:
        gates, router_terms, stats, shift = router_losses(agent, steps, batch, mb, tau)
    aux_loss = sum(router_terms.values())  # the router's own terms and the critic's loss
    value_loss = None
    if a.has_critic:
        lanes = batch["lanes"][mb]
        goal, goal_mask = steps["goal_states"][lanes], steps["goal_mask"][lanes]
        values = agent.critic(steps["table"][batch["windows"][mb]], goal, goal_mask)[:, 0]
        value_loss = shared_sum(0.5 * ((values - batch["ret"][mb]) ** 2).sum() / n_steps)
        aux_loss = a.vf_coef * value_loss + aux_loss
    # The LM's micro-batches see the gates as a leaf cut from the router's graph; their summed
    # gradient goes through the router once, with the critic's and the router's own terms.
    gates_leaf = None
    if gates is not None:
        gates_leaf = gates.detach().requires_grad_(gates.requires_grad)
    policy_stats, checked = policy_backward(agent, steps, batch, mb, gates_leaf, shift)
    stats.update(policy_stats)
    if value_loss is not None:
        checked["value_loss"] = value_loss
        stats["value_loss"] = float(value_loss.detach())
    check_finite({**checked, **router_terms})
    losses, grads = [], []
    if torch.is_tensor(aux_loss):
        losses.append(aux_loss)
        grads.append(None)
    if gates_leaf is not None and gates_leaf.grad is not None:
        losses.append(gates)
        grads.append(gates_leaf.grad)
    if losses:
        torch.autograd.backward(losses, grads)
    optimizer_step(agent, opt)
    return stats


def ppo_update(agent, opt, steps, batch, tau_state):
    """--epochs of minibatch PPO over one rollout; experts, router and critic step together. Data
    parallel: each rank cuts its share of the steps into the minibatches the whole needs; means,
    statistics and gradients are over all ranks."""
    a = agent.args
    sizes = all_gather(len(steps["seq"]))  # every rank's steps
    n_minibatches = min(a.minibatches or math.ceil(sum(sizes) / a.minibatch), *sizes)
    stats = defaultdict(list)
    for _ in range(a.epochs):
        for mb in torch.randperm(len(steps["seq"])).tensor_split(n_minibatches):
            tau = tau_at(tau_state["updates"], a.tau_start, a.tau_end, a.tau_steps)
            minibatch_stats = ppo_minibatch(agent, opt, steps, batch, mb.to(agent.device), tau)
            tau_state["updates"] += 1
            for key, val in minibatch_stats.items():
                stats[key].append(val)
    trained = {f"parameter {n}": p for n, p in agent.named_parameters() if p.requires_grad}
    check_finite(trained)
    out = {key: float(np.mean(v)) for key, v in stats.items()}
    if a.has_critic:  # how much of the returns' variance the critic explained at rollout time
        values = torch.cat(all_gather(batch["values"].cpu()))
        returns = torch.cat(all_gather(batch["ret"].cpu()))
        out["explained_variance"] = float("nan")
        if returns.var() != 0:
            out["explained_variance"] = float(1 - (returns - values).var() / returns.var())
    else:  # each task type's share of steps with advantage 0 (groups that scored alike): no signal
        zero = (batch["adv"].abs() < 1e-6).tolist()
        by_task = defaultdict(list)
        for part_tasks, part_zero in all_gather((steps["task_type"], zero)):
            for task, is_zero in zip(part_tasks, part_zero):
                by_task[task].append(is_zero)
        out.update({f"zero_adv/{task}": float(np.mean(z)) for task, z in by_task.items()})
    out["tau"] = tau_at(tau_state["updates"], a.tau_start, a.tau_end, a.tau_steps)
    return out


# --- The training loop ----------------------------------------------------------------------------
def train(args):
    """One process, or one rank under torchrun (each steps its share of the lanes; rank 0 alone
    writes files)."""
    device, rank = join_processes(args)
    seed_everything(args.seed)  # the same model, experts, router and critic on every rank
    agent = Agent(args, device)
    if args.eval_only or args.export:
        return use_trained_agent(agent)
    opt = torch.optim.AdamW(agent.param_groups(), weight_decay=args.weight_decay)
    initial_lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    tau_state = {"updates": 0}
    torch.manual_seed(args.seed + rank)  # and from here one sampling stream per rank
    start = start_run(args, agent, opt, tau_state)
    saved = args.resume  # the last good checkpoint
    ckpt_path = os.path.join(args.out_dir, "checkpoint.pt")
    if start == 0 and args.eval_every:  # the frozen base's own success: where every routing starts
        log_metrics(args.out_dir, {"iteration": 0, **report_evaluation(agent, 0, args.tau_start)})
    lanes = my_lanes(args.num_envs)
    tasks = args.train_tasks.split(",") if args.train_tasks else None
    env_batch = envs.make_env_batch(
        args.env, len(lanes), args.max_steps, "train", args.alfworld_data, args.toy_variant, tasks
    )
    last = {}
    with contextlib.closing(env_batch):  # workers end with the run, however it ends
        bar = tqdm(
            range(start + 1, args.iterations + 1),
            initial=start,
            total=args.iterations,
            desc="PA-MoE",
            dynamic_ncols=True,
            file=sys.stdout,
            disable=rank > 0,
        )
        for it in bar:
            t0 = time.time()
            agent.clock.read()  # from here, this iteration's spans
            anneal_learning_rates(opt, initial_lrs, it, args)
            tau = tau_at(tau_state["updates"], args.tau_start, args.tau_end, args.tau_steps)
            seeds = episode_seeds(args, it, lanes)
            steps = rollout(agent, env_batch, seeds, tau, args.temperature, greedy_router=False)
            times = {"rollout_s": time.time() - t0}
            all_steps = gather_steps(steps, lanes)  # every rank's steps, for the statistics
            evaluating = args.eval_every and (it % args.eval_every == 0 or it == args.iterations)
            try:  # a nan or inf stops the run before anything of this iteration is written
                batch = prepare_batch(agent, steps)
                times["prepare_s"] = time.time() - t0 - times["rollout_s"]
                diagnostics = {}
                if evaluating or it <= args.diagnose_until:  # before the update moves anything
                    diagnostics = expert_diagnostics(agent, steps, batch)
                stats = {**ppo_update(agent, opt, steps, batch, tau_state), **diagnostics}
            except NonFiniteError as e:
                raise non_finite_exit(e, it, saved) from e
            times["update_s"] = time.time() - t0 - times["rollout_s"] - times["prepare_s"]
            times.update(agent.clock.read())
            m = iteration_metrics(it, all_steps, stats, times, args, t0)
            if evaluating:
                m.update(report_evaluation(agent, it, stats["tau"]))
            log_metrics(args.out_dir, m)
            if it % args.ckpt_every == 0 or it == args.iterations:
                save_checkpoint(ckpt_path, agent, opt, it, tau_state)
                saved = ckpt_path
            bar.set_postfix(
                success=f"{m['success']:.2f}",
                ret=f"{m['return']:.1f}",
                kl=f"{m['kl']:.3f}",
                switches=f"{m['switches']:.1f}",
            )
            last = m
    return last


def episode_seeds(args, it, lanes):
    """The seed of each lane's episode in iteration it: the G lanes of a game group (n // G) share
    one, so they play the same game (toy: the same episode; alfworld: the same game file)."""
    first = args.seed * 1_000_003 + it * args.num_envs
    return [first + n // args.group_size for n in lanes]


def anneal_learning_rates(opt, initial_lrs, it, args):
    """--anneal_lr: each group's rate decays linearly, to lr / iterations in the last iteration."""
    factor = 1 - (it - 1) / args.iterations if args.anneal_lr else 1
    for group in opt.param_groups:
        group["lr"] = initial_lrs[group["name"]] * factor


def non_finite_exit(error, it, saved):
    """The message that stops a run on a nan or inf: nothing of the iteration was written, the last
    checkpoint is good."""
    fix = f"continue from the last good checkpoint with --resume {saved}" if saved else "rerun"
    return SystemExit(
        f"pamoe.py: error: iteration {it}: {error} is not finite; stopped before writing anything "
        f"of it. Lower the learning rates (or --max_grad_norm) and {fix}"
    )


# ==================================================================================================
# Plumbing
# ==================================================================================================


# --- Data parallel (torchrun): each rank steps its share of the lanes; identities in one process --
def rank_world():
    """This process's rank and the number of processes, as torchrun sets them; (0, 1) without."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def join_processes(args):
    """This process's device and rank; under torchrun, join the group of all ranks (CPU tensors
    over gloo, CUDA tensors over NCCL)."""
    rank = rank_world()[0]
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("cpu:gloo,cuda:nccl" if args.device == "cuda" else "gloo")
    return device, rank


def my_lanes(n):
    """This rank's contiguous share of n lanes (environments or evaluation episodes)."""
    rank, world = rank_world()
    return range(rank * n // world, (rank + 1) * n // world)


def global_sum(x):
    """A tensor or a number summed over all ranks, without gradient: a global count or total."""
    if not dist.is_initialized():
        return x
    if torch.is_tensor(x):
        total = x.detach().clone()
    else:
        total = torch.tensor(float(x), dtype=torch.float64)
    dist.all_reduce(total)
    return total if torch.is_tensor(x) else total.item()


def shared_sum(x):
    """x summed over all ranks, with the gradient of this rank's x only: each rank back-propagates
    its share of a global loss (x / a global count is its share of a global mean)."""
    return global_sum(x.detach()) + (x - x.detach())


def all_choices(k, K):
    """Experts chosen (n,) on this rank -> those of all ranks, sorted (what counting them needs)."""
    counts = global_sum(torch.bincount(k, minlength=K))
    return torch.arange(K, device=k.device).repeat_interleave(counts)


def all_gather(obj):
    """Every rank's obj (any picklable value), in rank order; [obj] in one process."""
    out = [obj] * rank_world()[1]
    if dist.is_initialized():
        dist.all_gather_object(out, obj)
    return out


class NonFiniteError(RuntimeError):
    """A loss term, gradient norm or parameter became nan or inf: stop before training on it."""


def check_finite(named):
    """Raise NonFiniteError naming the first of {name: tensor} that holds a nan or inf on any rank,
    on every rank."""
    bad = torch.stack([~t.detach().isfinite().all() for t in named.values()]).int()
    finite = (global_sum(bad) == 0).tolist()
    if not all(finite):
        raise NonFiniteError(list(named)[finite.index(False)])


# --- Checkpoints (atomic), resume and logs --------------------------------------------------------
def rng_state():
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_checkpoint(path, agent, opt, iteration, tau_state):
    """Rank 0 writes the trained state (the same on every rank) and every rank's RNG streams; the
    others wait."""
    state = {
        "trainable": agent.trainable_state(),
        "optimizer": opt.state_dict(),
        "iteration": iteration,
        "tau_updates": tau_state["updates"],
        "rng": all_gather(rng_state()),
        "world_size": rank_world()[1],
        "args": dataclasses.asdict(agent.args),
    }
    if rank_world()[0] == 0:
        tmp = f"{path}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint intact
    if dist.is_initialized():
        dist.barrier()


# the flags that define what a checkpoint holds (`tiny` builds its base from --env, --seed, ...)
MODEL_FLAGS = (
    "model env toy_variant seed tiny_steps tiny_prior routing num_experts rank dense_rank alpha "
    "targets router_hidden router_layers"
).split()
CHECKPOINT_KEYS = {
    "trainable",
    "optimizer",
    "iteration",
    "tau_updates",
    "args",
    "rng",
    "world_size",
}


def read_checkpoint(path):
    """The state a checkpoint holds; a file that is none stops the run with the fix."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)  # RNG states on the CPU
    except Exception as e:  # whatever these bytes are (or no file at all), no checkpoint
        state = e
    need(
        isinstance(state, dict) and CHECKPOINT_KEYS <= set(state),
        f"--resume {path}: not a PA-MoE checkpoint; point it at the checkpoint.pt in a run's "
        f"--out_dir",
    )
    return state


def load_checkpoint(path, agent, opt, tau_state):
    """The trained state into agent and tau_state; with an optimizer (training goes on) also its
    state and every rank's RNG streams. Returns the checkpoint's iteration."""
    state = read_checkpoint(path)
    a = dataclasses.asdict(agent.args)
    saved_args = state["args"]
    differ = [
        f"--{k} {saved_args.get(k)} (this run: {a[k]})"
        for k in MODEL_FLAGS
        if saved_args.get(k) != a[k]
    ]
    need(
        not differ,
        f"--resume {path} was trained with {', '.join(differ)}; resume with the flags it was "
        f"trained with",
    )
    shapes = {n: t.shape for n, t in agent.trainable_state().items()}
    need(
        shapes == {n: t.shape for n, t in state["trainable"].items()},
        f"--resume {path}: its tensors do not fit this model although the flags match (another "
        f"version of pamoe.py?); start a new run",
    )
    agent.load_state_dict(state["trainable"], strict=False)
    tau_state["updates"] = state["tau_updates"]
    if opt is None:
        return state["iteration"]
    (rank, world), saved_world = rank_world(), state["world_size"]
    need(
        saved_world == world,
        f"--resume {path} was written by {saved_world} processes and this run has {world}: resume "
        f"with as many (torchrun --nnodes x --nproc_per_node; plain python for 1)",
    )
    need(
        state["iteration"] < agent.args.iterations,
        f"--resume {path} is at iteration {state['iteration']} already; raise --iterations (now "
        f"{agent.args.iterations}) to continue, or evaluate it with --eval_only",
    )
    opt.load_state_dict(state["optimizer"])
    rng = state["rng"][rank]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["iteration"]


def start_run(args, agent, opt, tau_state):
    """Fresh run: remove the out_dir's old logs. Resume: load the checkpoint and drop what the logs
    hold of the iterations after it (metrics lines, evaluation reports). Returns the iteration to
    continue from."""
    metrics = os.path.join(args.out_dir, "metrics.jsonl")
    reports = os.path.join(args.out_dir, "eval.log")
    start = 0
    if args.resume:
        start = load_checkpoint(args.resume, agent, opt, tau_state)
    if rank_world()[0] != 0:
        return start
    if not args.resume:
        for path in (metrics, reports):
            if os.path.exists(path):
                os.remove(path)
    else:
        keep_until(metrics, start, lambda line: json.loads(line)["iteration"])
        keep_until(reports, start, report_iteration)
    return start


def report_iteration(line):
    """The iteration an evaluation report of eval.log begins with, None for its other lines."""
    if not line.startswith("[iteration "):
        return None
    return int(line.split("]")[0][len("[iteration ") :])


def keep_until(path, start, iteration_of):
    """Keep the lines of a log that belong to iterations <= start: iteration_of(line) is the
    iteration a line begins (None: the line belongs to the one before it)."""
    if not os.path.exists(path):
        return
    kept = []
    it = 0
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
        line = {k: float(v) if k != "iteration" else v for k, v in m.items()}
        with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")


# ==================================================================================================
# Using a trained agent: metrics, mechanism diagnostics, evaluation, --show, --export
# ==================================================================================================


def gather_steps(steps, lanes):
    """The per-step lists that statistics read, of every rank's rollout over its `lanes` (lane
    numbers made global)."""
    keys = ("lane", "reward", "won", "task_type", "k", "phase", "invalid", "resp_len")
    mine = {key: steps[key] for key in keys}
    mine["lane"] = [lanes[n] for n in steps["lane"]]
    parts = all_gather(mine)
    return {key: sum((part[key] for part in parts), []) for key in keys}


def rollout_stats(steps, N):
    """Per-episode summaries of N episodes' steps: success, return, length, switches, task type,
    experts and phases."""
    episodes = [{"return": 0.0, "won": False, "experts": [], "phases": []} for _ in range(N)]
    columns = ("lane", "reward", "won", "task_type", "k", "phase")
    for n, reward, won, task_type, k, phase in zip(*(steps[key] for key in columns)):
        e = episodes[n]
        e["return"] += reward
        e["won"] = e["won"] or won
        e["task_type"] = task_type
        e["experts"].append(k)
        e["phases"].append(phase)
    for e in episodes:
        e["steps"] = len(e["experts"])
        e["switches"] = sum(x != y for x, y in zip(e["experts"], e["experts"][1:]))
    return episodes


def episode_metrics(steps, episodes, K, task_types, prefix=""):
    """Success (in all and per task type), return, length and expert switches of the episodes, the
    share of invalid answers among their steps and of steps routed to each expert."""
    m = {
        "success": [e["won"] for e in episodes],
        "return": [e["return"] for e in episodes],
        "steps": [e["steps"] for e in episodes],
        "switches": [e["switches"] for e in episodes],
        "invalid": steps["invalid"],
    }
    for task_type in task_types:
        m[f"success/{task_type}"] = [e["won"] for e in episodes if e["task_type"] == task_type]
    for k in range(K):
        m[f"expert_share/{LETTERS[k]}"] = np.equal(steps["k"], k)
    # a task type no episode drew has no success
    return {prefix + key: float(np.mean(v)) for key, v in m.items() if len(v)}


def iteration_metrics(it, all_steps, stats, times, args, t0):
    """One line of metrics.jsonl: the training episodes of all ranks, the update's statistics,
    sizes and times."""
    episodes = rollout_stats(all_steps, args.num_envs)
    task_types = envs.TASK_COLUMNS[args.env]
    m = {"iteration": it}
    m.update(episode_metrics(all_steps, episodes, args.experts[0], task_types))
    m.update(stats)
    m["resp_len_mean"] = np.mean(all_steps["resp_len"])
    m["resp_len_max"] = max(all_steps["resp_len"])
    m["env_steps"] = len(all_steps["k"])
    m.update(times)  # rollout, prepare and update; prefill, decode, env and features; counts
    if times.get("decode_steps"):
        m["decode_ms_per_step"] = 1000 * times["decode_s"] / times["decode_steps"]
    if times.get("generated"):  # every row of every decode step, finished or not
        m["gen_tokens_per_s"] = times["generated"] / (times["prefill_s"] + times["decode_s"])
    m["iteration_s"] = time.time() - t0
    m["sps"] = m["env_steps"] / m["iteration_s"]
    return m


def expert_diagnostics(agent, steps, batch):
    """The paper's parameter occupancy (its Fig. 1) and gradient conflict, over one rollout at the
    rollout's parameters (ratio 1): g_k,c is the gradient, w.r.t. expert k's A and B, of the share
    of the policy-gradient term (the clipped surrogate alone) that the steps of task type c carry
    (their response tokens / all); g_k,c = g_k,c,0 + g_k,c,1 over the episodes of even and odd
    lanes, two halves drawn from one distribution.
        occupancy/<k>/<c> = |g_k,c| / sum_c' |g_k,c'|         which task types train expert k
        conflict/<k> = mean over pairs c != c' of cos(g_k,c, g_k,c')     (pairs of non-zero g)
        conflict_pick/<k> = mean over c != pick of cos(g_k,pick, g_k,c)   the frequent type
        coherence/<k> = mean over c of cos(g_k,c,0, g_k,c,1)   the split-half noise floor"""
    K = agent.args.experts[0]
    params = [p for k in range(K) for e in agent.experts for p in (e.A[k], e.B[k])]  # by expert
    types = sorted({c for part in all_gather(steps["task_type"]) for c in part})
    tokens = global_sum(sum(steps["resp_len"]))
    halves = {}  # (c, half) -> (K, n): expert k's A and B in every wrapped linear
    for c in types:
        for half in (0, 1):
            steps_of = [
                i
                for i, (t, n) in enumerate(zip(steps["task_type"], steps["lane"]))
                if t == c and n % 2 == half
            ]
            grads = policy_gradient(agent, steps, batch, steps_of, params, tokens)
            halves[c, half] = global_sum(torch.cat([x.flatten() for x in grads])).view(K, -1)
    g = {c: halves[c, 0] + halves[c, 1] for c in types}

    def cos(x, y):
        return float(F.cosine_similarity(x, y, dim=0))

    out = {}
    for k in range(K):
        norms = {c: float(g[c][k].norm()) for c in types}
        total = sum(norms.values())
        if total == 0:  # an expert no step was routed to
            continue
        for c, norm in norms.items():
            out[f"occupancy/{LETTERS[k]}/{c}"] = norm / total
        live = [c for c in types if norms[c] > 0]
        pairs = [(c, d) for i, c in enumerate(live) for d in live[i + 1 :]]
        if pairs:  # none: one task type only
            out[f"conflict/{LETTERS[k]}"] = float(
                np.mean([cos(g[c][k], g[d][k]) for c, d in pairs])
            )
        if "pick" in live and len(live) > 1:
            rare = [cos(g["pick"][k], g[c][k]) for c in live if c != "pick"]
            out[f"conflict_pick/{LETTERS[k]}"] = float(np.mean(rare))
        split = [
            cos(halves[c, 0][k], halves[c, 1][k])
            for c in live
            if halves[c, 0][k].norm() > 0 and halves[c, 1][k].norm() > 0
        ]
        if split:
            out[f"coherence/{LETTERS[k]}"] = float(np.mean(split))
    return out


def policy_gradient(agent, steps, batch, idx, params, tokens):
    """The gradient w.r.t. params of the policy-gradient term's share that the steps idx carry
    (their response tokens / all tokens), at the rollout's routing; zeros for no steps."""
    a = agent.args
    acc = [torch.zeros_like(p) for p in params]
    idx = torch.tensor(idx, dtype=torch.long)
    for part in idx.split(a.micro_batch or a.minibatch) if len(idx) else []:
        gates = step_gates_for(agent, part.to(agent.device), batch["k"])
        with agent.routing(gates):  # backward inside: --grad_ckpt replays with these gates
            # at the rollout's own parameters the router has not moved: RSPO's weights are 1
            shift = torch.ones(len(part), device=agent.device)
            _, stats, n_resp = policy_loss(agent, steps, batch, part, gates, shift, pg_only=True)
            grads = torch.autograd.grad(n_resp / tokens * stats["pg_loss"], params)
            acc = [x + y for x, y in zip(acc, grads)]
    return acc


def nmi(a, b):
    """Normalised mutual information I(a; b) / mean(H(a), H(b)) of two labelings of the same items
    (lists of hashables): 1 for a one-to-one map, 0 for independent labelings or when either is
    constant."""
    n, count_a, count_b, count_ab = len(a), Counter(a), Counter(b), Counter(zip(a, b))
    mi = sum(c / n * math.log(c * n / (count_a[x] * count_b[y])) for (x, y), c in count_ab.items())
    h = [-sum(c / n * math.log(c / n) for c in count.values()) for count in (count_a, count_b)]
    return 0.0 if min(h) <= 0 else max(0.0, mi) / (sum(h) / 2)


EVAL_SEED = 10_000_000


def evaluate(agent, tau):
    """The policy on --eval_episodes fixed episodes of --eval_split (temperature --eval_temperature,
    argmax router). Returns the eval/* metrics, the tables (text) and this rank's own steps (what
    --show prints)."""
    a = agent.args
    lanes = my_lanes(a.eval_episodes)  # this rank's share of the fixed episodes
    env_batch = envs.make_env_batch(
        a.env, len(lanes), a.max_steps, a.eval_split, a.alfworld_data, a.toy_variant
    )
    seeds = [EVAL_SEED + i for i in lanes]
    # a sampling stream of its own: the same policy always scores the same, training is untouched
    devices = [agent.device] if agent.device.type == "cuda" else []
    with contextlib.closing(env_batch), torch.random.fork_rng(devices):
        torch.manual_seed(EVAL_SEED + rank_world()[0])
        mine = rollout(agent, env_batch, seeds, tau, a.eval_temperature, greedy_router=True)
    steps, K = gather_steps(mine, lanes), a.experts[0]
    episodes = rollout_stats(steps, a.eval_episodes)
    by_task = {}  # in the paper's order
    for task_type in envs.TASK_COLUMNS[a.env]:
        by_task[task_type] = [e for e in episodes if e["task_type"] == task_type]
    m = episode_metrics(steps, episodes, K, by_task, "eval/")
    share = [m[f"eval/expert_share/{LETTERS[k]}"] for k in range(K)]
    m["eval/phase_nmi"] = nmi(steps["k"], steps["phase"])
    m["eval/task_nmi"] = nmi(steps["k"], steps["task_type"])
    m["eval/share_entropy"] = -sum(x * math.log(x) for x in share if x > 0)
    usage, tables = usage_tables(steps, by_task, K)
    return {**m, **usage}, tables, mine


def usage_tables(steps, by_task, K):
    """Expert usage by task type and by phase, and one phase timeline per task type: the
    eval/usage/* metrics and the text."""
    lines, m = [], {}
    for key, column in (("task type", "task_type"), ("phase", "phase")):
        usage = defaultdict(Counter)
        for k, label in zip(steps["k"], steps[column]):
            usage[label][k] += 1
        letters = " ".join(f"{LETTERS[k]:>5}" for k in range(K))
        lines.append(f"expert usage by {key} (fraction of steps): {letters}")
        for name, count in sorted(usage.items()):
            n = sum(count.values())
            shares = " ".join(f"{count[k] / n:5.2f}" for k in range(K))
            lines.append(f"  {name:<10}{shares}   (n={n})")
            if column == "task_type":
                for k in range(K):
                    m[f"eval/usage/{name}/{LETTERS[k]}"] = count[k] / n
    code = {}
    for phase in sorted(set(steps["phase"])):  # one letter per phase: its initial, upper if taken
        code[phase] = phase[0] if phase[0] not in code.values() else phase[0].upper()
    legend = ", ".join(f"{c}={phase}" for phase, c in code.items())
    lines.append(f"phase timelines (expert per step, then phase per step: {legend}):")
    for task_type, episodes in sorted(by_task.items()):
        if not episodes:
            continue
        e = episodes[0]
        experts = "".join(LETTERS[k] for k in e["experts"])
        phases = "".join(code[p] for p in e["phases"])
        lines.append(f"  {task_type:<6} {experts:<21} {phases:<21} {'won' if e['won'] else 'lost'}")
    return m, "\n".join(lines)


def show_episodes(steps, n, token_routed):
    """--show: the first n episodes of a rollout's steps, step by step: observation, the model's
    response, the action it parses to (or invalid), the step's expert with the router's
    probabilities, the reward."""
    lines = []
    for lane in sorted(set(steps["lane"]))[:n]:
        mine = [i for i, x in enumerate(steps["lane"]) if x == lane]
        first = mine[0]
        lines.append(
            f"=== episode {lane + 1} ({steps['task_type'][first]}): {steps['goal'][first]}"
        )
        for i in mine:
            p = " ".join(f"{x:.2f}" for x in steps["router_p"][i])
            if token_routed:
                p = "per token"
            lines.append(f"  step {steps['t'][i] + 1} observation: {steps['obs'][i]}")
            lines.append(
                f"    response {steps['response'][i]!r} -> {steps['action'][i] or 'invalid'} | "
                f"expert {LETTERS[steps['k'][i]]} (router p {p}) | reward {steps['reward'][i]:+.1f}"
            )
        won = any(steps["won"][i] for i in mine)
        lines.append(f"  {'won' if won else 'lost'} after {len(mine)} steps")
    return "\n".join(lines)


def report_evaluation(agent, it, tau):
    """Evaluate; rank 0 prints the tables. Training appends them to eval.log; --eval_only prints
    --show's episodes first and writes the tables to <out_dir>/eval.json, leaving the run's files
    as they are. Returns the eval/* metrics."""
    a, t = agent.args, time.time()
    em, tables, mine = evaluate(agent, tau)
    columns = " ".join(
        f"{k.split('/')[-1]} {v:.2f}" for k, v in em.items() if k.startswith("eval/success/")
    )
    report = f"[iteration {it}] eval success: All {em['eval/success']:.2f} {columns}\n{tables}"
    if rank_world()[0] == 0 and a.eval_only:
        if a.show:
            print(show_episodes(mine, a.show, a.token_routed))
        print(report)
        result = {"checkpoint": a.resume, "iteration": it}
        for key in ("eval_split", "eval_episodes", "eval_temperature"):
            result[key] = getattr(a, key)
        result.update(metrics=em, tables=tables)
        path = os.path.join(a.out_dir, "eval.json")
        with open(f"{path}.tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(f"{path}.tmp", path)
    elif rank_world()[0] == 0:
        tqdm.write(report)
        with open(os.path.join(a.out_dir, "eval.log"), "a") as f:
            f.write(report + "\n")
    return {**em, "eval_s": time.time() - t}


def export_experts(agent, folder, it, tau):
    """--export: expert k as a PEFT LoRA adapter in folder/expert_<k>/ (lora_A (r, in) = A_k.T,
    lora_B (out, r) = B_k.T, scaled by lora_alpha / r as here), the router with the flags that
    rebuild it (router.pt), how to use them (README.md), and for `tiny` the frozen base (base/)."""
    from safetensors.torch import save_file

    a, (K, r) = agent.args, agent.args.experts
    paths = {id(m): name for name, m in agent.lm.named_modules()}
    for k in range(K):
        out = os.path.join(folder, f"expert_{LETTERS[k]}")
        os.makedirs(out, exist_ok=True)
        tensors = {}
        for e in agent.experts:  # PEFT's lora_A (r, in), lora_B (out, r)
            prefix = f"base_model.model.{paths[id(e)]}"
            tensors[f"{prefix}.lora_A.weight"] = e.A[k].T.contiguous()
            tensors[f"{prefix}.lora_B.weight"] = e.B[k].T.contiguous()
        save_file(tensors, os.path.join(out, "adapter_model.safetensors"))
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": r,
            "lora_alpha": a.alpha,
            "target_modules": sorted(set(a.targets.split(","))),
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "inference_mode": True,
            "base_model_name_or_path": a.model,
        }
        with open(os.path.join(out, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=1)
    if a.step_router:
        flag_names = (
            "model env routing num_experts router_window router_hidden router_layers max_steps "
            "history action_format"
        ).split()
        router = {
            "state": agent.router.state_dict(),
            "flags": {k: getattr(a, k) for k in flag_names},
            "tau": tau,
            "hidden_size": agent.lm.config.hidden_size,
        }
        torch.save(router, os.path.join(folder, "router.pt"))
    if a.model == "tiny":  # built in code: its weights go with the adapters, without the wrappers
        trained = {name for name, w in agent.lm.named_parameters() if w.requires_grad}
        weights = {
            key.replace(".base.", "."): w
            for key, w in agent.lm.state_dict().items()
            if key not in trained
        }
        agent.lm.save_pretrained(os.path.join(folder, "base"), state_dict=weights)
        agent.tok.save_pretrained(os.path.join(folder, "base"))
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(export_readme(a, K, r, it, tau))
    print(f"exported {K} expert(s) of {a.resume} (iteration {it}) to {folder}")


def export_readme(a, K, r, it, tau):
    """The README.md of an export: what it holds and how to load and serve it."""
    base, tiny = a.model, ""
    if a.model == "tiny":
        base = "base"
        tiny = (
            " (pamoe.py's `tiny`: weights in `base/`, tokenizer via PreTrainedTokenizerFast, not "
            "AutoTokenizer)"
        )
    vllm_ranks = [x for x in (8, 16, 32, 64, 128, 256, 320, 512) if x >= r]  # max_lora_rank's
    if vllm_ranks:
        vllm = (
            f"with vLLM multi-LoRA (`enable_lora=True, max_loras={K}, "
            f"max_lora_rank={vllm_ranks[0]}`)"
        )
    else:
        vllm = f"with a server that takes rank {r} (vLLM's max_lora_rank stops at 512)"
    lines = [
        f"# PA-MoE experts of {a.resume} (iteration {it})",
        "",
        f"Base `{a.model}`{tiny}; {a.routing} routing; {K} PEFT LoRA adapter(s) "
        f"`expert_A`..`expert_{LETTERS[K - 1]}`, rank {r},",
        f"alpha {a.alpha}, on {a.targets}. One expert with PEFT:",
        "",
        "    peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained("
        f'"{base}"), "expert_A")',
        "",
        f"All experts {vllm}: one adapter per request, the router's choice for that environment "
        "step. `router.pt` (phase, trajectory): `state` of",
        f"`pamoe.StepHead(hidden_size, {K}, router_hidden, router_layers)`, sizes and prompt flags "
        "in `flags`. It reads",
        "frozen-base features (adapters off: `pamoe.StepFeatures`) of the last "
        f"{a.router_window} steps and the goal's token",
        f"states; the step's expert is argmax softmax(logits / {tau:.3f}) (trajectory routing: at "
        "the episode's first step only).",
    ]
    return "\n".join(lines) + "\n"


def use_trained_agent(agent):
    """--eval_only and --export: the checkpoint's trained agent, used as it is."""
    a, tau_state = agent.args, {"updates": 0}
    it = load_checkpoint(a.resume, agent, None, tau_state)
    tau = tau_at(tau_state["updates"], a.tau_start, a.tau_end, a.tau_steps)
    if a.export and rank_world()[0] == 0:
        export_experts(agent, a.export, it, tau)
    if a.eval_only:
        return report_evaluation(agent, it, tau)
    return {}


# ==================================================================================================
# main
# ==================================================================================================
def main(argv=None):
    args = parse_args(argv)
    try:
        return train(args)
    except envs.EnvWorkerError as e:  # metrics lines are whole iterations, checkpoints atomic
        ckpt = os.path.join(args.out_dir, "checkpoint.pt")
        raise SystemExit(
            f"pamoe.py: error: {e}. The unfinished iteration was not logged and {ckpt} (if any) is "
            f"intact: fix or remove that game, then rerun with --resume {ckpt}"
        ) from e
    finally:
        if dist.is_initialized():  # torchrun's group, which train joined
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
