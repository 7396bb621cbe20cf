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

The file reads top-down: the flags (`Args`), the training loop (`train`), then what it calls in the
order it calls it (rollout, advantages, PPO update, losses, router, experts, model), then logs and
evaluation, data parallel, checkpoints, and the flag checks with `main`. Beside it: analysis.py
(expert diagnostics, usage tables) and trained.py (evaluate, show or export a trained agent).

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
import functools
import importlib.util
import json
import math
import os
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm
from transformers import GenerationConfig, StaticCache

import analysis
import envs


# Arguments ========================================================================================
def arg(default, help_text, valid=None):
    """A flag: its default, its help and its valid values, a tuple of choices or an interval
    ("[" and "]" include the bound, "(" and ")" exclude it, so nan and inf never pass); the checks
    at the end of the file derive each flag's own check from it."""
    return field(default=default, metadata={"help": help_text, "valid": valid})


@dataclass(frozen=True)
class RoutingMode:
    """What a --routing asks of the model, decided here once."""

    step_router: bool  # a learnt router picks each step's expert
    every_step: bool  # ... at every step (phase), or at an episode's first step only (trajectory)
    token: bool  # each token picks its expert in every wrapped layer (LoRA-MoE)
    one_expert: bool  # one LoRA takes every step (dense)


ROUTINGS = {  # the paper's granularity ablation, and one LoRA
    "phase": RoutingMode(step_router=True, every_step=True, token=False, one_expert=False),
    "trajectory": RoutingMode(step_router=True, every_step=False, token=False, one_expert=False),
    "token": RoutingMode(step_router=False, every_step=False, token=True, one_expert=False),
    "dense": RoutingMode(step_router=False, every_step=False, token=False, one_expert=True),
}


@dataclass
class Args:
    # run
    env: str = arg("toy", "environment", envs.ENVS)
    alfworld_data: str = arg("", "alfworld: games folder (or $ALFWORLD_DATA): official, mini")
    eval_split: str = arg(
        "eval_in_distribution",
        "alfworld: seen | unseen games",
        ("eval_in_distribution", "eval_out_of_distribution"),
    )
    model: str = arg("tiny", "`tiny` (built from a config, no download), a HF name or a folder")
    device: str = arg("auto", "where to run", ("auto", "cpu", "cuda"))
    dtype: str = arg(
        "auto", "the frozen base's (auto: bf16 on CUDA)", ("auto", "float32", "bfloat16")
    )
    seed: int = arg(1, "seeds the model build, the env episodes, every sampler", "[0, 4294967295]")
    out_dir: str = arg("runs/pamoe", "for metrics.jsonl, eval.log, checkpoint.pt (and eval.json)")
    resume: str = arg("", "a checkpoint: continue it, or use it with --eval_only / --export")
    eval_only: bool = arg(False, "evaluate --resume into <out_dir>/eval.json (trained.py)")
    show: int = arg(0, "with --eval_only: print this many episodes step by step", "[0, 4096]")
    export: str = arg("", "write --resume's experts as PEFT LoRA adapters here (trained.py)")
    iterations: int = arg(60, "training iterations (one rollout + one PPO update each)", "[0, inf)")
    num_envs: int = arg(32, "environments stepped in lockstep per iteration", "[1, 4096]")
    max_steps: int = arg(15, "step limit per episode (truncation; ALFWorld: 50)", "[1, 1000]")
    history: int = arg(0, "past observation/action pairs in the prompt (paper: 2)", "[0, 1000]")
    max_prompt_tokens: int = arg(2048, "prompt limit: oldest history dropped first", "[64, 131072]")
    action_format: str = arg("label", "an action's number | <think>/<action>", tuple(envs.ANSWER))
    max_new_tokens: int = arg(1, "response length limit per step (tagged: 512)", "[1, 8192]")
    tiny_steps: int = arg(400, "`tiny`: warm-up steps before it is frozen", "[0, 100000]")
    tiny_prior: float = arg(0.15, "`tiny`: the toy solver's share of its warm-up answers", "[0, 1]")
    temperature: float = arg(1.0, "rollout sampling temperature (and PPO's)", "(0, inf)")
    eval_temperature: float = arg(0.4, "evaluation sampling temperature", "(0, inf)")
    eval_every: int = arg(10, "evaluate every N iterations (and at 0, the end)", "[0, inf)")
    eval_episodes: int = arg(128, "evaluation episodes, on a fixed set of seeds", "[0, 4096]")
    ckpt_every: int = arg(10, "checkpoint every N iterations (and after the last)", "[1, inf)")
    diagnostics: bool = arg(False, "at evaluations: the experts' occupancy and gradient conflict")
    # experts
    routing: str = arg("phase", "the paper's ablation; dense: one LoRA", tuple(ROUTINGS))
    num_experts: int = arg(4, "K: LoRA experts (named A..P)", "[1, 16]")
    rank: int = arg(32, "r: LoRA rank of each expert", "[1, 1024]")
    alpha: float = arg(64.0, "LoRA alpha; the update is scaled by alpha / r", "(0, inf)")
    dense_rank: int = arg(0, "dense: its expert's rank (0: --rank)", "[0, 16384]")
    targets: str = arg("q_proj,k_proj,v_proj,o_proj", "comma-separated linear layers given experts")
    # router
    router_window: int = arg(5, "L: past steps read by the router's LSTM", "[1, 1000]")
    router_hidden: int = arg(64, "LSTM units of the router and critic (paper: 256)", "[1, 4096]")
    router_layers: int = arg(1, "LSTM layers of the router and critic (paper: 3)", "[1, 16]")
    tau_start: float = arg(2.0, "router softmax temperature at the start", "(0, inf)")
    tau_end: float = arg(0.5, "router temperature after --tau_steps router updates", "(0, inf)")
    tau_steps: int = arg(3000, "router updates over which tau is annealed linearly", "[1, inf)")
    switch_coef: float = arg(0.05, "lambda_s: temporal-consistency penalty", "[0, inf)")
    balance: str = arg("switch", "Switch Transformer's | the paper's", ("switch", "sq"))
    balance_coef: float = arg(0.01, "lambda_b: the balance loss's weight (paper: 1e-3)", "[0, inf)")
    info_coef: float = arg(10.0, "lambda_i: I(expert; last verb), maximised (paper: 0)", "[0, inf)")
    # advantages
    advantage: str = arg("gae", "gae: a critic; grpo, gigpo: game groups", ("gae", "grpo", "gigpo"))
    group_size: int = arg(1, "G: environments per game group (grpo, gigpo: >= 2)", "[1, 4096]")
    adv_norm: str = arg("mean_std", "grpo, gigpo: divide by the std, or not", ("mean_std", "mean"))
    step_weight: float = arg(1.0, "gigpo: w, the step advantage's weight", "[0, inf)")
    gamma: float = arg(0.95, "discount per environment step", "[0, 1]")
    gae_lambda: float = arg(0.95, "GAE lambda", "[0, 1]")
    # PPO
    clip: float = arg(0.3, "PPO clip range (paper pipeline: 0.2)", "(0, 1)")
    clip_c: float = arg(0.0, "dual clip: A < 0 costs at most -c A (verl: 3); 0 = off", "[0, inf)")
    rspo: bool = arg(False, "RSPO: ratios times stopgrad(max(exp(-router shift), floor))")
    rspo_floor: float = arg(0.8, "RSPO's gamma_min (paper's value unverified)", "[0, 1]")
    kl_coef: float = arg(0.01, "KL to the frozen base, k3 estimator", "[0, inf)")
    ent_coef: float = arg(0.01, "entropy bonus (paper pipeline: 0.001)", "[0, inf)")
    vf_coef: float = arg(0.5, "value loss weight", "[0, inf)")
    epochs: int = arg(1, "PPO epochs over each rollout", "[1, 100]")
    minibatch: int = arg(32, "environment steps per minibatch, at most", "[1, 4096]")
    micro_batch: int = arg(0, "steps per forward/backward; 0 = the minibatch", "[0, 4096]")
    compile_decode: bool = arg(False, "CUDA: static KV cache and a compiled decode step")
    grad_ckpt: bool = arg(False, "checkpoint the base's layers: less memory, one more pass")
    max_grad_norm: float = arg(1.0, "gradient clip, per parameter group", "(0, inf)")
    lr_experts: float = arg(1e-3, "learning rate of the experts (paper, 1.5B: 1e-6)", "[0, 1]")
    lr_router: float = arg(1e-4, "learning rate of the router (paper: 1e-4)", "[0, 1]")
    lr_critic: float = arg(1e-3, "learning rate of the critic", "[0, 1]")
    anneal_lr: bool = arg(True, "decay learning rates linearly to 0 (paper: constant)")
    weight_decay: float = arg(0.01, "AdamW weight decay", "[0, 1]")

    @property
    def mode(self):
        return ROUTINGS[self.routing]

    @property
    def experts(self):
        """(K, rank) as built: dense routing is one expert."""
        if self.mode.one_expert:
            return 1, self.dense_rank or self.rank
        return self.num_experts, self.rank

    @property
    def has_critic(self):
        """GAE needs a critic; grpo and gigpo are critic-free."""
        return self.advantage == "gae"


