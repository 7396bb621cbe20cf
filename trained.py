"""trained.py: using a trained PA-MoE agent, as nanoGPT's sample.py uses a trained GPT.

    python trained.py --resume runs/pamoe/checkpoint.pt --eval_only --show 2
    python trained.py --resume runs/pamoe/checkpoint.pt --export runs/pamoe/export

--eval_only evaluates the checkpoint with the flags it was trained with (its own, but for where
and how to evaluate: --eval_split, --eval_episodes, --eval_temperature, --out_dir, --device,
--dtype, --alfworld_data) into <out_dir>/eval.json and prints the report; --show N first prints N
whole episodes step by step; --export DIR writes its experts as PEFT LoRA adapters, its router and
how to serve them. pamoe.py hands the same flags here: `python pamoe.py --resume ... --eval_only`.
"""

import dataclasses
import json
import os
import time

import torch

import analysis
import pamoe
from analysis import LETTERS


def use(args):
    """--eval_only and --export (args: pamoe.parse_args's): the checkpoint's trained agent, used as
    it is. Returns the evaluation's eval/* metrics and its time, or {}."""
    device, rank = pamoe.join_processes(args)
    pamoe.seed_everything(args.seed)
    agent = pamoe.Agent(args, device)
    tau_state = {"updates": 0}
    it = pamoe.load_checkpoint(args.resume, agent, None, tau_state)
    tau = pamoe.tau_at(tau_state["updates"], args.tau_start, args.tau_end, args.tau_steps)
    if args.export and rank == 0:
        export_experts(agent, args.export, it, tau)
    if not args.eval_only:
        return {}
    t = time.time()
    metrics, tables, mine = pamoe.evaluate(agent, tau)
    if rank == 0:
        if args.show:
            print(show_episodes(mine, args.show, args.mode.token))
        print(analysis.evaluation_report(it, metrics, tables))
        result = {"checkpoint": args.resume, "iteration": it}
        for key in ("eval_split", "eval_episodes", "eval_temperature"):
            result[key] = getattr(args, key)
        result.update(metrics=metrics, tables=tables)
        path = os.path.join(args.out_dir, "eval.json")
        with open(f"{path}.tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(f"{path}.tmp", path)  # atomic
    return {**metrics, "eval_s": time.time() - t}


# Where and how to evaluate or export a checkpoint: with --eval_only or --export every other flag
# is the checkpoint's.
USE_FLAGS = (
    "resume eval_only show export eval_split eval_episodes eval_temperature out_dir device dtype "
    "alfworld_data"
).split()


def trained_flags(given):
    """--eval_only / --export: the flags the checkpoint was trained with, but for USE_FLAGS given on
    the command line (--out_dir: the checkpoint's folder unless given; --device: auto unless
    given). A given flag that contradicts the checkpoint stops the run: the agent is what it was
    trained as."""
    pamoe.need(
        given.get("resume"),
        "--eval_only and --export use a trained agent: add --resume <out_dir>/checkpoint.pt",
    )
    trained = pamoe.read_checkpoint(given["resume"])["args"]
    names = {f.name for f in dataclasses.fields(pamoe.Args)}
    trained = {k: v for k, v in trained.items() if k in names}  # drop another version's flags
    differ = [
        f"--{k} {v} (trained: {trained.get(k)})"
        for k, v in given.items()
        if k not in USE_FLAGS and trained.get(k) != v
    ]
    pamoe.need(
        not differ,
        f"--resume {given['resume']} was trained with other flags: {', '.join(differ)}; "
        f"drop them (--eval_only and --export take the checkpoint's)",
    )
    where = {"device": "auto", "out_dir": os.path.dirname(given["resume"]) or "."}
    asked = {k: v for k, v in given.items() if k in USE_FLAGS}
    return {**trained, **where, **asked}


def show_episodes(steps, n, token_routed):
    """--show: the first n episodes of a rollout's steps, step by step: observation, the model's
    response, the action it parses to (or invalid), the step's expert with the router's
    probabilities, the reward."""
    lines = []
    for lane in sorted(set(steps.lane))[:n]:
        mine = [i for i, x in enumerate(steps.lane) if x == lane]
        first = mine[0]
        lines.append(f"=== episode {lane + 1} ({steps.task_type[first]}): {steps.goal[first]}")
        for i in mine:
            p = " ".join(f"{x:.2f}" for x in steps.router_p[i])
            if token_routed:
                p = "per token"
            lines.append(f"  step {steps.t[i] + 1} observation: {steps.obs[i]}")
            lines.append(
                f"    response {steps.response[i]!r} -> {steps.action[i] or 'invalid'} | "
                f"expert {LETTERS[steps.k[i]]} (router p {p}) | reward {steps.reward[i]:+.1f}"
            )
        won = any(steps.won[i] for i in mine)
        lines.append(f"  {'won' if won else 'lost'} after {len(mine)} steps")
    return "\n".join(lines)


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
    if a.mode.step_router:
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


def main(argv=None):
    args = pamoe.parse_args(argv)
    pamoe.need(
        args.eval_only or args.export,
        "trained.py uses a trained agent: add --eval_only and/or --export DIR to --resume CKPT",
    )
    return pamoe.run(use, args)


if __name__ == "__main__":
    main()