# The training loop ================================================================================
def train(args):
    """One process, or one rank under torchrun (each steps its share of the lanes; rank 0 alone
    writes files). Returns the last iteration's metrics."""
    device, rank = join_processes(args)
    seed_everything(args.seed)  # the same model, experts, router and critic on every rank
    agent = Agent(args, device)
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
    env_batch = envs.make_env_batch(
        args.env, len(lanes), args.max_steps, "train", args.alfworld_data
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
            anneal_learning_rates(opt, initial_lrs, it, args)
            try:  # a nan or inf stops the run before anything of this iteration is written
                m = iteration(agent, opt, env_batch, lanes, it, tau_state)
            except NonFiniteError as e:
                raise non_finite_exit(e, it, saved) from e
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


def iteration(agent, opt, env_batch, lanes, it, tau_state):
    """One rollout of this rank's lanes, one PPO update over it, the evaluation when it is due.
    Returns the iteration's metrics: every rank's episodes, the update's statistics, times."""
    a, t0 = agent.args, time.time()
    agent.clock.read()  # from here, this iteration's spans
    tau = tau_at(tau_state["updates"], a.tau_start, a.tau_end, a.tau_steps)
    seeds = episode_seeds(a, it, lanes)
    steps = rollout(agent, env_batch, seeds, tau, a.temperature, greedy_router=False)
    times = {"rollout_s": time.time() - t0}
    all_steps = gather_steps(steps, lanes)  # every rank's steps, for the statistics
    evaluating = a.eval_every and (it % a.eval_every == 0 or it == a.iterations)
    batch = prepare_batch(agent, steps)
    times["prepare_s"] = time.time() - t0 - times["rollout_s"]
    diagnostics = {}
    if evaluating and a.diagnostics:  # before the update moves anything
        diagnostics = diagnose(agent, steps, batch)
    stats = {**ppo_update(agent, opt, steps, batch, tau_state), **diagnostics}
    times["update_s"] = time.time() - t0 - times["rollout_s"] - times["prepare_s"]
    times.update(agent.clock.read())
    m = analysis.iteration_metrics(it, all_steps, stats, times, a, t0)
    if evaluating:
        m.update(report_evaluation(agent, it, stats["tau"]))
    return m


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


# Rollout: N envs in lockstep, one routing decision and one generated response per env step ========
def per_step():
    return field(default_factory=list)


@dataclass
class Rollout:
    """One rollout's record. Per step (S steps, ordered by step, then lane), lists of S entries;
    per rollout, the frozen features the router and the critic read."""

    # the step's sequence: token ids (prompt + response,) and both lengths
    seq: list = per_step()
    prompt_len: list = per_step()
    resp_len: list = per_step()
    # where it happened and how it was routed
    lane: list = per_step()  # its lane (episode) on this rank
    t: list = per_step()  # its step in the episode
    k: list = per_step()  # its expert (token routing: the one most chosen, for tables only)
    router_p: list = per_step()  # (K,) the router's probabilities when it chose (uniform: none)
    window: list = per_step()  # (L,) rows of `features`: this lane's steps t-L+1..t
    last_verb: list = per_step()  # the previous action's verb ("" first, "<invalid>")
    # what the agent saw, said and did, and what it got
    obs: list = per_step()
    goal: list = per_step()
    response: list = per_step()  # the response's text
    action: list = per_step()  # the admissible action it parses to, None if invalid
    phase: list = per_step()  # the toy's hidden phase (alfworld: inferred), for tables
    task_type: list = per_step()
    env_reward: list = per_step()
    invalid: list = per_step()
    reward: list = per_step()  # env_reward - INVALID_PENALTY * invalid
    terminated: list = per_step()
    truncated: list = per_step()
    won: list = per_step()
    # per rollout
    features: torch.Tensor = None  # (rows, 2d): row 0 zeros, then [observation ; previous action]
    goal_states: torch.Tensor = None  # (N, G, d) each lane's goal tokens
    goal_mask: torch.Tensor = None  # (N, G)
    final_window: dict = field(default_factory=dict)  # truncated lane -> (L,) its final window

    def record(self, **fields):
        """Append one step's fields."""
        for name, value in fields.items():
            getattr(self, name).append(value)


@torch.no_grad()
def rollout(agent, env_batch, seeds, tau, temperature, greedy_router):
    """Play one episode per lane; returns the Rollout. The router decides from the frozen
    features of each step's window; every token of the step's response comes from its expert."""
    a, device = agent.args, agent.device
    K, N = a.experts[0], len(seeds)
    lanes = Lanes(env_batch.reset(seeds))
    goals = [info["goal"] for info in lanes.infos]
    goal_states, goal_mask = encode_texts(agent.lm, agent.tok, goals, device)
    features = StepFeatures(agent, N)
    expert = torch.zeros(N, dtype=torch.long, device=device)  # each lane's current expert
    expert_p = torch.ones(N, K, device=device) / K  # the router's probabilities it came from
    steps = Rollout()
    for t in range(env_batch.max_steps):
        live = lanes.live()
        if not live:
            break
        with agent.clock("features"):  # the frozen base's features of the step, then the router
            features.add(live, lanes.obs, lanes.last_action)
        live_idx = torch.tensor(live, device=device)
        windows = torch.tensor([features.window(n, t) for n in live], device=device)  # (A, L)
        if a.mode.step_router and (a.mode.every_step or t == 0):
            goal, mask = goal_states[live_idx], goal_mask[live_idx]
            p = router_probs(agent.router, features.table()[windows], goal, mask, tau)  # (A, K)
            expert[live_idx] = choose(p, greedy_router)
            expert_p[live_idx] = p
        prompts = [lanes.prompt(n, t, agent.tok, agent.prompt_format) for n in live]
        gates = step_gates_for(agent, live_idx, expert)  # (A, 1, K); token routing: None
        samples, voted = generate(agent, prompts, gates, temperature, batch_size=N)
        k = expert[live_idx] if voted is None else voted  # dense: expert 0
        actions, invalid = [None] * N, {}
        for i, (n, sample) in enumerate(zip(live, samples)):
            steps.record(k=int(k[i]), router_p=expert_p[n].tolist(), window=windows[i].tolist())
            actions[n], invalid[n] = lanes.record(steps, n, t, sample, env_batch)
        with agent.clock("env"):
            results = env_batch.step(actions)
        for n in live:
            lanes.advance(steps, n, actions[n], invalid[n], results[n])
    truncated = [n for n in range(N) if lanes.truncated[n]]
    if truncated:  # features of the final observation, to bootstrap from at truncation
        features.add(truncated, lanes.obs, lanes.last_action)
    steps.features, steps.goal_states, steps.goal_mask = features.table(), goal_states, goal_mask
    steps.final_window = {n: features.window(n, len(features.lane_rows[n]) - 1) for n in truncated}
    return steps


def choose(p, greedy):
    """Experts (B,) from router probabilities p (B, K): the argmax (evaluation) or a sample."""
    if greedy:
        return p.argmax(-1)
    return torch.multinomial(p, 1)[:, 0]


INVALID_PENALTY = 0.1  # reward lost by an answer that is no admissible action (paper: 0.1)


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

    def record(self, steps, n, t, sample, env_batch):
        """Record lane n's step t with its sampled (prompt, response, text); returns the action to
        take (an invalid answer's text, which the env rejects) and whether it was invalid."""
        prompt, response, text = sample
        info = self.infos[n]
        command, valid = envs.parse_action(text, info["admissible"])
        steps.record(
            seq=torch.cat([prompt, response]),
            prompt_len=len(prompt),
            resp_len=len(response),
            lane=n,
            t=t,
            last_verb=self.last_verb[n],
            obs=self.obs[n],
            goal=info["goal"],
            response=text,
            action=command,
            phase=env_batch.step_phase(info, command),
            task_type=info["task_type"],
        )
        return (command if valid else text), not valid

    def advance(self, steps, n, action, invalid, result):
        """Lane n took `action` and env_batch.step gave result: record the outcome, move on."""
        next_obs, reward, terminated, truncated, info = result
        steps.record(
            env_reward=reward,
            invalid=invalid,
            reward=reward - INVALID_PENALTY * invalid,  # the invalid output is counted
            terminated=terminated,
            truncated=truncated,
            won=info["won"],
        )
        self.history[n].append((self.obs[n], action))
        self.last_action[n] = action
        self.last_verb[n] = "<invalid>" if invalid else action.split()[0]
        self.obs[n] = next_obs
        self.infos[n] = info
        self.done[n] = terminated or truncated
        self.truncated[n] = truncated


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
    """One sampled response per prompt, with the experts of gates (B, 1, K) (None: token routing;
    experts_on False: the frozen base) and only the sampling settings stated here; a tagged answer
    ends at its `</action>`. --compile_decode: the batch is filled to batch_size with copies of the
    first prompt, so that one static KV cache, gates buffer and compiled decode step serve every
    call. Returns (prompt ids, response ids, text) per prompt, and for token routing each
    response's most chosen expert (tables only), else None."""
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
    mark = analysis.DecodeMark(agent.clock)
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
    if a.mode.token:  # count each expert's choices over layers and tokens: (B, K)
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


# Advantages, and what else the update needs of each step ==========================================
@dataclass
class Batch:
    """What the PPO update needs of each of a rollout's S steps besides its Rollout record."""

    lanes: torch.Tensor  # (S,) the step's lane
    k: torch.Tensor  # (S,) the rollout's expert, replayed by the update
    windows: torch.Tensor  # (S, L) the critic's rows of Rollout.features
    router_windows: torch.Tensor  # (S, L) the router's (trajectory: the episode's first step's)
    next: torch.Tensor  # (S,) the index of step t+1 of the same episode, -1 if none
    router_p: torch.Tensor  # (S, K) the router's probabilities in the rollout
    adv: torch.Tensor  # (S,) --advantage's
    ret: torch.Tensor = None  # (S,) gae: the critic's targets, A + V
    values: torch.Tensor = None  # (S,) gae: V(s_t) in the rollout
    verb_logratio: torch.Tensor = None  # (S, K) phase: log(P_verb / P), fixed (group_logratio)
    old_logp: list = None  # S x (resp_len,) response log-probs of the rollout's policy
    ref_logp: list = None  # S x (resp_len,) of the frozen base (the reference policy)
    old_choice: list = None  # token routing, --rspo: S x (resp_len, layers) experts chosen
    old_choice_logp: list = None  # and their log-probabilities under the rollout's routers


@torch.no_grad()
def prepare_batch(agent, steps):
    """Per step: its advantage (--advantage), the old and reference log-probs of its response, the
    router's inputs and what its losses pair and group."""
    a, device = agent.args, agent.device
    lanes = torch.tensor(steps.lane, device=device)
    windows = torch.tensor(steps.window, device=device)  # (S, L)
    index_of = {(n, t): i for i, (n, t) in enumerate(zip(steps.lane, steps.t))}
    # the step t+1 of the same episode (the switch term's pair), -1 if none
    next_step = [index_of.get((n, t + 1), -1) for n, t in zip(steps.lane, steps.t)]
    router_windows = windows
    if not a.mode.every_step:  # trajectory: the router decided once, from the first step
        first = torch.tensor([index_of[(n, 0)] for n in steps.lane], device=device)
        router_windows = windows[first]
    adv, ret, values = advantages(agent, steps, lanes, windows)
    batch = Batch(
        lanes=lanes,
        k=torch.tensor(steps.k, device=device),
        windows=windows,
        router_windows=router_windows,
        next=torch.tensor(next_step, device=device),
        router_p=torch.tensor(steps.router_p, device=device),  # (S, K)
        adv=adv,
        ret=ret,
        values=values,
    )
    if a.mode.every_step:
        batch.verb_logratio = verb_logratio(steps, device)
    old_and_reference_logprobs(agent, steps, batch)
    return batch


def advantages(agent, steps, lanes, windows):
    """--advantage, chosen here: gae (the critic's values, turn-level GAE whitened over the batch of
    all ranks) or grpo / gigpo (critic-free, within game groups: the lanes n // G of this rank, a
    group never spans ranks; no second whitening). Returns the advantages (S,) and, for gae, the
    returns A + V and the values (S,), else None."""
    a = agent.args
    if a.has_critic:
        return critic_advantages(agent, steps, lanes, windows)
    games = torch.tensor([n // a.group_size for n in steps.lane])
    episodes = torch.tensor(steps.lane)
    env_rewards = torch.tensor(steps.env_reward, dtype=torch.float32)
    invalid = torch.tensor(steps.invalid, dtype=torch.float32)
    use_std = a.adv_norm == "mean_std"
    if a.advantage == "grpo":
        adv = grpo_advantages(env_rewards, invalid, episodes, games, use_std)
    else:
        adv = gigpo_advantages(
            env_rewards, invalid, episodes, games, steps.obs, a.gamma, a.step_weight, use_std
        )
    return adv.to(agent.device), None, None


def critic_advantages(agent, steps, lanes, windows):
    """gae: the critic's values V, turn-level GAE advantages (whitened over the batch of all ranks)
    and returns (A + V) per step, bootstrapped from the final observation at truncation."""
    a, device = agent.args, agent.device
    ts = torch.tensor(steps.t, device=device)
    N, T = steps.goal_states.shape[0], int(ts.max()) + 1  # episodes, steps
    features, goal_states, goal_mask = steps.features, steps.goal_states, steps.goal_mask
    values = agent.critic(features[windows], goal_states[lanes], goal_mask[lanes])[:, 0]

    def grid(x):  # per-step values -> (N, T), zero where an episode has no step t
        x = torch.as_tensor(x, device=device).float()
        return torch.zeros(N, T, device=device).index_put_((lanes, ts), x)

    V = grid(values)
    rewards = grid(steps.reward)
    terminated = grid(steps.terminated)
    truncated = grid(steps.truncated)
    lengths = torch.bincount(lanes, minlength=N)
    valid = torch.arange(T, device=device)[None] < lengths[:, None]  # (N, T)
    next_V = torch.cat([V[:, 1:], torch.zeros(N, 1, device=device)], 1)
    if steps.final_window:  # truncation bootstraps from V of the final observation
        cut = torch.tensor(list(steps.final_window), device=device)
        final = torch.tensor(list(steps.final_window.values()), device=device)
        final_V = agent.critic(features[final], goal_states[cut], goal_mask[cut])[:, 0]
        next_V[cut, lengths[cut] - 1] = final_V
    dones = torch.where(valid, torch.maximum(terminated, truncated), 1.0)
    adv, ret = gae(rewards, V, next_V, terminated, dones, a.gamma, a.gae_lambda)
    adv = whiten(adv, valid)
    return adv[lanes, ts], ret[lanes, ts], values


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


def whiten(x, mask):
    """(x - mean) / std, both over the entries in mask of all ranks."""
    n = global_sum(mask.sum())
    mean = global_sum(torch.where(mask, x, 0).sum()) / n
    std = (global_sum(torch.where(mask, (x - mean) ** 2, 0).sum()) / n).sqrt()
    return torch.where(mask, (x - mean) / (std + 1e-8), 0)


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


def verb_logratio(steps, device):
    """log(P_verb / P) (S, K) of this rank's steps, over the rollout of all ranks: each step's
    previous verb and the router probabilities it was routed with (group_logratio)."""
    parts = all_gather((steps.last_verb, steps.router_p))
    verbs = [v for part_verbs, _ in parts for v in part_verbs]
    vocabulary = {v: i for i, v in enumerate(sorted(set(verbs)))}
    groups = torch.tensor([vocabulary[v] for v in verbs], device=device)
    probs = torch.tensor(sum((p for _, p in parts), []), device=device)
    logratio = group_logratio(probs, groups)  # (all steps, K)
    start = sum(len(part_verbs) for part_verbs, _ in parts[: rank_world()[0]])
    return logratio[start : start + len(steps.last_verb)]


def old_and_reference_logprobs(agent, steps, batch):
    """Fill in, per step, the response's log-probs under the rollout's policy (its experts, old)
    and under the frozen base (experts off, the reference), in batches of similar lengths (less
    padding) whose memory is that of a PPO micro-batch. Token routing with --rspo: also each
    response token's expert per layer and its log-probability under the rollout's routers."""
    a = agent.args
    n_steps = len(steps.seq)
    batch.old_logp, batch.ref_logp = [None] * n_steps, [None] * n_steps
    if a.rspo and a.mode.token:
        batch.old_choice, batch.old_choice_logp = [None] * n_steps, [None] * n_steps
    by_length = torch.tensor([len(s) for s in steps.seq]).argsort()
    for mb in by_length.split(a.micro_batch or a.minibatch):
        seqs, starts, lengths = sequences(steps, mb)
        gates = step_gates_for(agent, mb.to(agent.device), batch.k)
        routed = agent.response_logprobs(seqs, starts, lengths, a.temperature, gates)[0]
        if batch.old_choice is not None:  # (n, layers), before the next pass resets them
            probs = agent.response_router_probs(starts, lengths)  # (n, layers, K)
            choice = probs.argmax(-1)
            choice_logp = probs.gather(-1, choice[..., None])[..., 0].log()
            for i, c, lp in zip(mb.tolist(), choice.split(lengths), choice_logp.split(lengths)):
                batch.old_choice[i] = c
                batch.old_choice_logp[i] = lp
        base = agent.response_logprobs(seqs, starts, lengths, a.temperature, None, experts_on=False)
        for i, lp_old, lp_ref, n in zip(mb.tolist(), routed, base[0], lengths):
            batch.old_logp[i] = lp_old[:n]
            batch.ref_logp[i] = lp_ref[:n]


def sequences(steps, idx):
    """The prompt + response token ids of steps idx, their prompt and their response lengths."""
    seqs = [steps.seq[i] for i in idx]
    starts = [steps.prompt_len[i] for i in idx]
    lengths = [steps.resp_len[i] for i in idx]
    return seqs, starts, lengths


def step_gates_for(agent, idx, k):
    """Gates (b, 1, K) of stored steps idx as they were in the rollout (no router gradient);
    None for token routing."""
    if agent.args.mode.token:
        return None
    return F.one_hot(k[idx], agent.args.experts[0]).float()[:, None]


# PPO update over one rollout: experts, router and critic step together ============================
def ppo_update(agent, opt, steps, batch, tau_state):
    """--epochs of minibatch PPO over one rollout. Data parallel: each rank cuts its share of the
    steps into the minibatches the whole needs; means, statistics and gradients are over all
    ranks. Returns the update's statistics."""
    a = agent.args
    sizes = all_gather(len(steps.seq))  # every rank's steps
    n_minibatches = min(math.ceil(sum(sizes) / a.minibatch), *sizes)
    stats = defaultdict(list)
    for _ in range(a.epochs):
        for mb in torch.randperm(len(steps.seq)).tensor_split(n_minibatches):
            tau = tau_at(tau_state["updates"], a.tau_start, a.tau_end, a.tau_steps)
            minibatch_stats = ppo_minibatch(agent, opt, steps, batch, mb.to(agent.device), tau)
            tau_state["updates"] += 1
            for key, val in minibatch_stats.items():
                stats[key].append(val)
    trained = {f"parameter {n}": p for n, p in agent.named_parameters() if p.requires_grad}
    check_finite(trained)
    out = {key: float(np.mean(v)) for key, v in stats.items()}
    if a.has_critic:  # how much of the returns' variance the critic explained at rollout time
        values = torch.cat(all_gather(batch.values.cpu()))
        returns = torch.cat(all_gather(batch.ret.cpu()))
        out["explained_variance"] = analysis.explained_variance(values, returns)
    else:  # each task type's share of steps with advantage 0 (groups that scored alike): no signal
        zero = (batch.adv.abs() < 1e-6).tolist()
        out.update(analysis.zero_advantage_shares(all_gather((steps.task_type, zero))))
    out["tau"] = tau_at(tau_state["updates"], a.tau_start, a.tau_end, a.tau_steps)
    return out


def ppo_minibatch(agent, opt, steps, batch, mb, tau):
    """One optimiser step on minibatch mb (this rank's steps): the router's losses and gates, the
    critic's value loss (gae), the policy loss through the LM, backward, step. Returns its
    statistics."""
    a = agent.args
    n_steps = global_sum(len(mb))
    opt.zero_grad(set_to_none=True)
    for e in agent.experts:  # the minibatch's forward passes record the experts they route to
        e.chosen.zero_()
    gates = step_gates_for(agent, mb, batch.k)
    router_terms, stats, router_p = {}, {}, None
    if a.mode.step_router:
        gates, router_terms, stats, router_p = router_losses(agent, steps, batch, mb, tau)
    aux_loss = sum(router_terms.values())  # the router's own terms and the critic's loss
    value_loss = None
    if a.has_critic:
        lanes = batch.lanes[mb]
        goal, goal_mask = steps.goal_states[lanes], steps.goal_mask[lanes]
        values = agent.critic(steps.features[batch.windows[mb]], goal, goal_mask)[:, 0]
        value_loss = shared_sum(0.5 * ((values - batch.ret[mb]) ** 2).sum() / n_steps)
        aux_loss = a.vf_coef * value_loss + aux_loss
    # The LM's micro-batches see the gates as a leaf cut from the router's graph; their summed
    # gradient goes through the router once, with the critic's and the router's own terms.
    gates_leaf = None
    if gates is not None:
        gates_leaf = gates.detach().requires_grad_(gates.requires_grad)
    policy_stats, checked = policy_backward(agent, steps, batch, mb, gates_leaf, router_p)
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


def router_losses(agent, steps, batch, mb, tau):
    """The step router on minibatch mb (this rank's steps; means over all ranks): p_t, and p_t+1 of
    the same episode, straight-through gates of the rollout's choices k, and its own losses
        switch  = lambda_s mean_t (1 - sum_k p_t,k p_t+1,k)    temporal consistency (phase)
        balance = lambda_b balance_loss(P, f)                   load balance
        info    = -lambda_i I(k; verb of the previous action)   behaviour information (phase)
    (trajectory routing decides once per episode: no switch to penalise). Returns gates (b, 1, K),
    {term: loss}, {statistic: value} and p (b, K)."""
    a = agent.args
    n_steps = global_sum(len(mb))
    lanes, k = batch.lanes[mb], batch.k[mb]
    next_step = batch.next[mb]  # -1: no step t+1
    windows = batch.router_windows[mb]
    if a.mode.every_step:  # and the next steps' windows, in the same pass
        windows = torch.cat([windows, batch.router_windows[next_step.clamp(min=0)]])
    goal_lanes = lanes.repeat(len(windows) // len(mb))
    goal, goal_mask = steps.goal_states[goal_lanes], steps.goal_mask[goal_lanes]
    probs = router_probs(agent.router, steps.features[windows], goal, goal_mask, tau)
    p = probs[: len(mb)]
    terms, stats = {}, {}
    if a.mode.every_step:
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
    if a.mode.every_step:
        # the rollout's log-ratios log(P_verb / P) held fixed: the gradient of I (group_logratio)
        info = shared_sum((p * batch.verb_logratio[mb]).sum() / n_steps)
        terms["info"] = -a.info_coef * info
        stats["verb_information"] = float(info.detach())
    return step_gates(p, k), terms, stats, p


def policy_backward(agent, steps, batch, mb, gates, router_p):
    """Backward of the policy loss of minibatch mb in micro-batches of --micro_batch steps, each
    weighted by its share of the minibatch's response tokens on all ranks. gates: a leaf (b, 1, K)
    cut from the router's graph (its gradient collects there), or None; router_p (b, K) or None.
    Returns token-weighted means of the statistics and the loss terms summed."""
    a = agent.args
    tokens = global_sum(sum(steps.resp_len[i] for i in mb))  # response tokens, all ranks
    parts = torch.arange(len(mb)).split(a.micro_batch or len(mb))
    token_balance = token_balance_term(agent, steps, mb, len(parts)) if a.mode.token else None
    mean, checked = defaultdict(float), defaultdict(float)
    for part in parts:
        idx = mb[part]
        part_gates = None if gates is None else gates[part]
        part_p = None if router_p is None else router_p[part]
        with agent.routing(part_gates):  # --grad_ckpt replays the layers in backward: route alike
            terms, stats, n_resp = policy_loss(agent, steps, batch, idx, part_gates, part_p)
            loss = terms["pg"] + a.kl_coef * terms["kl"] - a.ent_coef * terms["entropy"]
            balance = 0
            if token_balance:  # this micro-batch's share of every layer's balance
                balance = token_balance(idx)
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


def policy_loss(agent, steps, batch, idx, gates, router_p=None):
    """PPO's terms on the response tokens of steps idx, token means (each token carries its step's
    advantage): the clipped surrogate `pg`, `kl` = KL_k3(pi || pi_ref) and the `entropy`; the
    loss is pg + kl_coef kl - ent_coef entropy. gates (b, 1, K), or None for token routing;
    router_p (b, K): a step router's probabilities (RSPO). Returns the terms, their statistics
    (detached) and the number of response tokens."""
    a = agent.args
    seqs, starts, lengths = sequences(steps, idx)
    logp, entropy, mask = agent.response_logprobs(seqs, starts, lengths, a.temperature, gates)
    old = nn.utils.rnn.pad_sequence([batch.old_logp[i] for i in idx], batch_first=True)
    ref = nn.utils.rnn.pad_sequence([batch.ref_logp[i] for i in idx], batch_first=True)
    adv = batch.adv[idx][:, None].expand_as(logp)  # (b, T)
    weight = rspo_weight(agent, batch, idx, router_p, starts, lengths, mask) if a.rspo else None
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
    stats = {k: v.detach() for k, v in stats.items()}
    return {"pg": pg_loss, "kl": kl, "entropy": entropy}, stats, sum(lengths)


def rspo_weight(agent, batch, idx, router_p, starts, lengths, mask):
    """--rspo: each response token's weight (b, T) on its ratio, from how far the routing moved at
    the expert the rollout chose (router_shift_weight): a trust region on the router, whose choices
    the update replays. A step router: router_p against the rollout's; token routing: each layer's
    router at each token, read off the pass that just ran."""
    if agent.args.mode.token:
        probs = agent.response_router_probs(starts, lengths)  # (n, layers, K)
        choice = torch.cat([batch.old_choice[i] for i in idx])  # (n, layers)
        logp_new = probs.gather(-1, choice[..., None])[..., 0].log()
        logp_old = torch.cat([batch.old_choice_logp[i] for i in idx])
        weight = router_shift_weight(logp_new, logp_old, agent.args.rspo_floor)  # (n,)
        return torch.ones(mask.shape, device=mask.device).masked_scatter(mask, weight)
    chosen = batch.k[idx][:, None]
    logp_new = router_p.gather(1, chosen).log()
    logp_old = batch.router_p[idx].gather(1, chosen).log()
    weight = router_shift_weight(logp_new, logp_old, agent.args.rspo_floor)  # (b,)
    return weight[:, None].expand_as(mask)


def token_balance_term(agent, steps, mb, n_parts):
    """Token routing's own term: a function of a micro-batch idx of minibatch mb that gives, after
    idx's forward pass, its share of lambda_b times the mean over layers of each token router's
    balance_loss over all the minibatch's tokens (of all ranks). Over several micro-batches or
    ranks, each layer's mean probabilities and choices come from one no-grad pass over the
    minibatch first, so that each share is that of the whole."""
    a = agent.args
    n_tokens = global_sum(sum(len(steps.seq[i]) for i in mb))  # prompts too
    whole = None
    if n_parts > 1 or dist.is_initialized():
        seqs, starts, lengths = sequences(steps, mb)
        with torch.no_grad():
            agent.response_logprobs(seqs, starts, lengths, a.temperature, None)
        layers = real_tokens(agent.routing.token_probs, seqs)  # per layer (n, K)
        whole = [
            (global_sum(p.sum(0)) / n_tokens, all_choices(p.argmax(-1), p.shape[1])) for p in layers
        ]

    def share(idx):
        probs = real_tokens(agent.routing.token_probs, [steps.seq[i] for i in idx])
        stat = whole or [(p.detach().mean(0), p.argmax(-1)) for p in probs]
        shares = [balance_share(p, P, c, a.balance, n_tokens) for p, (P, c) in zip(probs, stat)]
        return a.balance_coef * torch.stack(shares).mean()

    return share


def real_tokens(token_probs, seqs):
    """Token routing: each layer's router probabilities (n, K) at the n real tokens of the last
    pass over seqs."""
    ones = [torch.ones(len(s), dtype=torch.bool) for s in seqs]
    real = nn.utils.rnn.pad_sequence(ones, batch_first=True)
    return [probs[real.to(probs.device)] for probs in token_probs]


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


# Losses: pure functions of tensors, each named after its equation =================================
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


def kl_k3(logp, ref_logp, mask):
    """KL(pi || pi_ref) per token with the k3 estimator exp(r) - r - 1, r = log pi_ref - log pi;
    token-mean."""
    r = torch.where(mask, ref_logp - logp, 0)
    return masked_mean(r.exp() - r - 1, mask)


def router_shift_weight(logp_new, logp_old, floor):
    """RSPO (arXiv 2510.23027): the weight of an importance ratio, stopgrad(max(exp(-d), floor)),
    d = mean over routing layers of |log p_new(k) - log p_old(k)| at the expert k the rollout
    chose. logp_new, logp_old (..., layers): a step router has one layer."""
    shift = (logp_new - logp_old).abs().mean(-1)
    return torch.exp(-shift).clamp(min=floor).detach()


def masked_mean(x, mask):
    if not mask.any():
        raise ValueError("masked_mean over an empty mask")
    return torch.where(mask, x, 0).sum() / mask.sum()


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


def balance_share(p, P, k, mode, n):
    """One part's share of balance_loss over a batch of n decisions cut into parts (gradient
    accumulation): p (n_i, K) the part's probabilities; P (K,) and k (n,) the whole batch's mean
    probabilities and choices. balance_loss sees the probabilities only through P = mean p, so the
    parts' gradients sum to the batch loss's gradient exactly."""
    P = P.detach().requires_grad_()
    (dP,) = torch.autograd.grad(balance_loss(P[None], k, mode), P)  # (K,) at the whole batch's P
    return (dP * p.sum(0)).sum() / n


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


# Phase router (and critic): one step encoder class, separate parameters ===========================
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


def tau_at(update, tau_start, tau_end, tau_steps):
    """Router temperature annealed linearly from tau_start to tau_end over tau_steps updates."""
    return tau_start + (tau_end - tau_start) * min(update / tau_steps, 1.0)


# LoRA experts on the frozen base's linear layers ==================================================
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
                experts = LoRAExperts(child, K, r, args.alpha, routing, args.mode.token)
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

    for layer in layers:
        layer.forward = functools.partial(checkpointed, layer.forward)


def checkpointed(forward, *args, **kwargs):
    """forward(*args, **kwargs), checkpointed where autograd records; plain in no-grad passes."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


# The agent: frozen LM + experts + router + critic, and loading the model ==========================
class Agent(nn.Module):
    """The frozen LM with its experts, the router and the critic. base: a (model, tokenizer) pair
    already frozen (freeze_base) instead of --model's (bench.py's random-weight models)."""

    def __init__(self, args, device, base=None):
        super().__init__()
        self.args = args
        self.device = device
        self.lm, self.tok = base if base is not None else load_model(args, device)
        self.prompt_format = prompt_format(args)
        self.clock = analysis.Clock(device)
        self.caches, self.gate_buffers = {}, {}  # --compile_decode: one of each per batch size
        torch.manual_seed(args.seed)  # experts, router and critic start alike, built or loaded
        self.routing, self.experts = attach_experts(self.lm, args)
        if args.grad_ckpt:
            checkpoint_layers(self.lm)
        d, K = self.lm.config.hidden_size, args.experts[0]
        hidden, layers = args.router_hidden, args.router_layers
        self.router = None
        if args.mode.step_router:
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
            self.gate_buffers[batch_size] = gates.new_zeros(batch_size, 1, gates.shape[-1])
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


def load_model(args, device):
    """The frozen base and its tokenizer: `tiny` built and warmed up here, anything else loaded."""
    if args.dtype != "auto":
        dtype = getattr(torch, args.dtype)  # of the frozen base; trained parts stay float32
    elif device.type == "cuda":
        dtype = torch.bfloat16
    else:
        dtype = torch.float32
    if args.model == "tiny":
        vocabulary = envs.vocabulary(args.env)
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


# Logs and evaluation ==============================================================================
def gather_steps(steps, lanes):
    """The per-step fields that statistics read, of every rank's rollout over its `lanes` (lane
    numbers made global), as one Rollout."""
    names = ("lane", "reward", "won", "task_type", "k", "phase", "invalid", "resp_len")
    mine = {name: getattr(steps, name) for name in names}
    mine["lane"] = [lanes[n] for n in steps.lane]
    parts = all_gather(mine)
    return Rollout(**{name: sum((part[name] for part in parts), []) for name in names})


EVAL_SEED = 10_000_000


def evaluate(agent, tau):
    """The policy on --eval_episodes fixed episodes of --eval_split (temperature --eval_temperature,
    argmax router). Returns the eval/* metrics, the tables (text) and this rank's own steps."""
    a = agent.args
    lanes = my_lanes(a.eval_episodes)  # this rank's share of the fixed episodes
    env_batch = envs.make_env_batch(a.env, len(lanes), a.max_steps, a.eval_split, a.alfworld_data)
    seeds = [EVAL_SEED + i for i in lanes]
    # a sampling stream of its own: the same policy always scores the same, training is untouched
    devices = [agent.device] if agent.device.type == "cuda" else []
    with contextlib.closing(env_batch), torch.random.fork_rng(devices):
        torch.manual_seed(EVAL_SEED + rank_world()[0])
        mine = rollout(agent, env_batch, seeds, tau, a.eval_temperature, greedy_router=True)
    steps = gather_steps(mine, lanes)
    task_types = envs.TASK_COLUMNS[a.env]
    metrics, tables = analysis.evaluation_metrics(steps, a.eval_episodes, a.experts[0], task_types)
    return metrics, tables, mine


def report_evaluation(agent, it, tau):
    """Evaluate during training; rank 0 prints the report and appends it to eval.log. Returns the
    eval/* metrics and the evaluation's time."""
    t = time.time()
    metrics, tables, _ = evaluate(agent, tau)
    if rank_world()[0] == 0:
        report = analysis.evaluation_report(it, metrics, tables)
        tqdm.write(report)
        with open(os.path.join(agent.args.out_dir, "eval.log"), "a") as f:
            f.write(report + "\n")
    return {**metrics, "eval_s": time.time() - t}


def diagnose(agent, steps, batch):
    """--diagnostics: the experts' parameter occupancy and gradient conflict on this rollout, at the
    rollout's parameters (analysis.expert_diagnostics). The gradient of a set of steps is that of
    the share of the policy-gradient term (the clipped surrogate alone) their response tokens
    carry, w.r.t. each expert's A and B, at the rollout's routing, summed over all ranks."""
    a = agent.args
    K = a.experts[0]
    params = [p for k in range(K) for e in agent.experts for p in (e.A[k], e.B[k])]  # by expert
    tokens = global_sum(sum(steps.resp_len))

    def gradient(idx):  # (K, n): expert k's A and B in every wrapped linear; zeros for no steps
        acc = [torch.zeros_like(p) for p in params]
        idx = torch.tensor(idx, dtype=torch.long)
        for part in idx.split(a.micro_batch or a.minibatch) if len(idx) else []:
            gates = step_gates_for(agent, part.to(agent.device), batch.k)
            with agent.routing(gates):  # backward inside: --grad_ckpt replays with these gates
                # at the rollout's parameters the router has not moved: RSPO's weights are 1
                p = batch.router_p[part]
                terms, _, n_resp = policy_loss(agent, steps, batch, part, gates, p)
                grads = torch.autograd.grad(n_resp / tokens * terms["pg"], params)
                acc = [x + y for x, y in zip(acc, grads)]
        return global_sum(torch.cat([x.flatten() for x in acc])).view(K, -1)

    types = sorted({c for part in all_gather(steps.task_type) for c in part})
    return analysis.expert_diagnostics(steps.task_type, steps.lane, types, gradient)


# Data parallel (torchrun): each rank steps its share of the lanes; identities in one process ======
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


# Checkpoints (atomic), resume and logs ============================================================
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
    "model env seed tiny_steps tiny_prior routing num_experts rank dense_rank alpha "
    "targets router_hidden router_layers"
).split()


CHECKPOINT_KEYS = set("trainable optimizer iteration tau_updates args rng world_size".split())


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
    saved = state["args"]
    retired = [f"--{k} {saved[k]}" for k, v in RETIRED.items() if saved.get(k, v) != v]
    retired += [f"--routing {saved['routing']}"] if saved["routing"] not in ROUTINGS else []
    need(
        not retired,
        f"--resume {path} was trained with {', '.join(retired)}, which pamoe.py dropped in "
        f"commit 3abdbb3; use it with the commit before (git checkout ac06ee1)",
    )
    return state


# the premise search's flags, removed in commit 3abdbb3, at the values that run as today
RETIRED = {"toy_variant": "demo", "train_tasks": "", "task_norm": False, "minibatches": 0}


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
        analysis.keep_until(metrics, start, lambda line: json.loads(line)["iteration"])
        analysis.keep_until(reports, start, analysis.report_iteration)
    return start


def log_metrics(out_dir, m):
    """One line of metrics.jsonl (rank 0)."""
    if rank_world()[0] == 0:
        line = {k: float(v) if k != "iteration" else v for k, v in m.items()}
        with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")


# Flag checks and main =============================================================================
def need(ok, message):
    """A bad input stops the run at once: one line that names the flag, the value and the fix."""
    if not ok:
        raise SystemExit(f"pamoe.py: error: {message}")


def boolean(text):
    if text.lower() not in ("true", "false", "1", "0", "on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; use true or false")
    return text.lower() in ("true", "1", "on")


def parse_args(argv=None, games=True):
    """Args from a command line, every flag checked (check_flags) before any model loads."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS
    )
    for f in dataclasses.fields(Args):
        kind = boolean if isinstance(f.default, bool) else type(f.default)
        help_text = f"{f.metadata['help']} (default: {f.default!r})"
        if isinstance(f.metadata["valid"], tuple):
            help_text = f"{' | '.join(f.metadata['valid'])}: {help_text}"
        if kind is boolean:  # --flag alone: true
            parser.add_argument(f"--{f.name}", type=kind, help=help_text, nargs="?", const=True)
        else:
            parser.add_argument(f"--{f.name}", type=kind, help=help_text)
    # only the flags on the command line; Args fills in the defaults
    given = vars(parser.parse_args(argv))
    if given.get("eval_only") or given.get("export"):  # a trained agent's flags: trained.py's
        import trained

        given = trained.trained_flags(given)
    return check_flags(Args(**given), games)


def check_flags(a, games=True):
    """Every flag by its meaning, before any model loads: each against its own valid values (Args),
    then by topic. games=False: a run that plays no game (bench.py preflight) needs no ALFWorld
    data, unless `tiny` warms up on its episodes. Returns a with --device auto resolved."""
    for f in dataclasses.fields(Args):
        value, valid = getattr(a, f.name), f.metadata["valid"]
        if isinstance(valid, tuple):
            need(value in valid, f"unknown --{f.name} {value!r}; use {' | '.join(valid)}")
        elif valid:
            need(
                within(value, valid),
                f"--{f.name} {value} is out of range; use a value in {valid}",
            )
    check_environment(a, games)
    check_sizes(a)
    check_combinations(a)
    check_paths(a)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    return a


def within(x, interval):
    lo, hi = map(float, interval[1:-1].split(","))
    above = lo <= x if interval[0] == "[" else lo < x
    below = x <= hi if interval[-1] == "]" else x < hi
    return above and below


def check_environment(a, games):
    """--env alfworld: the package, and the games unless none is played."""
    if a.env != "alfworld":
        return
    need(
        importlib.util.find_spec("alfworld") is not None,
        "--env alfworld needs the alfworld package: pip install alfworld==0.4.2 "
        "(bash run.sh installs it)",
    )
    a.alfworld_data = a.alfworld_data or os.environ.get("ALFWORLD_DATA", "")
    error = envs.alfworld_data_error(a.alfworld_data, ("train", a.eval_split))
    need(
        error is None or not (games or a.model == "tiny"),
        f"--alfworld_data {a.alfworld_data!r}: {error}",
    )


def check_sizes(a):
    """Sizes that exhaust memory, evaluate nothing, or do not divide among processes and groups."""
    n = max(a.num_envs, a.eval_episodes)  # a rollout's steps all stay in memory
    need(
        n * a.max_steps <= 100_000,
        f"--num_envs/--eval_episodes {n} x --max_steps {a.max_steps} steps per rollout "
        f"would exhaust memory; keep the product <= 100000",
    )
    need(
        a.eval_episodes or not a.eval_every,
        f"--eval_episodes 0 with --eval_every {a.eval_every} evaluates nothing; "
        f"set --eval_episodes >= 1 or --eval_every 0",
    )
    # torchrun's processes share the environments and the evaluation episodes
    world = rank_world()[1]
    evaluated = a.eval_episodes if a.eval_every else world
    need(
        min(a.num_envs, evaluated) >= world,
        f"--num_envs {a.num_envs} and --eval_episodes {a.eval_episodes}: too few for "
        f"{world} processes; use >= {world}",
    )
    need(
        a.has_critic or a.group_size >= 2,
        f"--advantage {a.advantage} normalises returns within game groups: a group of one "
        f"would turn raw returns into advantages; use --group_size >= 2 (paper: 8)",
    )
    need(
        a.num_envs % (a.group_size * world) == 0,
        f"--num_envs {a.num_envs} is not a multiple of --group_size {a.group_size} x "
        f"{world} processes: a game group never spans processes; use a multiple of "
        f"{a.group_size * world}",
    )
    need(
        a.action_format == "label" or a.max_new_tokens >= 16,
        f"--max_new_tokens {a.max_new_tokens} cannot hold a tagged answer "
        f"(<think></think><action>1</action>: ~15 tokens); use >= 16 (paper: 512)",
    )


def check_combinations(a):
    """Flags that cannot work together."""
    need(
        a.clip_c == 0 or a.clip_c > 1,
        f"--clip_c {a.clip_c}: the dual clip bounds a negative advantage's loss at -c A, "
        f"which needs c > 1; use 0 (off) or e.g. 3 (verl)",
    )
    need(
        not a.rspo or not a.mode.one_expert,
        "--rspo weighs ratios by how far the router moved; dense routing has no router: drop "
        "--rspo or use --routing phase, trajectory or token",
    )
    need(
        all(t.isidentifier() for t in a.targets.split(",")),
        f"--targets {a.targets!r}: give module names separated by commas only, e.g. q_proj,v_proj",
    )
    need(
        not a.show or a.eval_only,
        f"--show {a.show} prints episodes of an evaluation: add --eval_only --resume <checkpoint>",
    )
    need(
        not (a.eval_only and a.eval_episodes == 0),
        "--eval_only with --eval_episodes 0 evaluates nothing; set --eval_episodes >= 1",
    )
    need(
        a.action_format == "label" or a.model != "tiny",
        "--action_format tagged with --model tiny: tiny's words are the toy's and cannot "
        "write the tags; use the label format with tiny, or a pretrained model for tags",
    )
    need(
        not a.compile_decode or not a.mode.token,
        "--compile_decode: token routing records each token's choice, which a CUDA graph's "
        "replay would overwrite; drop --compile_decode for --routing token",
    )
    need(
        not a.export or not a.mode.token,
        "--export: token routing picks an expert per token and layer, which no per-request "
        "adapter can serve; export a phase, trajectory or dense run",
    )


def check_paths(a):
    """Folders and files that must exist or be writable, and the device."""
    a_path = a.model.startswith(("/", ".")) or os.path.exists(a.model)
    need(
        not a_path or os.path.isdir(a.model),
        f"--model {a.model}: no such folder; give a model folder, a Hugging Face name or tiny",
    )
    folders = [("out_dir", a.out_dir)]
    if a.export:
        folders.append(("export", a.export))
    for flag, folder in folders:
        with contextlib.suppress(OSError):  # one that cannot be created stops below
            os.makedirs(folder, exist_ok=True)
        need(
            os.path.isdir(folder) and os.access(folder, os.W_OK),
            f"--{flag} {folder!r}: not a folder that can be created and written; "
            f"choose another one",
        )
    need(
        not a.resume or os.path.isfile(a.resume),
        f"--resume {a.resume}: no such file; point it at a checkpoint.pt or drop the flag",
    )
    need(
        a.device != "cuda" or torch.cuda.is_available(),
        "--device cuda but no CUDA device is visible; use --device cpu (or auto)",
    )


def main(argv=None):
    args = parse_args(argv)
    if args.eval_only or args.export:  # using a trained agent lives beside, in trained.py
        import trained  # (run as a script, this file is imported again there as `pamoe`)

        return run(trained.use, args)
    return run(train, args)


def run(job, args):
    """job(args), train or trained.use: a broken env worker stops it with the fix, and torchrun's
    process group is left however it ends."""
    try:
        return job(args)
    except envs.EnvWorkerError as e:  # metrics lines are whole iterations, checkpoints atomic
        ckpt = os.path.join(args.out_dir, "checkpoint.pt")
        raise SystemExit(
            f"pamoe.py: error: {e}. The unfinished iteration was not logged and {ckpt} (if any) is "
            f"intact: fix or remove that game, then rerun with --resume {ckpt}"
        ) from e
    finally:
        if dist.is_initialized():  # torchrun's group, which the job joined
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
