"""Tests for PA-MoE: equivalences, gradients, pure algorithm functions against naive references, the
toy env, checkpoints and an end-to-end learning run. CPU only, no downloads."""

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import analysis
import envs
import pamoe

SMALL = (
    "--rank 4 --alpha 8 --router_hidden 32 --router_layers 1 --num_envs 4 --max_steps 6 "
    "--minibatch 8 --epochs 1 --eval_every 0 --tiny_steps 0"
).split()


def make_agent(*extra, seed=0):
    args = pamoe.parse_args(SMALL + list(extra))
    torch.manual_seed(seed)
    return pamoe.Agent(args, torch.device("cpu"))


def randomize_experts(agent, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in agent.experts:
            for b in m.B:
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def rollout_data():
    agent = make_agent()
    R = pamoe.rollout(
        agent, envs.make_env_batch("toy", 4, 6), [1, 2, 3, 4], 2.0, 1.0, greedy_router=False
    )
    return agent, R


def batch_of(agent, R, n):
    return R.seq[:n], R.prompt_len[:n], R.resp_len[:n]


# --- LoRA experts ---------------------------------------------------------------------------------
def test_zero_initialised_experts_leave_the_base_model_unchanged(rollout_data):
    agent, R = rollout_data
    seqs, pl, rl = batch_of(agent, R, 6)
    gates = F.one_hot(torch.tensor([0, 1, 2, 3, 1, 0]), 4).float()[:, None]
    with torch.no_grad():
        on = agent.response_logprobs(seqs, pl, rl, 1.0, gates)[0]
        off = agent.response_logprobs(seqs, pl, rl, 1.0, None, experts_on=False)[0]
    assert torch.equal(on, off)


@pytest.mark.parametrize("routing", ["phase", "token"])
def test_mixed_expert_batch_equals_each_sequence_run_alone(routing):
    agent = make_agent("--routing", routing)
    randomize_experts(agent)
    R = pamoe.rollout(
        agent, envs.make_env_batch("toy", 4, 6), [1, 2, 5, 9], 2.0, 1.0, greedy_router=False
    )
    seqs, pl, rl = batch_of(agent, R, 4)
    k = torch.tensor([3, 0, 2, 1])

    def gates(idx):
        return None if routing == "token" else F.one_hot(k[idx], 4).float()[:, None]

    with torch.no_grad():
        together = agent.response_logprobs(seqs, pl, rl, 1.0, gates(torch.arange(4)))[0]
        for i in range(4):
            alone = agent.response_logprobs(
                seqs[i : i + 1], pl[i : i + 1], rl[i : i + 1], 1.0, gates(torch.tensor([i]))
            )[0]
            torch.testing.assert_close(
                together[i, : rl[i]], alone[0, : rl[i]], atol=1e-5, rtol=1e-5
            )
        off = agent.response_logprobs(seqs, pl, rl, 1.0, None, experts_on=False)[0]
    assert (together - off).abs().max() > 1e-4  # the experts do act


def test_only_routed_experts_receive_gradient(rollout_data):
    agent = make_agent()
    randomize_experts(agent)
    _, R = rollout_data
    seqs, pl, rl = batch_of(agent, R, 4)
    k = torch.tensor([0, 2, 2, 0])  # experts 1 and 3 unrouted
    logp, _, mask = agent.response_logprobs(seqs, pl, rl, 1.0, F.one_hot(k, 4).float()[:, None])
    logp[mask].sum().backward()
    for m in agent.experts:
        for e in range(4):
            gA, gB = m.A[e].grad, m.B[e].grad
            if e in (1, 3):
                assert torch.count_nonzero(gA) == 0 and torch.count_nonzero(gB) == 0
            else:
                assert gB.abs().sum() > 0
        assert m.base.weight.grad is None
    assert all(
        p.grad is None for n, p in agent.lm.named_parameters() if ".A." not in n and ".B." not in n
    )


def test_stacked_experts_under_adamw_step_exactly_as_k_separate_adapters():
    """Train only what you route: LoRAExperts (one stacked pass) against K separate adapters, each
    sequence through its own expert's A_k and B_k, under AdamW with weight decay, over steps whose
    routings leave different experts out. An expert no sequence chose keeps its weights and its
    AdamW state (exp_avg, exp_avg_sq, step), as a separate adapter without a gradient does."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    stacked = pamoe.LoRAExperts(base, 3, 2, 4.0, pamoe.Routing(), token_routing=False)
    with torch.no_grad():
        for b in stacked.B:
            b.normal_()
    separate = [
        [p.detach().clone().requires_grad_() for p in (stacked.A[k], stacked.B[k])]
        for k in range(3)
    ]
    ours = torch.optim.AdamW([*stacked.A, *stacked.B], lr=0.1, weight_decay=0.1)
    theirs = torch.optim.AdamW([p for pair in separate for p in pair], lr=0.1, weight_decay=0.1)
    weights = torch.randn(4, 3, 5)
    # expert 2, then 0 and 1, then 0 and 2 idle
    for k in ([0, 0, 1, 1], [2, 2, 2, 2], [0, 1, 2, 0], [1, 1, 1, 1]):
        x, k = torch.randn(4, 3, 6), torch.tensor(k)
        ours.zero_grad(set_to_none=True)
        stacked.chosen.zero_()  # as ppo_update does at each minibatch
        with stacked.routing(F.one_hot(k, 3).float()[:, None]):
            (stacked(x) * weights).sum().backward()
        pamoe.drop_unrouted_gradients([stacked])
        ours.step()
        theirs.zero_grad(set_to_none=True)
        y = torch.stack(
            [
                base(x[i]) + 2.0 * x[i] @ separate[e][0] @ separate[e][1]
                for i, e in enumerate(k.tolist())
            ]
        )
        (y * weights).sum().backward()
        theirs.step()
        for e in range(3):
            for mine, other in zip((stacked.A[e], stacked.B[e]), separate[e]):
                torch.testing.assert_close(mine.detach(), other.detach(), atol=1e-6, rtol=0)
                state, ref = ours.state.get(mine, {}), theirs.state.get(other, {})
                assert state.keys() == ref.keys()
                for key in state:
                    torch.testing.assert_close(state[key], ref[key], atol=1e-6, rtol=0)
    # expert 2 was idle in two of the four steps
    assert float(theirs.state[separate[2][0]]["step"]) == 2


def test_an_expert_no_step_chose_keeps_its_weights_and_adamw_state_through_the_update(rollout_data):
    """ppo_update on a rollout routed to experts A, B and C only: D's A and B and its (absent) AdamW
    state stay as they were; the routed experts move."""
    agent = make_agent("--num_experts", "4")
    randomize_experts(agent)
    _, R = rollout_data
    R = dataclasses.replace(R, k=[i % 3 for i in range(len(R.k))])  # expert D never chosen
    before = agent.trainable_state()
    opt = torch.optim.AdamW(agent.param_groups(), weight_decay=0.1)
    pamoe.ppo_update(agent, opt, R, pamoe.prepare_batch(agent, R), {"updates": 0})
    after = agent.trainable_state()
    idle = [n for n in before if re.search(r"\.[AB]\.3$", n)]
    moved = [n for n in before if re.search(r"\.[AB]\.[012]$", n)]
    assert idle and all(torch.equal(before[n], after[n]) for n in idle)
    assert all(not torch.equal(before[n], after[n]) for n in moved)
    named = dict(agent.named_parameters())
    assert not any(named[n] in opt.state for n in idle) and all(
        named[n] in opt.state for n in moved
    )


def test_straight_through_gates_pass_router_gradient_but_keep_one_hot_forward():
    p = torch.tensor([[0.2, 0.5, 0.3]], requires_grad=True)
    g = pamoe.step_gates(p, torch.tensor([2]))
    assert torch.equal(g.detach(), torch.tensor([[[0.0, 0.0, 1.0]]]))
    (g * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(p.grad, torch.tensor([[1.0, 2.0, 3.0]]))


# --- pure algorithm functions ---------------------------------------------------------------------
def naive_gae(episodes, gamma, lam):
    """episodes: list of (rewards, values, terminated, bootstrap_value). Plain per-episode loop."""
    out = []
    for rewards, values, terminated, boot in episodes:
        T, adv, A = len(rewards), [0.0] * len(rewards), 0.0
        for t in reversed(range(T)):
            if t == T - 1:
                nxt = 0.0 if terminated else boot
            else:
                nxt = values[t + 1]
            delta = rewards[t] + gamma * nxt - values[t]
            A = delta + gamma * lam * (A if t < T - 1 else 0.0)
            adv[t] = A
        out.append(adv)
    return out


def test_gae_equals_naive_loop_with_termination_and_truncation():
    g = torch.Generator().manual_seed(0)
    lengths, terminated = [5, 3, 7, 1], [True, False, False, True]
    N, T = len(lengths), max(lengths)
    rew, V = torch.randn(N, T, generator=g), torch.randn(N, T, generator=g)
    boot = torch.randn(N, generator=g)
    next_V, term, dones = torch.zeros(N, T), torch.zeros(N, T), torch.ones(N, T)
    for n, L in enumerate(lengths):
        next_V[n, : L - 1] = V[n, 1:L]
        next_V[n, L - 1] = boot[n]
        term[n, L - 1] = float(terminated[n])
        dones[n, : L - 1] = 0
    adv, ret = pamoe.gae(rew, V, next_V, term, dones, 0.95, 0.9)
    ref = naive_gae(
        [
            (rew[n, :L].tolist(), V[n, :L].tolist(), terminated[n], float(boot[n]))
            for n, L in enumerate(lengths)
        ],
        0.95,
        0.9,
    )
    for n, L in enumerate(lengths):
        torch.testing.assert_close(adv[n, :L], torch.tensor(ref[n]))
        torch.testing.assert_close(ret[n, :L], adv[n, :L] + V[n, :L])


def test_prepare_batch_returns_are_gae_bootstrapped_from_the_final_observation_at_truncation():
    """prepare_batch's returns (A + V) against the naive loop on each episode, with V the critic's
    value of each step's window and, where the step limit cut an episode, of the final observation's
    window."""
    agent = make_agent()
    R = pamoe.rollout(
        agent, envs.make_env_batch("toy", 4, 3), [1, 2, 3, 4], 2.0, 1.0, greedy_router=False
    )
    B = pamoe.prepare_batch(agent, R)
    assert R.final_window  # 3 steps: some lanes truncated

    @torch.no_grad()
    def value(window, lane):
        return float(
            agent.critic(
                R.features[torch.tensor([window])], R.goal_states[[lane]], R.goal_mask[[lane]]
            )[0, 0]
        )

    for n in range(4):
        idx = [i for i, lane in enumerate(R.lane) if lane == n]  # its steps, in order
        values = [value(R.window[i], n) for i in idx]
        boot = value(R.final_window[n], n) if n in R.final_window else 0.0
        (adv,) = naive_gae(
            [([R.reward[i] for i in idx], values, R.terminated[idx[-1]], boot)],
            agent.args.gamma,
            agent.args.gae_lambda,
        )
        torch.testing.assert_close(
            B.ret[idx], torch.tensor(adv) + torch.tensor(values), atol=1e-5, rtol=1e-5
        )


def test_ppo_loss_clips_only_in_the_advantages_favour_and_kl_is_k3_of_pi_against_the_reference():
    """The clipped surrogate max(-A r, -A clip(r, 1 - eps, 1 + eps)) on the four branches: a ratio
    that left the range in the advantage's favour is clipped (no gradient); one that left it against
    the advantage is not (the pessimistic
    bound: A > 0 with r < 1 - eps, A < 0 with 1 + eps < r < 3). k3 pinned both ways."""
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0]])
    old = torch.zeros(1, 5)
    mask = torch.ones(1, 5, dtype=torch.bool)
    logp = torch.tensor([[0.5, -0.5, -0.5, 0.5, 0.1]], requires_grad=True)
    # 1.65 (A > 0: clipped), 0.61 (A < 0: clipped), 0.61 (A > 0), 1.65 (A < 0), 1.11
    ratio = logp.detach().exp()
    loss, clipfrac, approx_kl = pamoe.ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    loss.backward()
    # per token, -A r or -A clip(r)
    expected = torch.tensor([-1.2, 0.8, -ratio[0, 2], ratio[0, 3], -ratio[0, 4]])
    torch.testing.assert_close(loss.detach(), expected.mean())
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] == 0  # clipped in the advantage's favour
    # d(-A r)/d log r = -A r, token mean
    torch.testing.assert_close(logp.grad[0, 2:], (-adv * ratio)[0, 2:] / 5)
    assert clipfrac == pytest.approx(4 / 5)
    assert float(approx_kl.detach()) == pytest.approx(-0.1 / 5)
    assert float(pamoe.kl_k3(torch.zeros(1, 5), torch.full((1, 5), -0.3), mask)) == pytest.approx(
        0.040818, abs=1e-6
    )
    assert float(pamoe.kl_k3(torch.full((1, 5), -0.3), torch.zeros(1, 5), mask)) == pytest.approx(
        0.049859, abs=1e-6
    )
    with pytest.raises(ValueError):
        pamoe.masked_mean(logp, torch.zeros(1, 5, dtype=torch.bool))


def test_dual_clip_bounds_a_negative_advantages_loss_and_the_log_ratio_is_clamped():
    """verl's dual clip (c = 3): a token with A < 0 costs at most -c A however large its ratio;
    ratios below c and positive advantages are untouched; the log-ratio is clamped to [-20, 20]."""
    adv = torch.tensor([[-1.0, -1.0, 1.0, -2.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    logp = torch.tensor([[20.0, 2.0, 20.0, 1.1]]).log().requires_grad_()
    old = torch.zeros(1, 4)
    dual, _, _ = pamoe.ppo_policy_loss(logp, old, adv, mask, 0.2, clip_c=3.0)
    plain, _, _ = pamoe.ppo_policy_loss(logp.detach(), old, adv, mask, 0.2)
    # per token: min(max(20, 1.2), 3) = 3; 2 (below c); -1.2 (clipped, A > 0); 2.2 (below 2 c)
    assert float(dual.detach()) == pytest.approx((3 + 2 - 1.2 + 2.2) / 4)
    assert float(plain) == pytest.approx((20 + 2 - 1.2 + 2.2) / 4)
    dual.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 2] == 0 and logp.grad[0, 1] != 0
    far = torch.tensor([[50.0, -50.0]])
    loss, _, approx_kl = pamoe.ppo_policy_loss(
        far, torch.zeros(1, 2), torch.ones(1, 2), mask[:, :2], 0.2
    )
    assert float(approx_kl) == pytest.approx(0.0) and torch.isfinite(loss)  # -20 and +20: mean 0


def test_rspo_weight_is_the_floored_exponential_of_the_mean_router_shift():
    new = torch.tensor([[-0.1, -0.5], [-1.0, -1.0], [-0.2, -3.0]], requires_grad=True)
    old = torch.tensor([[-0.1, -0.3], [-1.0, -1.0], [-0.2, -0.2]])
    w = pamoe.router_shift_weight(new, old, 0.8)
    naive = [
        max(math.exp(-sum(abs(a - b) for a, b in zip(n, o)) / 2), 0.8)
        for n, o in zip(new.tolist(), old.tolist())
    ]
    torch.testing.assert_close(w, torch.tensor(naive))
    assert w[1] == 1 and w[2] == 0.8 and not w.requires_grad  # unmoved: 1; far moved: the floor


def naive_group(values, groups, use_std, singleton_baseline):
    """verl-agent's group normalisation written out: per value, the statistics of its group."""
    out = []
    for v, g in zip(values, groups):
        members = [x for x, h in zip(values, groups) if h == g]
        if len(members) > 1:
            mean, std = sum(members) / len(members), statistics.stdev(members)
        else:
            mean, std = (v if singleton_baseline else 0.0), 1.0
        out.append((v - mean) / (std + 1e-6) if use_std else v - mean)
    return out


# Two games of two episodes each; the steps run episode by episode in order. Game 0's episodes
# meet the same observation at different steps ("A" twice in episode 0, once in episode 1), "C"
# occurs once (a singleton anchor group); episode 1 wins, episode 0 answers once invalidly.
GROUPED = dict(
    episodes=[0, 0, 0, 1, 1, 2, 2, 3],
    games=[0, 0, 0, 0, 0, 1, 1, 1],
    rewards=[0.0, 0.0, 0.0, 0.0, 10.0, 0.0, 10.0, 10.0],
    invalid=[0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
    observations=["A", "B", "A", "A", "C", "D", "E", "D"],
)


@pytest.mark.parametrize("use_std", [True, False], ids=["mean_std", "mean"])
def test_grpo_and_gigpo_advantages_equal_naive_loops_over_groups_and_anchor_states(use_std):
    g = GROUPED
    tensors = {k: torch.tensor(v) for k, v in g.items() if k != "observations"}
    episode_total = [
        sum(r for r, e in zip(g["rewards"], g["episodes"]) if e == ep) for ep in g["episodes"]
    ]
    scores = [t - 0.1 * bad for t, bad in zip(episode_total, g["invalid"])]
    grpo = naive_group(scores, g["games"], use_std, singleton_baseline=False)
    got = pamoe.grpo_advantages(
        tensors["rewards"], tensors["invalid"], tensors["episodes"], tensors["games"], use_std
    )
    torch.testing.assert_close(got, torch.tensor(grpo))
    returns = []  # discounted returns from each step, then minus that step's own penalty
    for i, (ep, bad) in enumerate(zip(g["episodes"], g["invalid"])):
        later = [r for r, e in zip(g["rewards"][i:], g["episodes"][i:]) if e == ep]
        returns.append(sum(0.95**j * r for j, r in enumerate(later)) - 0.1 * bad)
    anchors = [f"{game}/{obs}" for game, obs in zip(g["games"], g["observations"])]
    step = naive_group(returns, anchors, use_std, singleton_baseline=True)
    assert step[4] == 0  # "C": a group of one step
    got = pamoe.gigpo_advantages(
        tensors["rewards"],
        tensors["invalid"],
        tensors["episodes"],
        tensors["games"],
        g["observations"],
        0.95,
        0.5,
        use_std,
    )
    torch.testing.assert_close(got, torch.tensor([a + 0.5 * b for a, b in zip(grpo, step)]))
    # a group of one episode with one step: its raw score (GRPO), no step advantage (GiGPO)
    one = [torch.tensor(x) for x in ([10.0], [0.0], [0], [0])]
    assert float(pamoe.grpo_advantages(*one, use_std)) == pytest.approx(10 / (1 + 1e-6))
    assert float(pamoe.gigpo_advantages(*one, ["x"], 0.95, 1.0, use_std)) == pytest.approx(
        10 / (1 + 1e-6) if use_std else 10
    )


def test_grouped_rollouts_play_one_game_per_group_and_grpo_builds_no_critic(tmp_path):
    """--group_size G: the G lanes of a group get one seed (the same toy game), groups differ;
    grpo and gigpo train without a critic: no critic parameters, no value loss."""
    args = pamoe.parse_args(SMALL + ["--num_envs", "8", "--group_size", "4", "--advantage", "grpo"])
    seeds = pamoe.episode_seeds(args, 3, range(8))
    assert len(set(seeds[:4])) == 1 and len(set(seeds[4:])) == 1 and seeds[0] != seeds[4]
    ungrouped = pamoe.parse_args(SMALL + ["--num_envs", "8"])
    assert len(set(pamoe.episode_seeds(ungrouped, 3, range(8)))) == 8
    batch = envs.make_env_batch("toy", 8, 6)
    first = batch.reset(seeds)
    assert first[0] == first[3] and first[4] == first[7]  # the game of its group
    out = str(tmp_path / "run")
    flags = ["--advantage", "gigpo", "--group_size", "2", "--iterations", "1", "--out_dir", out]
    last = pamoe.main(SMALL + flags)
    assert (
        "value_loss" not in last
        and "explained_variance" not in last
        and math.isfinite(last["pg_loss"])
    )
    # the share of each trained task type's steps that the groups gave no signal (advantage 0)
    trained_types = {k.split("/")[1] for k in last if k.startswith("success/")}
    zero_shares = {k.split("/")[1]: v for k, v in last.items() if k.startswith("zero_adv/")}
    assert set(zero_shares) == trained_types and all(0 <= v <= 1 for v in zero_shares.values())
    trained = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["trainable"]
    assert not any(n.startswith("critic.") for n in trained)
    assert make_agent("--advantage", "gigpo", "--group_size", "2").critic is None


@pytest.mark.parametrize("routing", ["phase", "token"])
def test_rspo_trains_with_weights_between_its_floor_and_one(tmp_path, routing):
    out = str(tmp_path / "run")
    flags = ["--routing", routing, "--rspo", "--rspo_floor", "0.9", "--minibatch", "4"]
    last = pamoe.main(
        SMALL
        + flags
        + ["--iterations", "2", "--eval_every", "1", "--eval_episodes", "4"]
        + ["--diagnostics", "--out_dir", out]
    )
    metrics = read_metrics(out)
    assert "coherence/A" in metrics[1] or "conflict/A" in metrics[1]  # diagnostics ran with RSPO
    weights = [m["rspo_weight"] for m in metrics[1:]]
    assert all(0.9 <= w <= 1 for w in weights) and min(weights) < 1  # the router moved after a step
    assert math.isfinite(last["pg_loss"])


def test_whitening_gives_mean_zero_and_standard_deviation_one_over_the_mask():
    g = torch.Generator().manual_seed(0)
    x, mask = torch.randn(4, 6, generator=g) * 3 + 2, torch.rand(4, 6, generator=g) < 0.7
    w = pamoe.whiten(x, mask)
    ref = (x[mask] - x[mask].mean()) / x[mask].std(unbiased=False)
    torch.testing.assert_close(w[mask], ref, atol=1e-5, rtol=0)
    assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))


def test_ppo_ratio_is_one_on_first_minibatch_and_kl_zero_while_experts_are_zero(rollout_data):
    agent, R = rollout_data
    B = pamoe.prepare_batch(agent, R)
    mb = torch.arange(len(R.seq))[:8]
    seqs, pl, rl = pamoe.sequences(R, mb)
    logp, _, mask = agent.response_logprobs(seqs, pl, rl, 1.0, pamoe.step_gates_for(agent, mb, B.k))
    old = torch.nn.utils.rnn.pad_sequence([B.old_logp[i] for i in mb], batch_first=True)
    ref = torch.nn.utils.rnn.pad_sequence([B.ref_logp[i] for i in mb], batch_first=True)
    _, clipfrac, approx_kl = pamoe.ppo_policy_loss(logp, old, torch.ones_like(logp), mask, 0.2)
    # old log-probs came from batches grouped by length (other padding): equal up to float summation
    # order
    torch.testing.assert_close(
        torch.where(mask, logp - old, 0), torch.zeros_like(logp), atol=1e-5, rtol=0
    )
    assert clipfrac == 0 and abs(float(approx_kl.detach())) < 1e-5
    assert float(pamoe.kl_k3(logp, ref, mask).detach()) == pytest.approx(0, abs=1e-6)
    assert float(B.adv.mean()) == pytest.approx(0, abs=1e-5)  # whitened
    assert float(B.adv.std(unbiased=False)) == pytest.approx(1, abs=1e-4)


def test_reference_log_probs_are_the_experts_off_models_and_kl_grows_once_experts_move(
    rollout_data,
):
    """With trained (non-zero) experts the reference policy is the frozen base alone:
    prepare_batch's reference log-probs equal the experts-off model's, the old log-probs the routed
    model's, and the KL between them is > 0."""
    _, R = rollout_data
    agent = make_agent()
    randomize_experts(agent)
    B = pamoe.prepare_batch(agent, R)
    idx = torch.arange(len(R.seq))
    seqs, pl, rl = pamoe.sequences(R, idx)
    with torch.no_grad():
        off, _, mask = agent.response_logprobs(seqs, pl, rl, 1.0, None, experts_on=False)
        on = agent.response_logprobs(seqs, pl, rl, 1.0, pamoe.step_gates_for(agent, idx, B.k))[0]
    ref = torch.nn.utils.rnn.pad_sequence(B.ref_logp, batch_first=True)
    old = torch.nn.utils.rnn.pad_sequence(B.old_logp, batch_first=True)
    torch.testing.assert_close(
        torch.where(mask, ref, 0), torch.where(mask, off, 0), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        torch.where(mask, old, 0), torch.where(mask, on, 0), atol=1e-5, rtol=0
    )
    assert (on - off)[mask].abs().max() > 1e-3 and float(pamoe.kl_k3(on, ref, mask)) > 1e-5


def test_multi_token_answers_sample_from_the_policy_ppo_scores(hf_model):
    """The GPU path: tagged answers of several tokens behind a chat template, left-padded prompts
    of different lengths. Sampling (HF generate, temperature, no top-k / top-p) must draw from
    exactly the distribution whose log-probs PPO recomputes; invalid answers are penalised."""
    agent = make_agent("--model", hf_model, "--action_format", "tagged", "--max_new_tokens", "16")
    randomize_experts(agent)
    goals = [
        "put some apple in shelf 1.",
        "put a clean apple in shelf 2.",
        "put a hot apple in it.",
    ]
    info = {"admissible": ["look"]}
    texts = [
        envs.fit_prompt(agent.tok, agent.prompt_format, {**info, "goal": g}, "A shelf.", [], 0)
        for g in goals
    ]
    assert all(t.startswith("<|im_start|>user\nYou are an agent") for t in texts)
    assert all(t.endswith("<|im_start|>assistant\n") for t in texts)
    assert "put a clean apple in shelf 2." in texts[1]
    enc = agent.tok(
        texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False
    )
    assert not enc.attention_mask[:, 0].all()  # prompts of different lengths: left-padded
    gates = F.one_hot(torch.tensor([0, 2, 3]), 4).float()[:, None]
    torch.manual_seed(0)
    with agent.routing(gates):
        out = agent.lm.generate(
            **enc,
            do_sample=True,
            temperature=0.7,
            top_k=0,
            top_p=1.0,
            max_new_tokens=6,
            min_new_tokens=6,
            pad_token_id=agent.tok.pad_token_id,
            eos_token_id=None,
            output_scores=True,
            return_dict_in_generate=True,
        )
    resp = out.sequences[:, enc.input_ids.shape[1] :]  # (3, 6)
    scores = torch.stack([F.log_softmax(s.float(), -1) for s in out.scores], 1)  # (3, 6, V)
    sampled = scores.gather(-1, resp[..., None])[..., 0]
    seqs = [torch.cat([enc.input_ids[i][enc.attention_mask[i].bool()], resp[i]]) for i in range(3)]
    pl = [int(enc.attention_mask[i].sum()) for i in range(3)]
    logp, _, mask = agent.response_logprobs(seqs, pl, [6] * 3, 0.7, gates)
    assert mask.all()
    torch.testing.assert_close(logp, sampled, atol=1e-4, rtol=0)
    R = pamoe.rollout(agent, envs.make_env_batch("toy", 4, 2), [1, 2, 3, 4], 2.0, 1.0, False)
    assert max(R.resp_len) > 1 and max(R.resp_len) <= 16
    assert any(R.invalid)  # random text: invalid answers, each penalised
    assert all(r == pytest.approx(-0.1) for r, bad in zip(R.reward, R.invalid) if bad)


def test_switch_penalty_tau_annealing_and_balance():
    onehot = F.one_hot(torch.tensor([1, 1, 1]), 4).float()
    valid = torch.tensor([True, True, False])
    assert pamoe.switch_penalty(onehot, onehot, valid) == 0
    switched = F.one_hot(torch.tensor([1, 2, 1]), 4).float()
    assert pamoe.switch_penalty(onehot, switched, valid) == pytest.approx(0.5)
    soft = torch.full((3, 4), 0.25)
    assert pamoe.switch_penalty(soft, soft, valid) == pytest.approx(0.75)
    assert pamoe.tau_at(0, 2.0, 0.5, 3000) == 2.0
    assert pamoe.tau_at(1500, 2.0, 0.5, 3000) == pytest.approx(1.25)
    assert pamoe.tau_at(10**6, 2.0, 0.5, 3000) == 0.5
    k = torch.tensor([1, 1, 1])
    assert pamoe.balance_loss(soft, k, "sq") == 0 and pamoe.balance_loss(
        onehot, k, "sq"
    ) == pytest.approx(0.75)
    assert pamoe.balance_loss(onehot, k, "switch") == pytest.approx(4)  # all load on one expert: K
    # uniform: 1
    assert pamoe.balance_loss(soft, torch.tensor([0, 1, 2, 3]), "switch") == pytest.approx(1)


def test_group_logratio_gives_the_mutual_information_of_expert_and_group_and_its_exact_gradient():
    """I(k; g) = H(mean p) - sum_g q_g H(mean_{n in g} p_n); the surrogate with the log-ratios held
    fixed has the same value and the same gradient."""
    torch.manual_seed(0)
    groups = torch.tensor([0, 0, 0, 2, 2, 1])
    logits = torch.randn(6, 4, requires_grad=True)

    def entropy(q):
        return -(q * q.log()).sum(-1)

    def exact(p):
        return entropy(p.mean(0)) - sum(
            (groups == g).sum() / 6 * entropy(p[groups == g].mean(0)) for g in range(3)
        )

    # through the softmax, and in p itself
    for leaf in (logits, torch.softmax(logits, -1).detach().requires_grad_()):
        p = torch.softmax(leaf, -1) if leaf is logits else leaf
        surrogate = (p * pamoe.group_logratio(p, groups).detach()).sum(-1).mean()
        assert float(surrogate.detach()) == pytest.approx(float(exact(p).detach()), abs=1e-6)
        (g_surrogate,) = torch.autograd.grad(surrogate, leaf)
        (g_exact,) = torch.autograd.grad(
            exact(torch.softmax(leaf, -1) if leaf is logits else leaf), leaf
        )
        assert torch.allclose(g_surrogate, g_exact, atol=1e-6)
    one = F.one_hot(torch.tensor([1, 1, 1, 1, 1, 1]), 4).float()  # one expert: no information
    assert (one * pamoe.group_logratio(one, groups)).sum(-1).mean() == 0
    mapped = F.one_hot(groups, 4).float()  # a one-to-one map of 3 groups: I = H(g)
    h = -sum(q * math.log(q) for q in (3 / 6, 2 / 6, 1 / 6))
    assert float((mapped * pamoe.group_logratio(mapped, groups)).sum(-1).mean()) == pytest.approx(h)


def test_nmi_against_hand_computed_values():
    phases = ["find", "find", "take", "take", "place"]
    assert analysis.nmi([0] * 5, phases) == 0  # one expert carries no information about the phase
    # a one-to-one map, whatever the names
    assert analysis.nmi([2, 2, 0, 0, 1], phases) == pytest.approx(1)
    a, b = [0, 0, 1, 1], ["x", "y", "y", "y"]
    mi = 0.25 * math.log(2) + 0.25 * math.log(2 / 3) + 0.5 * math.log(4 / 3)
    h_a, h_b = math.log(2), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert analysis.nmi(a, b) == pytest.approx(mi / ((h_a + h_b) / 2))
    assert analysis.nmi(a, b) == pytest.approx(analysis.nmi(b, a))


def test_occupancy_and_conflict_are_each_task_types_gradient_of_each_expert():
    """The diagnostics (pamoe.diagnose, analysis.expert_diagnostics) against a naive loop: g_k,c,h
    summed step by step (each step's token-mean clipped surrogate, the policy-gradient term alone,
    weighted by its share of all response tokens) over the steps of task type c in half h (even or
    odd lanes), restricted to expert k's A and B. Occupancy sums to 1 over the task types of an
    expert, an expert no step was routed to is left out, conflict is the mean pairwise cosine,
    conflict_pick that of pick against each other type, coherence the cosine of the two halves of
    a type."""
    agent = make_agent("--num_experts", "3", "--num_envs", "8")
    randomize_experts(agent)
    R = pamoe.rollout(agent, envs.make_env_batch("toy", 8, 6), list(range(8)), 2.0, 1.0, False)
    types, tokens = sorted(set(R.task_type)), sum(R.resp_len)
    assert "pick" in types and len(types) >= 3
    params = [p for e in agent.experts for p in (*e.A, *e.B)]

    def of_expert(grads, k):  # expert k's A and B in every wrapped linear
        mine = {id(p) for e in agent.experts for p in (e.A[k], e.B[k])}
        return torch.cat([x.flatten() for x, p in zip(grads, params) if id(p) in mine])

    def cos(x, y):
        return float(F.cosine_similarity(x, y, dim=0))

    # expert A: pick only, B: the rest, C: nothing; then C: everything
    for routing in ([0 if tt == "pick" else 1 for tt in R.task_type], [2] * len(R.k)):
        R.k = routing
        B = pamoe.prepare_batch(agent, R)
        diag = pamoe.diagnose(agent, R, B)
        g = {(c, h): [torch.zeros_like(p) for p in params] for c in types for h in (0, 1)}
        for i, (c, lane) in enumerate(zip(R.task_type, R.lane)):
            gates = pamoe.step_gates_for(agent, torch.tensor([i]), B.k)
            terms, _, n_resp = pamoe.policy_loss(agent, R, B, torch.tensor([i]), gates)
            grads = torch.autograd.grad(n_resp / tokens * terms["pg"], params)
            g[c, lane % 2] = [x + y for x, y in zip(g[c, lane % 2], grads)]
        whole = {c: of_expert([x + y for x, y in zip(g[c, 0], g[c, 1])], 0) for c in types}
        if routing[0] == 2:  # expert C: every type
            whole = {c: of_expert([x + y for x, y in zip(g[c, 0], g[c, 1])], 2) for c in types}
            rare = [cos(whole["pick"], whole[c]) for c in types if c != "pick"]
            assert diag["conflict_pick/C"] == pytest.approx(np.mean(rare), abs=1e-4)
            halves = [
                cos(of_expert(g[c, 0], 2), of_expert(g[c, 1], 2))
                for c in types
                if of_expert(g[c, 0], 2).norm() > 0 and of_expert(g[c, 1], 2).norm() > 0
            ]
            assert halves and diag["coherence/C"] == pytest.approx(np.mean(halves), abs=1e-4)
            pairs = [cos(whole[c], whole[d]) for i, c in enumerate(types) for d in types[i + 1 :]]
            assert diag["conflict/C"] == pytest.approx(np.mean(pairs), abs=1e-4)
            continue
        for k, letter in enumerate("AB"):
            full = {c: of_expert([x + y for x, y in zip(g[c, 0], g[c, 1])], k) for c in types}
            norms = {c: float(full[c].norm()) for c in types}
            for c in types:
                assert diag[f"occupancy/{letter}/{c}"] == pytest.approx(
                    norms[c] / sum(norms.values()), rel=1e-4, abs=1e-6
                )
        assert diag["occupancy/A/pick"] == pytest.approx(1) and diag["occupancy/B/pick"] == 0
        # expert C got no step
        assert not any(key.startswith(("occupancy/C/", "conflict/C")) for key in diag)
        rest = [c for c in types if c != "pick"]
        full = {c: of_expert([x + y for x, y in zip(g[c, 0], g[c, 1])], 1) for c in rest}
        cosines = [cos(full[c], full[d]) for i, c in enumerate(rest) for d in rest[i + 1 :]]
        assert diag["conflict/B"] == pytest.approx(np.mean(cosines), abs=1e-4)
        assert "conflict/A" not in diag and "conflict_pick/B" not in diag  # A: one type


class PlantedToyEnv(envs.ToyEnv):
    """A planted conflict, the positive control of the conflict metric: two task types, pick and
    clean, whose one-step episodes show the same goal and observation and are won by opposite
    answers, so that their policy gradients must point apart."""

    WANTS = {"pick": "go to shelf 1", "clean": "go to countertop 1"}

    def reset(self, seed):
        self.task_type = random.Random(seed).choice(sorted(self.WANTS))
        self.goal = "put some apple in shelf 1."
        self.at, self.holding, self.won, self.failed, self.t = None, None, False, False, 0
        obs = "You are in the middle of a room. Looking quickly around you, you see a shelf 1."
        return obs, self._info()

    def admissible(self):
        return ["go to countertop 1", "go to shelf 1"]

    def solve(self):
        return self.WANTS[self.task_type]

    def phase(self):
        return "find"

    def step(self, action):
        self.t += 1
        self.won = action.strip().lower() == self.WANTS[self.task_type]
        self.failed = not self.won
        return "Nothing happens.", envs.WIN_REWARD * self.won, True, False, self._info()


class PlantedBatch(envs.ToyBatch):
    def __init__(self, n, max_steps=1):
        super().__init__(n, max_steps)
        self.envs = [PlantedToyEnv(max_steps) for _ in range(n)]


def test_the_conflict_metric_finds_a_planted_conflict(monkeypatch):
    """The positive control: two task types with the same prompt won by opposite answers. Their
    policy gradients point apart (conflict < 0) while the two halves of each type agree
    (coherence > 0). `tiny` warms up on these episodes, so that it answers with their labels."""
    with monkeypatch.context() as m:
        m.setattr(envs, "make_env_batch", lambda name, n, *rest: PlantedBatch(n))
        agent = make_agent("--routing", "dense", "--num_envs", "32", "--tiny_steps", "40")
    randomize_experts(agent)
    R = pamoe.rollout(agent, PlantedBatch(32), list(range(32)), 2.0, 1.0, greedy_router=False)
    assert set(R.task_type) == {"pick", "clean"} and len(set(R.obs)) == 1
    diag = pamoe.diagnose(agent, R, pamoe.prepare_batch(agent, R))
    assert diag["conflict/A"] < -0.5 and diag["coherence/A"] > 0.5, diag


# --- toy env, prompt and projection ---------------------------------------------------------------
def test_scripted_solver_wins_every_task_type():
    env, seen = envs.ToyEnv(), set()
    for seed in range(200):
        obs, info = env.reset(seed)
        while not env.won:
            obs, r, term, trunc, info = env.step(env.solve())
            assert not trunc
        assert r == envs.WIN_REWARD and term and info["won"]
        seen.add(info["task_type"])
    assert seen == set(envs.TASK_TYPES)


def test_toy_env_is_deterministic_and_flags_invalid_actions():
    a, b = envs.ToyEnv(), envs.ToyEnv()
    assert a.reset(7) == b.reset(7)
    for _ in range(4):
        cmd = a.solve()
        assert a.step(cmd) == b.step(cmd)
    obs, info = a.reset(7)
    assert envs.parse_action("fly to the moon", info["admissible"]) == (None, False)
    assert envs.parse_action("99", info["admissible"]) == (None, False)
    # a superscript digit is no label
    assert envs.parse_action("\u00b2", info["admissible"]) == (None, False)
    assert envs.parse_action("<think>a\nb</think><action>\n2\n</action>", info["admissible"])[1]
    # no think
    assert envs.parse_action("<action>go to shelf 1</action>", info["admissible"]) == (None, False)
    assert envs.parse_action("2", info["admissible"]) == ("go to shelf 1", True)
    assert envs.parse_action(
        "<think>hm</think> <action>Go to  shelf 1</action>", info["admissible"]
    ) == ("go to shelf 1", True)
    obs2, r, term, trunc, _ = a.step("fly to the moon")
    assert obs2 == "Nothing happens." and r == 0 and not term


@pytest.mark.parametrize("diagnostics", [False, True])
def test_diagnostics_are_opt_in_and_run_at_evaluated_iterations(tmp_path, diagnostics):
    """--diagnostics: occupancy and conflict at the evaluated training iterations (not at the
    frozen base's evaluation, iteration 0, which has no update); none without the flag."""
    out = str(tmp_path / "run")
    flags = ["--iterations", "3", "--eval_every", "2", "--eval_episodes", "4", "--out_dir", out]
    pamoe.main(SMALL + flags + ["--diagnostics", str(diagnostics)])
    diagnosed = [any(k.startswith("occupancy/") for k in m) for m in read_metrics(out)]
    assert diagnosed == [False, False, diagnostics, diagnostics]


def test_step_limit_truncates_and_phases_follow_the_solution():
    env = envs.ToyEnv(max_steps=3)
    env.reset(0)
    for _ in range(3):
        *_, trunc, info = env.step("go to shelf 1")
    assert trunc
    env = envs.ToyEnv()
    for seed in range(50):
        _, info = env.reset(seed)
        phases = [info["phase"]]
        while not env.won:
            *_, info = env.step(env.solve())
            phases.append(info["phase"])
        order = [envs.PHASES.index(p) for p in phases[:-1]]
        assert order == sorted(order) and phases[-2] == "place"
        assert ("transform" in phases) == (info["task_type"] != "pick")


def misplace(env):
    """Take the object as the solver does, then carry it straight to the target: a win for pick, a
    failure else."""
    if env.holding != env.obj:
        return env.solve()
    return f"move {env.obj} to {env.target}" if env.at == env.target else f"go to {env.target}"


class MisplacingBatch(envs.ToyBatch):
    """Toy lanes that play `misplace` whatever the model answered."""

    def step(self, actions):
        return [
            None if a is None else env.step(misplace(env)) for env, a in zip(self.envs, actions)
        ]


def test_an_untransformed_object_at_the_target_fails_the_task_and_ends_the_episode_unbootstrapped():
    seeds = list(range(8))
    batch = MisplacingBatch(len(seeds), max_steps=6)
    R = pamoe.rollout(make_agent(), batch, seeds, 2.0, 1.0, greedy_router=False)
    last = {n: i for i, n in enumerate(R.lane)}  # each lane's final step
    types = [R.task_type[last[n]] for n in range(len(seeds))]
    assert "pick" in types and set(types) - {"pick"}
    for n, tt in enumerate(types):
        i = last[n]
        assert R.terminated[i] and not R.truncated[i] and R.won[i] == (tt == "pick")
        assert R.reward[i] == (10.0 if tt == "pick" else 0.0) - 0.1 * R.invalid[i]
    assert R.final_window == {}  # termination, won or failed, never bootstraps
    assert [R.last_verb[i] for i, t in enumerate(R.t) if t == 0] == [""] * len(seeds)


def test_prompt_holds_task_history_and_admissible_actions():
    env = envs.ToyEnv()
    obs, info = env.reset(3)
    p = envs.build_prompt(
        info["goal"], obs, [("old obs", "go to shelf 1")], info["admissible"], 1, 15, "label"
    )
    assert info["goal"] in p and "old obs" in p and "go to shelf 1" in p and obs in p
    assert all(f"{i + 1}: {a}" in p for i, a in enumerate(info["admissible"]))


# --- arguments, checkpoints, end to end -----------------------------------------------------------
# a folder under a regular file: never creatable
UNWRITABLE = os.path.join(os.path.abspath(__file__), "run")
BAD_FLAGS = [  # (the flag the message must name, a command line a new user might type)
    ("env", ["--env", "webshop"]),
    ("alfworld_data", ["--env", "alfworld", "--alfworld_data", "/nonexistent"]),
    ("eval_split", ["--eval_split", "train"]),
    ("model", ["--model", "/nonexistent/model"]),
    ("model", ["--model", "./no-such-model"]),
    ("device", ["--device", "tpu"]),
    ("seed", ["--seed", "-1"]),
    ("seed", ["--seed", "1.5"]),
    ("out_dir", ["--out_dir", UNWRITABLE]),
    ("out_dir", ["--out_dir", ""]),
    ("out_dir", ["--out_dir", "/proc/pamoe-run"]),
    ("eval_only", ["--eval_only"]),
    ("export", ["--export", "x"]),
    ("show", ["--show", "-1"]),
    ("show", ["--show", "3"]),
    ("tiny_prior", ["--tiny_prior", "1.5"]),
    ("anneal_lr", ["--anneal_lr", "maybe"]),
    ("resume", ["--resume", "/nonexistent/ckpt.pt"]),
    ("iterations", ["--iterations", "-1"]),
    ("num_envs", ["--num_envs", "0"]),
    ("num_envs", ["--num_envs", "4096", "--max_steps", "1000"]),
    ("max_steps", ["--max_steps", "0"]),
    ("history", ["--history", "-1"]),
    ("max_prompt_tokens", ["--max_prompt_tokens", "10"]),
    ("action_format", ["--action_format", "json"]),
    ("max_new_tokens", ["--max_new_tokens", "0"]),
    ("max_new_tokens", ["--action_format", "tagged"]),
    ("action_format", ["--action_format", "tagged", "--max_new_tokens", "16"]),
    ("tiny_steps", ["--tiny_steps", "-5"]),
    ("temperature", ["--temperature", "0"]),
    ("temperature", ["--temperature", "nan"]),
    ("eval_temperature", ["--eval_temperature", "-1"]),
    ("eval_every", ["--eval_every", "-1"]),
    ("eval_episodes", ["--eval_episodes", "0"]),
    ("eval_episodes", ["--eval_episodes", "100000"]),
    ("ckpt_every", ["--ckpt_every", "0"]),
    ("routing", ["--routing", "expert"]),
    ("num_experts", ["--num_experts", "0"]),
    ("num_experts", ["--num_experts", "17"]),
    ("rank", ["--rank", "0"]),
    ("rank", ["--rank", "100000"]),
    ("alpha", ["--alpha", "inf"]),
    ("dense_rank", ["--dense_rank", "-1"]),
    ("targets", ["--targets", ""]),
    ("targets", ["--targets", "q_proj, v_proj"]),
    ("info_coef", ["--info_coef", "-1"]),
    ("router_window", ["--router_window", "0"]),
    ("router_hidden", ["--router_hidden", "1000000"]),
    ("router_layers", ["--router_layers", "0"]),
    ("tau_start", ["--tau_start", "0"]),
    ("tau_end", ["--tau_end", "-0.5"]),
    ("tau_steps", ["--tau_steps", "0"]),
    ("switch_coef", ["--switch_coef", "-0.05"]),
    ("balance", ["--balance", "none"]),
    ("balance_coef", ["--balance_coef", "nan"]),
    ("gamma", ["--gamma", "1.5"]),
    ("gae_lambda", ["--gae_lambda", "-0.1"]),
    ("clip", ["--clip", "-0.2"]),
    ("clip", ["--clip", "abc"]),
    ("clip", ["--clip", "nan"]),
    ("kl_coef", ["--kl_coef", "-1"]),
    ("ent_coef", ["--ent_coef", "inf"]),
    ("vf_coef", ["--vf_coef", "-0.5"]),
    ("epochs", ["--epochs", "0"]),
    ("minibatch", ["--minibatch", "0"]),
    ("max_grad_norm", ["--max_grad_norm", "0"]),
    ("lr_experts", ["--lr_experts", "-0.001"]),
    ("lr_router", ["--lr_router", "10"]),
    ("lr_critic", ["--lr_critic", "nan"]),
    ("weight_decay", ["--weight_decay", "-0.01"]),
    ("dtype", ["--dtype", "float16"]),
    ("grad_ckpt", ["--grad_ckpt", "2"]),
    ("micro_batch", ["--micro_batch", "-1"]),
    ("micro_batch", ["--micro_batch", "1.5"]),
    ("advantage", ["--advantage", "ppo"]),
    ("group_size", ["--advantage", "grpo"]),
    ("group_size", ["--group_size", "0"]),
    ("group_size", ["--num_envs", "4", "--group_size", "3"]),
    ("adv_norm", ["--adv_norm", "std"]),
    ("step_weight", ["--step_weight", "-1"]),
    ("clip_c", ["--clip_c", "0.5"]),
    ("clip_c", ["--clip_c", "-3"]),
    ("rspo", ["--rspo", "--routing", "dense"]),
    ("rspo", ["--rspo", "maybe"]),
    ("rspo_floor", ["--rspo_floor", "1.5"]),
    ("routing", ["--routing", "task_oracle"]),
    ("rspo", ["--rspo", "--routing", "dense", "--dense_rank", "16"]),
    ("num_experts", ["--num_experts", "2.5"]),
    ("diagnostics", ["--diagnostics", "sometimes"]),
    ("group_size", ["--advantage", "gigpo", "--num_envs", "6", "--group_size", "4"]),
    ("eval_split", ["--env", "alfworld", "--eval_split", "valid_seen"]),
    ("minibatch", ["--minibatch", "-2"]),
    ("tau_steps", ["--tau_steps", "1.5"]),
    ("dtype", ["--dtype", "auto16"]),
    ("max_steps", ["--max_steps", "1001"]),
    ("compile_decode", ["--compile_decode", "--routing", "token"]),
    ("compile_decode", ["--compile_decode", "never"]),
    ("no_such_flag", ["--no_such_flag", "1"]),
]


@pytest.mark.parametrize("flag, argv", BAD_FLAGS, ids=[" ".join(argv) for _, argv in BAD_FLAGS])
def test_every_bad_flag_stops_with_one_line_that_names_it(flag, argv, capsys):
    with pytest.raises(SystemExit) as stop:  # any other exception would be a traceback
        pamoe.parse_args(argv)
    code = stop.value.code
    # argparse: status 2, usage on stderr
    message = code if isinstance(code, str) else capsys.readouterr().err
    assert (
        code not in (0, None) and f"--{flag}" in message and "expected one argument" not in message
    )
    if isinstance(code, str):
        assert code.startswith("pamoe.py: error: ") and "\n" not in code


def test_the_bad_flag_sweep_covers_every_flag():
    assert {f.name for f in dataclasses.fields(pamoe.Args)} <= {flag for flag, _ in BAD_FLAGS}
    pamoe.parse_args(
        [
            "--max_new_tokens",
            "16",
            "--eval_episodes",
            "0",
            # the bounds themselves are valid
            "--eval_every",
            "0",
            "--seed",
            "0",
            "--lr_router",
            "0",
        ]
    )
    # the window is zero-padded before the start
    pamoe.parse_args(["--max_steps", "3", "--router_window", "5"])


def test_cuda_requested_without_cuda_stops(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        pamoe.parse_args(["--device", "cuda"])


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


ROUTINGS = {
    "token": ["--routing", "token"],
    "trajectory": ["--routing", "trajectory"],
    "dense": ["--routing", "dense"],
    "dense, rank 16": ["--routing", "dense", "--dense_rank", "16"],
}


@pytest.mark.parametrize("routing", ROUTINGS)
def test_every_routing_mode_trains_through_the_same_loop_and_routes_as_its_flag_says(
    tmp_path, routing
):
    """One iteration and an evaluation per routing mode. token: the per-layer token routers train;
    trajectory: one expert per episode and no switch term; dense: one expert of --dense_rank (else
    --rank) takes every step."""
    out = str(tmp_path / "run")
    flags = ROUTINGS[routing]
    last = pamoe.main(
        SMALL
        + ["--iterations", "1", "--eval_every", "1", "--eval_episodes", "4", "--out_dir", out]
        + flags
    )
    assert all(math.isfinite(v) for k, v in last.items() if k != "explained_variance")
    # the run's initialisation: Agent seeds from --seed
    before = make_agent(*flags).trainable_state()
    after = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["trainable"]
    routers = [n for n in before if n.endswith(".router.weight")]
    assert bool(routers) == (routing == "token")
    assert all(not torch.equal(before[n], after[n]) for n in routers)
    if routing == "trajectory":
        assert last["switches"] == 0 and last["eval/switches"] == 0 and "switch_penalty" not in last
    if routing.startswith("dense"):
        experts = [n for n in after if ".A." in n or ".B." in n]
        assert all(n.endswith((".A.0", ".B.0")) for n in experts)  # one expert
        rank = 16 if "16" in routing else 4
        assert all(after[n].shape[1 if ".A." in n else 0] == rank for n in experts)
        assert (
            last["expert_share/A"] == 1
            and last["eval/expert_share/A"] == 1
            and last["switches"] == 0
        )


def test_checkpoint_round_trip_and_resume_equals_uninterrupted(tmp_path):
    """A checkpoint restores every trained tensor into an agent whose parameters differ; resuming it
    gives the same metrics, evaluations and trained tensors as the uninterrupted run; resuming an
    older checkpoint again drops the logs of the iterations after it (one report per iteration in
    eval.log)."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    # (an annealed learning rate follows --iterations, which this test raises)
    flags = SMALL + ["--anneal_lr", "false", "--eval_every", "1", "--eval_episodes", "4"]
    pamoe.main(flags + ["--iterations", "3", "--out_dir", full])
    pamoe.main(flags + ["--iterations", "2", "--out_dir", part])
    ckpt = os.path.join(part, "checkpoint.pt")
    state = torch.load(ckpt, weights_only=False)
    assert state["iteration"] == 2 and not os.path.exists(ckpt + ".tmp")
    shutil.copy(ckpt, tmp_path / "at2.pt")
    agent = make_agent()
    with torch.no_grad():
        for p in agent.parameters():
            if p.requires_grad:
                p.add_(1.0)  # every trained tensor differs from the checkpoint's
    opt = torch.optim.AdamW(agent.param_groups())
    assert pamoe.load_checkpoint(ckpt, agent, opt, {"updates": 0}) == 2
    assert agent.trainable_state().keys() == state["trainable"].keys()
    for name, value in agent.trainable_state().items():
        assert torch.equal(value, state["trainable"][name]), name
    pamoe.main(flags + ["--iterations", "3", "--out_dir", part, "--resume", ckpt])

    def is_clock(key):  # wall-clock figures differ between any two runs
        return key.endswith("_s") or key in ("sps", "decode_ms_per_step")

    def logs(out):
        metrics = [{k: v for k, v in m.items() if not is_clock(k)} for m in read_metrics(out)]
        trained = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["trainable"]
        return metrics, open(os.path.join(out, "eval.log")).read(), trained

    (m_full, log_full, t_full), (m_part, log_part, t_part) = logs(full), logs(part)
    assert (
        [m["iteration"] for m in m_part] == [0, 1, 2, 3]
        and m_part == m_full
        and log_part == log_full
    )
    assert all(torch.equal(t_full[n], t_part[n]) for n in t_full)
    # again
    pamoe.main(
        flags + ["--iterations", "3", "--out_dir", part, "--resume", str(tmp_path / "at2.pt")]
    )
    assert [m["iteration"] for m in read_metrics(part)] == [0, 1, 2, 3]
    log = open(os.path.join(part, "eval.log")).read()
    assert [int(i) for i in re.findall(r"^\[iteration (\d+)\]", log, re.M)] == [
        0,
        1,
        2,
        3,
    ] and log == log_full


def test_eval_only_repeats_the_checkpoints_evaluation_and_leaves_the_run_untouched(
    tmp_path, capsys
):
    """--eval_only evaluates the checkpoint with the flags it was trained with: the same episodes
    and sampling stream give exactly the evaluation logged at its iteration; nothing of the run
    changes; --show prints whole episodes."""
    out = str(tmp_path / "run")
    pamoe.main(
        SMALL + ["--iterations", "2", "--eval_every", "2", "--eval_episodes", "6", "--out_dir", out]
    )
    ckpt = os.path.join(out, "checkpoint.pt")
    before = {
        f: open(os.path.join(out, f), "rb").read()
        for f in ("metrics.jsonl", "eval.log", "checkpoint.pt")
    }
    capsys.readouterr()
    pamoe.main(["--resume", ckpt, "--eval_only", "--show", "2"])
    printed = capsys.readouterr().out
    assert {f: open(os.path.join(out, f), "rb").read() for f in before} == before
    result, last = json.load(open(os.path.join(out, "eval.json"))), read_metrics(out)[-1]
    assert result["iteration"] == 2 and result["metrics"] == {k: last[k] for k in result["metrics"]}
    assert (
        printed.count("=== episode") == 2
        and printed.count(" after ") == 2
        and "| expert " in printed
    )
    assert "[iteration 2] eval success: All" in printed
    pamoe.main(
        [
            "--resume",
            ckpt,
            "--eval_only",
            "--eval_episodes",
            "9",
            "--out_dir",
            str(tmp_path / "more"),
        ]
    )
    assert json.load(open(tmp_path / "more" / "eval.json"))["eval_episodes"] == 9
    with pytest.raises(
        SystemExit, match=r"trained with other flags: --rank 8 \(trained: 4\); drop them"
    ):
        pamoe.main(["--resume", ckpt, "--eval_only", "--rank", "8"])


def load_exported(folder, k):
    """An exported adapter read back with a few lines (no PEFT): config, {module path: (lora_A,
    lora_B)}."""
    from safetensors.torch import load_file

    config = json.load(open(os.path.join(folder, f"expert_{k}", "adapter_config.json")))
    tensors = load_file(os.path.join(folder, f"expert_{k}", "adapter_model.safetensors"))
    paths = sorted(
        {
            key[len("base_model.model.") : -len(".lora_A.weight")]
            for key in tensors
            if ".lora_A." in key
        }
    )
    assert set(tensors) == {f"base_model.model.{p}.lora_{x}.weight" for p in paths for x in "AB"}
    return config, {
        p: (
            tensors[f"base_model.model.{p}.lora_A.weight"],
            tensors[f"base_model.model.{p}.lora_B.weight"],
        )
        for p in paths
    }


TEXT = "Task: put some apple in shelf 1. Answer with a number."


@pytest.mark.parametrize("routing", ["phase", "dense"])
def test_exported_experts_are_peft_lora_adapters_that_rebuild_each_experts_logits(
    tmp_path, routing
):
    """--export: each expert, merged into the exported base as W + lora_alpha / r * lora_B lora_A by
    a few lines here, gives the logits the agent gives with that expert routed; dense routing
    exports one adapter and no router; token routing stops with the reason."""
    from transformers import AutoModelForCausalLM

    out, folder = str(tmp_path / "run"), str(tmp_path / "export")
    pamoe.main(
        SMALL
        + ["--iterations", "1", "--routing", routing, "--lr_experts", "0.05", "--out_dir", out]
    )
    ckpt = os.path.join(out, "checkpoint.pt")
    pamoe.main(["--resume", ckpt, "--export", folder])
    agent = make_agent("--routing", routing)
    pamoe.load_checkpoint(ckpt, agent, None, {"updates": 0})
    K = 1 if routing == "dense" else 4
    assert sorted(os.listdir(folder)) == sorted(
        [
            "README.md",
            "base",
            *[f"expert_{c}" for c in "ABCD"[:K]],
            *(["router.pt"] if routing == "phase" else []),
        ]
    )
    ids = torch.tensor([agent.tok(TEXT).input_ids])
    base = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "base")).eval()
    assert (
        pamoe.envs.saved_tiny_tokenizer(os.path.join(folder, "base"))(TEXT).input_ids
        == agent.tok(TEXT).input_ids
    )
    with torch.no_grad():
        plain = base(ids).logits
        for k in range(K):
            config, lora = load_exported(folder, "ABCD"[k])
            assert (
                config["peft_type"] == "LORA"
                and config["task_type"] == "CAUSAL_LM"
                and config["r"] == 4
            )
            assert (
                config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
                and not config["fan_in_fan_out"]
            )
            assert config["base_model_name_or_path"] == "tiny" and config["lora_dropout"] == 0
            merged = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "base")).eval()
            for path, (A, B) in lora.items():
                linear = merged.get_submodule(path)
                assert A.shape == (4, linear.in_features) and B.shape == (linear.out_features, 4)
                linear.weight += config["lora_alpha"] / config["r"] * B @ A
            with agent.routing(F.one_hot(torch.tensor([k]), K).float()[:, None]):
                expected = agent.lm(ids).logits
            torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)
            # the expert is not the base: the comparison can fail
            assert (expected - plain).abs().max() > 1e-3
    if routing == "phase":
        router = torch.load(os.path.join(folder, "router.pt"), weights_only=False)
        head = pamoe.StepHead(
            router["hidden_size"],
            4,
            router["flags"]["router_hidden"],
            router["flags"]["router_layers"],
        )
        head.load_state_dict(router["state"])  # the flags rebuild it
        state = torch.load(ckpt, weights_only=False)
        state["args"]["routing"] = "token"
        torch.save(state, tmp_path / "token.pt")
        with pytest.raises(SystemExit, match="token routing picks an expert per token and layer"):
            pamoe.main(["--resume", str(tmp_path / "token.pt"), "--export", folder])


def test_export_works_up_to_the_largest_rank_the_flags_allow(tmp_path):
    out, folder = str(tmp_path / "run"), str(tmp_path / "export")
    pamoe.main(
        SMALL
        + ["--iterations", "1", "--routing", "dense", "--dense_rank", "16384", "--out_dir", out]
    )
    pamoe.main(["--resume", os.path.join(out, "checkpoint.pt"), "--export", folder])
    config, lora = load_exported(folder, "A")
    assert config["r"] == 16384 and all(A.shape[0] == 16384 for A, _ in lora.values())
    assert "max_lora_rank stops at 512" in open(os.path.join(folder, "README.md")).read()


def test_learning_rates_decay_linearly_over_the_iterations(tmp_path):
    out = str(tmp_path / "run")
    pamoe.main(
        SMALL
        + [
            "--iterations",
            "4",
            "--ckpt_every",
            "3",
            "--lr_experts",
            "0.002",
            "--lr_router",
            "0.004",
            "--lr_critic",
            "0.006",
            "--out_dir",
            out,
        ]
    )
    groups = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["optimizer"][
        "param_groups"
    ]
    assert {g["name"]: g["lr"] for g in groups} == pytest.approx(
        {
            "experts": 0.002 / 4,
            "router": 0.004 / 4,
            # iteration 4 of 4
            "critic": 0.006 / 4,
        }
    )


@pytest.mark.parametrize(
    "case", ["hub name, offline", "empty folder", "not a causal LM", "no pad or eos token"]
)
def test_a_model_that_cannot_load_stops_with_the_fix(tmp_path, monkeypatch, case):
    import huggingface_hub.constants
    from transformers import T5Config

    # no network: fails at once
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    path = str(tmp_path / "model")
    if case == "hub name, offline":
        path = "someone/no-such-model"
    elif case == "empty folder":
        os.makedirs(path)
    elif case == "not a causal LM":
        T5Config(
            d_model=8, d_ff=8, num_layers=1, num_heads=2, d_kv=4, vocab_size=10
        ).save_pretrained(path)
    else:
        model, tok = envs.build_tiny(["go"], 0)
        model.save_pretrained(path)
        tok.pad_token = tok.eos_token = None
        tok.save_pretrained(path)
    with pytest.raises(SystemExit) as stop:
        pamoe.main(SMALL + ["--model", path, "--out_dir", str(tmp_path / "run")])
    message = stop.value.code
    assert (
        isinstance(message, str)
        and message.startswith(f"pamoe.py: error: --model {path}: ")
        and "\n" not in message
    )
    assert ("neither a pad nor an eos" in message) == (case == "no pad or eos token")


@pytest.mark.parametrize(
    "case, words",
    [
        ("garbage bytes", "not a PA-MoE checkpoint"),
        ("another torch file", "not a PA-MoE checkpoint"),
        ("other flags", "trained with --rank 8 \\(this run: 4\\)"),
        ("other tensors", "tensors do not fit"),
        ("already done", "at iteration 5 already; raise --iterations"),
        ("a retired flag", "trained with --toy_variant conflict, .* dropped in commit 3abdbb3"),
        ("a retired routing", "trained with --routing task_oracle, .* dropped in commit 3abdbb3"),
    ],
)
def test_a_checkpoint_that_does_not_fit_stops_with_the_fix(tmp_path, case, words):
    ckpt = str(tmp_path / "checkpoint.pt")
    agent = make_agent()
    state = {
        "trainable": agent.trainable_state(),
        "optimizer": {},
        "iteration": 5,
        "tau_updates": 0,
        "args": dataclasses.asdict(agent.args),
        "rng": [pamoe.rng_state()],
        "world_size": 1,
    }
    if case == "garbage bytes":
        state = None
        with open(ckpt, "wb") as f:
            f.write(os.urandom(100))
    elif case == "another torch file":
        state = {"model": agent.trainable_state()}
    elif case == "other flags":
        state["args"]["rank"] = 8
    elif case == "other tensors":
        state["trainable"] = {}
    elif case == "a retired flag":  # written before the premise search's flags were removed
        state["args"]["toy_variant"] = "conflict"
    elif case == "a retired routing":
        state["args"]["routing"] = "task_oracle"
    if state is not None:
        torch.save(state, ckpt)
    with pytest.raises(SystemExit, match=f"pamoe.py: error: --resume {ckpt}.*{words}"):
        pamoe.main(
            SMALL + ["--iterations", "3", "--out_dir", str(tmp_path / "run"), "--resume", ckpt]
        )


def test_a_nan_mid_run_stops_before_anything_is_written_and_resume_continues(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    ckpt, flags = (
        os.path.join(out, "checkpoint.pt"),
        SMALL + ["--ckpt_every", "1", "--out_dir", out],
    )
    update, good = pamoe.ppo_update, []

    def poisoned_update(*args):  # from the 3rd update on, the KL term is nan
        if os.path.exists(ckpt) and torch.load(ckpt, weights_only=False)["iteration"] == 2:
            good.append(open(ckpt, "rb").read())
            monkeypatch.setattr(pamoe, "kl_k3", lambda *a: torch.tensor(float("nan")))
        return update(*args)

    monkeypatch.setattr(pamoe, "ppo_update", poisoned_update)
    with pytest.raises(
        SystemExit, match=f"iteration 3: kl is not finite; stopped .* --resume {ckpt}"
    ):
        pamoe.main(flags + ["--iterations", "4"])
    assert [m["iteration"] for m in read_metrics(out)] == [1, 2] and open(
        ckpt, "rb"
    ).read() == good[0]
    monkeypatch.undo()
    pamoe.main(flags + ["--iterations", "4", "--resume", ckpt])
    assert [m["iteration"] for m in read_metrics(out)] == [1, 2, 3, 4]
    # gradient norms and parameters are checked alike
    with pytest.raises(pamoe.NonFiniteError, match="b"):
        pamoe.check_finite({"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")])})


def test_a_run_killed_mid_iteration_resumes_without_duplicate_or_missing_iterations(tmp_path):
    out = str(tmp_path / "run")
    metrics, flags = (
        os.path.join(out, "metrics.jsonl"),
        SMALL + ["--ckpt_every", "1", "--out_dir", out],
    )
    child = subprocess.Popen(
        [sys.executable, "pamoe.py", *flags, "--iterations", "1000"],
        cwd=os.path.dirname(os.path.abspath(__file__)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # killed as soon as iteration 2 is logged: while its checkpoint is written, or early in
    # iteration 3
    try:
        deadline = time.time() + 120
        while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 2):
            assert child.poll() is None and time.time() < deadline, (
                "the run ended or stalled before iteration 2"
            )
            time.sleep(0.01)
    finally:
        child.kill()  # SIGKILL: no cleanup of any kind
        child.wait(timeout=30)
    logged = len(open(metrics).readlines())
    pamoe.main(
        flags + ["--iterations", str(logged + 2), "--resume", os.path.join(out, "checkpoint.pt")]
    )
    assert [m["iteration"] for m in read_metrics(out)] == list(range(1, logged + 3))


def test_end_to_end_training_improves_success_and_the_router_does_not_collapse(tmp_path):
    """The CPU demo's settings, shortened to 12 of its iterations: the tiny model on the toy env
    must solve more tasks in its last 3 iterations than in its first 3 (measured at one thread: 2%
    -> 35%), and the phase router must still spread its decisions over at least 3 experts (measured:
    3, the largest share 0.61-0.66)."""
    out = str(tmp_path / "e2e")
    pamoe.main(["--iterations", "12", "--eval_every", "0", "--ckpt_every", "100", "--out_dir", out])
    metrics = read_metrics(out)
    success = [m["success"] for m in metrics]
    first, last = sum(success[:3]) / 3, sum(success[-3:]) / 3
    assert last >= first + 0.15, success
    shares = [[m[f"expert_share/{k}"] for k in "ABCD"] for m in metrics[-3:]]
    assert all(sum(s >= 0.05 for s in share) >= 3 for share in shares), shares


# --- ALFWorld (the real package on the mini game set, ALFWORLD_DATA in a temp dir) ----------------
@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("alfworld"))
    envs.make_alfworld_mini(root)
    old = os.environ.get("ALFWORLD_DATA")
    os.environ["ALFWORLD_DATA"] = root
    yield root
    if old is None:
        del os.environ["ALFWORLD_DATA"]
    else:
        os.environ["ALFWORLD_DATA"] = old


def play(batch, commands):
    """Step every lane through its command list in lockstep; returns each lane's last step
    result."""
    last = [None] * len(commands)
    for t in range(max(map(len, commands))):
        results = batch.step([c[t] if t < len(c) else None for c in commands])
        for n, r in enumerate(results):
            if r is not None:
                last[n] = r
    return last


@pytest.mark.parametrize("split", ["train", "eval_in_distribution", "eval_out_of_distribution"])
def test_every_mini_game_is_won_by_its_scripted_solution(mini, split):
    files = envs.alfworld_games(mini, split)
    batch = envs.make_env_batch("alfworld", len(files), 50, split, mini)
    try:
        first = batch.reset(list(range(len(files))))
        solutions = []
        for f, (obs, info) in zip(files, first):
            with open(os.path.join(os.path.dirname(f), "solution.json")) as fh:
                solutions.append(json.load(fh))
            assert solutions[-1][0] in info["admissible"] and "help" not in info["admissible"]
            assert info["goal"] and "Welcome" not in obs
        for obs, r, term, trunc, info in play(batch, solutions):
            assert r == envs.WIN_REWARD and term and not trunc and info["won"], obs
        assert {info["task_type"] for _, info in first} == set(envs.TASK_COLUMNS["alfworld"])
    finally:
        batch.close()


def test_alfworld_invalid_steps_truncation_lockstep_and_clean_close(mini):
    batch = envs.make_env_batch("alfworld", 2, 3, "train", mini)
    batch.reset([0, 1])
    assert batch.step(["dance on the table", None])[1] is None  # a finished lane is skipped
    obs, r, term, trunc, info = batch.step(["dance on the table", "look"])[0]
    assert obs == "Nothing happens." and r == 0 and not term and not trunc
    assert (
        batch.step_phase(info, None) == "invalid"
        and batch.step_phase(info, "go to shelf 1") == "navigate"
    )
    last = batch.step(["inventory", "look"])
    assert last[0][3] and not last[0][2]  # step 3 of 3: truncated
    assert not last[1][3]  # the other lane has taken 2 steps
    procs = [w.proc for w in batch.workers]
    batch.close()
    # both left on the close request, none was killed
    assert [p.returncode for p in procs] == [0, 0]


def test_alfworld_dead_or_hung_worker_ends_its_episode_and_names_the_game(
    mini, monkeypatch, capsys
):
    monkeypatch.setattr(envs, "STEP_TIMEOUT", 3.0)
    batch = envs.make_env_batch("alfworld", 2, 50, "train", mini)
    try:
        batch.reset([0, 1])
        batch.workers[0].proc.kill()
        os.kill(batch.workers[1].proc.pid, signal.SIGSTOP)  # hangs
        for n, (obs, r, term, trunc, info) in enumerate(batch.step(["look", "look"])):
            assert trunc and not term and batch.workers[n].game in info["error"]
        err = capsys.readouterr().err
        assert "died" in err and "hung" in err
        monkeypatch.setattr(envs, "STEP_TIMEOUT", 60.0)  # fresh workers import the engine first
        assert len(batch.reset([2, 3])) == 2
    finally:
        batch.close()


def test_a_game_dying_mid_rollout_ends_its_episode_and_the_update_still_runs(mini):
    agent = make_agent("--env", "alfworld", "--alfworld_data", mini)
    batch = envs.make_env_batch("alfworld", 1, 6, "train", mini)
    step = batch.step

    def dying_step(actions):  # the only lane's worker dies before its first step
        batch.workers[0].proc.kill()
        return step(actions)

    batch.step = dying_step
    try:
        R = pamoe.rollout(agent, batch, [0], 2.0, 1.0, greedy_router=False)
    finally:
        batch.close()
    assert R.truncated == [True] and R.reward[0] <= 0
    B = pamoe.prepare_batch(agent, R)  # bootstraps from the failed lane's final observation
    assert torch.isfinite(B.ret).all()


def test_alfworld_prompt_holds_task_history_and_actions_within_the_limit(mini, hf_model):
    agent = make_agent(
        "--model",
        hf_model,
        "--env",
        "alfworld",
        "--alfworld_data",
        mini,
        "--action_format",
        "tagged",
        "--max_new_tokens",
        "16",
        "--history",
        "2",
    )
    batch = envs.make_env_batch("alfworld", 1, 50, "train", mini)
    try:
        ((obs, info),) = batch.reset([4])
        history = []
        for cmd in info["admissible"][:3]:
            history.append((obs, cmd))
            obs, _, _, _, info = batch.step([cmd])[0]
    finally:
        batch.close()
    text = envs.fit_prompt(agent.tok, agent.prompt_format, info, obs, history, 3)
    assert (
        info["goal"] in text
        and f"Action: {history[-1][1]}" in text
        and f"Action: {history[-2][1]}" in text
    )
    # last 2 only
    assert f"Action: {history[0][1]}" not in text.split("Current observation")[0].split("step 4")[1]
    assert all(c in text for c in info["admissible"]) and "<action>" in text
    full = len(agent.tok(text).input_ids)
    # the oldest history goes first
    shorter = dataclasses.replace(agent.prompt_format, max_prompt_tokens=full - 1)
    short = envs.fit_prompt(agent.tok, shorter, info, obs, history, 3)
    assert len(agent.tok(short).input_ids) <= full - 1 and f"Action: {history[-1][1]}" in short


@pytest.mark.parametrize(
    "flags", [["--env", "alfworld"], ["--env", "alfworld", "--alfworld_data", "/nonexistent"]]
)
def test_missing_alfworld_data_names_both_fixes(monkeypatch, flags):
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    with pytest.raises(SystemExit, match="alfworld-download.*make-alfworld-mini"):
        pamoe.parse_args(flags)


def test_one_iteration_on_the_mini_set_end_to_end(mini, tmp_path):
    out = str(tmp_path / "run")
    last = pamoe.main(
        SMALL
        + [
            "--env",
            "alfworld",
            "--alfworld_data",
            mini,
            "--max_steps",
            "4",
            "--router_window",
            "4",
            "--iterations",
            "1",
            "--eval_every",
            "1",
            "--eval_episodes",
            "6",
            "--out_dir",
            out,
        ]
    )
    assert (
        last["env_steps"] > 0 and math.isfinite(last["pg_loss"]) and 0 <= last["eval/success"] <= 1
    )
    columns = {k.split("/")[-1] for k in last if k.startswith("eval/success/")}
    assert columns and columns <= set(envs.TASK_COLUMNS["alfworld"])
    assert read_metrics(out)[-1]["iteration"] == 1


# --- bench.py -------------------------------------------------------------------------------------
def test_bench_runs_and_reports_every_row(tmp_path, capsys):
    import bench

    out = str(tmp_path / "bench.json")
    report = bench.main(
        [
            "--sizes",
            "tiny,qwen2.5-1.5b",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--gen_tokens",
            "2",
            "--out",
            out,
        ]
    )
    whats = [r["what"] for r in report["rows"]]
    for needle in (
        "frozen base",
        "one LoRA",
        "routed experts, one stacked pass",
        "masked full passes",
        "generate: base",
        "generate: 4 routed",
        "experts off",
        "rollout: phase router + 4",
        "PPO update",
        "reference log-probs",
        "router + critic",
    ):
        assert sum(needle in w for w in whats) == 1, needle
    assert all(
        r["seconds"] > 0 and r["peak_bytes"] > 0 for r in report["rows"] if r["size"] == "tiny"
    )
    assert json.load(open(out))["rows"] == report["rows"]
    assert "not measured (needs CUDA)" in capsys.readouterr().out
    # would be overridden silently otherwise
    with pytest.raises(SystemExit, match="sets --routing.* itself"):
        bench.main(["ablation", "--seed", "3"])


def test_bootstrap_interval_iqm_difference_and_probability_of_improvement():
    """bench.py's statistics over seeds against hand-computed or textbook values."""
    import bench

    x = [0.9, 0.8, 0.85, 0.95, 0.7, 1.0, 0.88, 0.92]
    # a percentile bootstrap of a mean is close to mean +- 1.96 sd / sqrt(n)
    lo, hi = bench.interval(x)
    half = 1.96 * np.std(x, ddof=1) / math.sqrt(len(x))
    assert lo < np.mean(x) < hi and abs((hi - lo) / 2 - half) < 0.2 * half
    assert bench.interval([0.5] * 8) == (0.5, 0.5)
    assert bench.iqm(np.array([0, 1, 2, 3, 4, 5, 6, 100.0])) == 3.5  # the middle half: 2, 3, 4, 5
    d, (dlo, dhi) = bench.difference(np.array(x) + 0.1, x)
    assert d == pytest.approx(0.1) and dlo < 0.1 < dhi
    a, b = [0.3, 0.5, 0.5, 0.9], [0.5, 0.2, 0.6]
    naive = sum((u > v) + 0.5 * (u == v) for u in a for v in b) / (len(a) * len(b))
    assert bench.improvement(a, b)[0] == pytest.approx(naive)
    assert bench.improvement([1, 2, 3], [0, 0, 0]) == (1.0, (1.0, 1.0))
    assert "better than one LoRA by 0.30" in bench.verdict(
        [0.9] * 4 + [1.0] * 4, [0.6] * 4 + [0.7] * 4, ("phase", "one LoRA")
    )
    assert "indistinguishable" in bench.verdict(x, x[::-1], ("phase", "one LoRA"))


def test_the_ablation_runs_every_arm_and_seed_on_shared_bases_and_reports_intervals(
    tmp_path, capsys
):
    """bench.py ablation in miniature (3 arms x 2 seeds, 1 iteration; one arm of its own with
    --arm, run beside the --routings ones): each seed's `tiny` base is built once and loaded by
    every arm, giving the agent (weights and tokenizer) `--model tiny` gives; the report has
    intervals, the comparison with the reference arm and the diagnostics; a second call finds every
    run done."""
    import bench

    out = str(tmp_path / "ablation")
    flags = SMALL + ["--eval_every", "1", "--eval_episodes", "4", "--tiny_steps", "3"]
    flags += ["--diagnostics"]  # the report's diagnostics table
    command = (
        f"ablation --routings phase,dense --seeds 1,2 --iterations 1 --out_dir {out}".split()
        + ["--arm", "g2=--advantage grpo --group_size 2"]
    )
    bench.main([*command, "--jobs", "2", *flags])
    report = open(os.path.join(out, "ablation.md")).read()
    for needle in (
        "| phase | ",
        "| dense | +",
        "| g2 | +",
        "Verdict (area under the curve): phase ",
    ):
        assert needle in report, needle
    assert "occupancy" in report and "conflict" in report
    assert re.search(r"\| phase \| \d\.\d\d \[\d\.\d\d, \d\.\d\d\]", report)  # mean [95% interval]
    args = json.load(open(os.path.join(out, "g2-seed1", "args.json")))
    assert args[args.index("--advantage") + 1] == "grpo"
    drawn = importlib.util.find_spec("matplotlib") is not None  # the figures need it, not the rest
    figure = os.path.join(out, "ablation.png")
    assert not drawn or open(figure, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert not drawn or os.path.getsize(figure) < 200_000
    capsys.readouterr()
    bench.main([*command, *flags, "--figure_arms", "phase,dense"])  # redrawn from the runs
    assert "6 runs (6 already done)" in capsys.readouterr().out
    assert os.path.exists(os.path.join(out, "ablation-phase-dense.png")) == drawn
    built = make_agent("--tiny_steps", "3", seed=1)
    loaded = make_agent("--tiny_steps", "3", "--model", os.path.join(out, "base-seed1"), seed=1)
    for (n, a), (m, b) in zip(built.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    prompt = "Task: put some apple in shelf 1. You arrive at shelf 1. Answer with a number."
    # AutoTokenizer alone re-cuts tiny's words
    assert loaded.tok(prompt).input_ids == built.tok(prompt).input_ids


def test_probe_reads_the_task_only_through_the_goal_and_the_phase_from_the_step():
    """bench.py probe: the router's input names the task type through the goal's features alone (a
    probe that cannot read the goal it is given is broken), and the hidden phase is readable from
    the step features well above chance, on held-out steps."""
    import bench

    r = bench.main(["probe", "--rollouts", "1", "--tiny_steps", "40"])
    assert r["task <- obs+goal"]["accuracy"] >= 0.95 and r["task <- obs"]["accuracy"] < 0.8
    assert r["phase <- obs+goal"]["balanced"] >= r["phase <- obs+goal"]["chance"] + 0.3


# --- memory controls, preflight, responses that stop at the action, the HF path on CPU ------------
def minibatch_grads(agent, R, B, micro_batch):
    """Gradients of every trainable tensor after one PPO minibatch over the whole rollout (learning
    rates 0: nothing moves; no clipping at this --max_grad_norm)."""
    agent.args.micro_batch = micro_batch
    torch.manual_seed(0)
    pamoe.ppo_update(agent, torch.optim.AdamW(agent.param_groups()), R, B, {"updates": 0})
    return {n: p.grad.clone() for n, p in agent.named_parameters() if p.grad is not None}


def assert_same_grads(a, b):
    assert a.keys() == b.keys() and any(
        float(g.abs().max()) > 0 for n, g in a.items() if "router." in n
    )
    for n in a:
        torch.testing.assert_close(
            a[n], b[n], rtol=1e-4, atol=1e-5 * float(a[n].abs().max()) + 1e-9, msg=n
        )


# learning rates 0 (nothing moves), no clipping, one minibatch; a balance term as large as the
# task's (an error in it would show)
NO_STEP = (
    "--lr_experts 0 --lr_router 0 --lr_critic 0 --max_grad_norm 1e9 --minibatch 64 --balance_coef 1"
).split()


@pytest.mark.parametrize(
    "routing",
    [
        ["--routing", "phase"],
        ["--routing", "phase", "--balance", "sq", "--info_coef", "1"],
        ["--routing", "token"],
    ],
)
def test_micro_batches_and_checkpointing_give_the_minibatch_gradient(routing):
    """--micro_batch accumulates exactly the whole minibatch's gradient (an uneven split into 5s;
    token routing's balance is a statistic of all the minibatch's tokens); --grad_ckpt recomputes
    each decoder layer in backward with the routing of its forward, and the gradients of experts,
    routers and critic stay the same."""
    agent, ckpt = (
        make_agent(*NO_STEP, *routing),
        make_agent(*NO_STEP, *routing, "--grad_ckpt", "true"),
    )
    for a in (agent, ckpt):
        randomize_experts(a)  # else the experts' B = 0 and no gradient reaches the phase router
    R = pamoe.rollout(
        agent, envs.make_env_batch("toy", 4, 6), [1, 2, 3, 4], 2.0, 1.0, greedy_router=False
    )
    B = pamoe.prepare_batch(agent, R)
    assert len(R.seq) % 5 and len(R.seq) <= 64
    whole = minibatch_grads(agent, R, B, 0)
    assert_same_grads(whole, minibatch_grads(agent, R, B, 5))
    calls = []
    ckpt.experts[0].register_forward_hook(lambda *_: calls.append(1))
    assert_same_grads(whole, minibatch_grads(ckpt, R, B, 5))
    parts = -(-len(R.seq) // 5)
    # forward and replay of each part (+ token pre-pass)
    assert len(calls) == 2 * parts + (routing[-1] == "token")


def test_the_update_gives_the_gradient_of_one_graph_written_from_the_equations():
    """ppo_update's gradients (experts, phase router, critic) against one autograd graph written
    from the method's
    equations: p_t = softmax(router / tau); straight-through gates onehot(k) + p - stopgrad(p) route
    the LM; the loss is the token-mean clipped surrogate + kl_coef k3 - ent_coef entropy, + lambda_s
    mean over consecutive steps of one episode of (1 - p_t . p_t+1) + lambda_b K sum_k f_k P_k -
    lambda_i I(k; previous verb) (entropies of mean router probabilities) + vf_coef 0.5 mean (V -
    R)^2. The policy gradient must reach the router through the gates, the switch term must pair
    each step with the next step of its own episode, the information term must be maximised."""
    flags = [
        "--info_coef",
        "3",
        "--switch_coef",
        "2",
        "--kl_coef",
        "0.5",
        "--ent_coef",
        "0.1",
        "--vf_coef",
        "0.7",
    ]
    agent = make_agent(*NO_STEP, *flags)
    randomize_experts(agent)  # else the experts' B = 0 and no policy gradient reaches the router
    R = pamoe.rollout(
        agent, envs.make_env_batch("toy", 4, 6), [1, 2, 3, 4], 2.0, 1.0, greedy_router=False
    )
    B = pamoe.prepare_batch(agent, R)
    update = minibatch_grads(agent, R, B, 0)
    agent.zero_grad(set_to_none=True)
    a, K, N = agent.args, 4, len(R.seq)
    lanes, k = torch.tensor(R.lane), torch.tensor(R.k)
    windows = R.features[torch.tensor(R.window)]  # (N, L, 2d)
    goal, goal_mask = R.goal_states[lanes], R.goal_mask[lanes]
    p = F.softmax(agent.router(windows, goal, goal_mask) / a.tau_start, -1)  # (N, K)
    step_of = {(n, t): i for i, (n, t) in enumerate(zip(R.lane, R.t))}
    pairs = [
        (i, step_of[n, t + 1]) for i, (n, t) in enumerate(zip(R.lane, R.t)) if (n, t + 1) in step_of
    ]
    switch = torch.stack([1 - (p[i] * p[j]).sum() for i, j in pairs]).mean()
    balance = K * (torch.bincount(k, minlength=K) / N * p.mean(0)).sum()
    verbs = sorted(set(R.last_verb))
    group = torch.tensor([verbs.index(v) for v in R.last_verb])

    def entropy(q):
        return -(q * q.log()).sum(-1)

    info = entropy(p.mean(0)) - sum(
        (group == g).float().mean() * entropy(p[group == g].mean(0)) for g in range(len(verbs))
    )
    gates = (F.one_hot(k, K) + p - p.detach())[:, None]  # (N, 1, K)
    with agent.routing(gates):
        logp, ent, mask = agent.response_logprobs(
            R.seq, R.prompt_len, R.resp_len, a.temperature, gates
        )
    old, ref = (
        torch.nn.utils.rnn.pad_sequence(logp, batch_first=True) for logp in (B.old_logp, B.ref_logp)
    )
    ratio, adv = (logp - old).exp(), B.adv[:, None]
    surrogate = torch.max(-adv * ratio, -adv * ratio.clamp(1 - a.clip, 1 + a.clip))
    kl = (ref - logp).exp() - (ref - logp) - 1
    value = agent.critic(windows, goal, goal_mask)[:, 0]
    loss = (
        surrogate[mask].mean()
        + a.kl_coef * kl[mask].mean()
        - a.ent_coef * ent[mask].mean()
        + a.switch_coef * switch
        + a.balance_coef * balance
        - a.info_coef * info
        + a.vf_coef * 0.5 * ((value - B.ret) ** 2).mean()
    )
    loss.backward()
    graph = {n: p.grad for n, p in agent.named_parameters() if p.grad is not None}
    assert_same_grads({n: update.get(n, torch.zeros_like(g)) for n, g in graph.items()}, graph)
    # only unrouted experts were dropped
    assert all(graph[n].abs().max() == 0 for n in graph if n not in update)


def test_chunked_log_probs_and_entropy_equal_the_full_softmax_and_keep_nothing_vocabulary_sized():
    g = torch.Generator().manual_seed(0)
    N, d, V = 2 * pamoe.LOGIT_CHUNK + 17, 16, 300
    head = torch.nn.Linear(d, V, bias=False)
    hidden, y = (
        torch.randn(N, d, generator=g, requires_grad=True),
        torch.randint(V, (N,), generator=g),
    )
    full = F.log_softmax(head(hidden).float() / 0.7, -1)  # the unchunked reference
    ref = (full.gather(-1, y[:, None])[:, 0], -(full.exp() * full).sum(-1))
    (ref_grad,) = torch.autograd.grad((ref[0] * 2 + ref[1]).sum(), hidden)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: shapes.append(t.shape) or t, lambda t: t
    ):
        logp, ent = pamoe.token_logp_entropy(hidden, head, y, 0.7)
    # no (chunk, V) tensor is kept for backward: recomputed there
    assert not [s for s in shapes if V in s]
    torch.testing.assert_close((logp, ent), ref)
    torch.testing.assert_close(torch.autograd.grad((logp * 2 + ent).sum(), hidden)[0], ref_grad)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A GPU user's kind of model folder, built here: a small Qwen2-architecture model with random
    weights, a byte-level BPE tokenizer (256 byte symbols, no merges, Qwen's special tokens) and a
    chat template."""
    import bench
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = str(tmp_path_factory.mktemp("hf") / "qwen2-small")
    tok = bench.byte_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    Qwen2ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_tagged_responses_stop_at_the_action_per_sequence(hf_model, monkeypatch):
    """Generation stops each sequence at the </action> that closes its answer (or at EOS); the
    stored response is exactly the sampled tokens up to it; the batch stops when its last sequence
    has."""
    from transformers import LogitsProcessor

    agent = make_agent(
        "--model",
        hf_model,
        "--action_format",
        "tagged",
        "--max_new_tokens",
        "64",
        "--max_prompt_tokens",
        "512",
    )
    answers = [
        "<think>a</think><action>1</action>",
        "<think>a longer one</think><action>2</action> and more",
    ]
    forced = [agent.tok(t, add_special_tokens=False).input_ids for t in answers]

    # lane n writes answers[n]; then EOS is never sampled, so only </action> stops
    class Force(LogitsProcessor):
        def __init__(self, start):
            self.start = start

        def __call__(self, input_ids, scores):
            t = input_ids.shape[1] - self.start
            for n, ids in enumerate(forced):
                scores[n, agent.tok.eos_token_id] = -float("inf")
                if t < len(ids):
                    scores[n] = torch.where(
                        torch.arange(scores.shape[1]) == ids[t], 0.0, -float("inf")
                    )
            return scores

    generate, widths = agent.lm.generate, []

    def forcing_generate(**kw):
        kw["logits_processor"] = [*kw["logits_processor"], Force(kw["input_ids"].shape[1])]
        out = generate(**kw)
        widths.append(out.shape[1] - kw["input_ids"].shape[1])
        return out

    monkeypatch.setattr(agent.lm, "generate", forcing_generate)
    R = pamoe.rollout(
        agent, envs.make_env_batch("toy", 2, 1), [1, 2], 2.0, 1.0, greedy_router=False
    )
    # tokens up to the stop
    stops = [len(agent.tok("".join(a.partition("</action>")[:2])).input_ids) for a in answers]
    assert R.resp_len == stops and widths == [max(stops)] and max(stops) < 64
    assert [agent.tok.decode(s[-n:]) for s, n in zip(R.seq, stops)] == [
        a.partition(" and")[0] for a in answers
    ]
    assert R.invalid == [False, False]
    ids = agent.tok("<think>x</think><action>go</action> more", add_special_tokens=False).input_ids
    assert (
        envs.response_length(ids + [agent.tok.eos_token_id], agent.tok, "</action>") == len(ids) - 5
    )
    assert (
        envs.response_length(ids[:5] + [agent.tok.eos_token_id] + ids, agent.tok, "</action>") == 6
    )
    assert envs.response_length(ids[:5], agent.tok, "</action>") == 5


QWEN_SAMPLING = {
    "do_sample": True,
    "repetition_penalty": 1.1,
    "temperature": 0.7,
    "top_k": 20,
    "top_p": 0.8,
}


def test_generate_samples_from_the_distribution_ppo_scores_whatever_the_models_generation_config(
    hf_model, tmp_path
):
    """A model folder whose generation_config.json carries Qwen2.5-Instruct's shipped sampling
    settings (repetition penalty 1.1, top-k 20, top-p 0.8, temperature 0.7): pamoe.generate applies
    none of them, so the sampler's log-probs (its processed scores) are the ones response_logprobs
    computes at the rollout's temperature."""
    folder = str(tmp_path / "qwen-like")
    shutil.copytree(hf_model, folder)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({**QWEN_SAMPLING, "eos_token_id": [1, 2], "pad_token_id": 0}, f)
    agent = make_agent("--model", folder, "--action_format", "tagged", "--max_new_tokens", "16")
    randomize_experts(agent)
    generate, scores = agent.lm.generate, []

    def generate_with_scores(**kw):
        out = generate(**kw, output_scores=True, return_dict_in_generate=True)
        scores.append(torch.stack(out.scores, 1))  # (B, new tokens, V) after every logits processor
        return out.sequences

    agent.lm.generate = generate_with_scores
    prompts = [
        f"<|im_start|>user\nTask {i}: {'go ' * i}<|im_end|>\n<|im_start|>assistant\n"
        for i in (1, 5, 9)
    ]
    gates = F.one_hot(torch.tensor([0, 2, 3]), 4).float()[:, None]
    torch.manual_seed(0)
    samples, _ = pamoe.generate(agent, prompts, gates, 1.3)
    seqs, pl, rl = (
        [torch.cat([p, r]) for p, r, _ in samples],
        [len(p) for p, _, _ in samples],
        [len(r) for _, r, _ in samples],
    )
    logp, _, mask = agent.response_logprobs(seqs, pl, rl, 1.3, gates)
    sampled = F.log_softmax(scores[0].float(), -1)  # (3, new tokens, V)
    for i, (_, resp, _) in enumerate(samples):
        picked = sampled[i, torch.arange(len(resp)), resp]
        torch.testing.assert_close(logp[i, : len(resp)], picked, atol=1e-4, rtol=0)
    assert max(rl) > 1 and mask.sum() == sum(rl)


def test_the_static_cache_path_samples_what_the_dynamic_one_does(hf_model):
    """--compile_decode's static KV cache (compiled on CUDA only) against the dynamic cache on an
    equal batch (no filled-up lanes): the same tokens and the same sampler log-probs for one seed.
    A batch filled up to more lanes returns the real prompts' samples, its extra lanes on expert
    A."""
    agent = make_agent("--model", hf_model, "--action_format", "tagged", "--max_new_tokens", "16")
    randomize_experts(agent)
    generate, scores = agent.lm.generate, []

    def generate_with_scores(**kw):
        out = generate(**kw, output_scores=True, return_dict_in_generate=True)
        scores.append(torch.stack(out.scores, 1))  # (B, new tokens, V)
        return out.sequences

    agent.lm.generate = generate_with_scores
    prompts = [f"<|im_start|>user\nTask {i}: {'go ' * i}<|im_end|>\n" for i in (1, 4, 7)]
    gates = F.one_hot(torch.tensor([0, 2, 3]), 4).float()[:, None]
    runs = []
    for static in (False, True):
        agent.args.compile_decode = static
        torch.manual_seed(0)
        runs.append(pamoe.generate(agent, prompts, gates, 1.0, batch_size=3)[0])
    for (p1, r1, _), (p2, r2, _) in zip(*runs):
        assert torch.equal(p1, p2) and torch.equal(r1, r2)
    torch.testing.assert_close(scores[1], scores[0], atol=1e-4, rtol=0)
    assert len(agent.caches) == 1 and max(len(r) for _, r, _ in runs[0]) > 1
    samples, _ = pamoe.generate(agent, prompts, gates, 1.0, batch_size=5)
    assert len(samples) == 3 and scores[-1].shape[0] == 5
    assert torch.equal(agent.gate_buffers[5][3:, 0], F.one_hot(torch.tensor([0, 0]), 4).float())


def record_scores(agent):
    """From here agent.lm.generate also records each call's sampler log-probs (B, new tokens, V)
    in the list returned."""
    generate, scores = agent.lm.generate, []

    def generate_with_scores(**kw):
        out = generate(**kw, output_scores=True, return_dict_in_generate=True)
        scores.append(torch.stack(out.scores, 1).float().log_softmax(-1))
        return out.sequences

    agent.lm.generate = generate_with_scores
    return scores


def compiled_decode(agent, backend):
    """pamoe.generate with --compile_decode, compilation forced on the CPU (NOTES 18: load_model
    replaces the generation config, so it is set here, after): one warm-up call after a reset of
    every compiled graph and count, then three calls with other gates and prompts. Returns the
    compile counters after the warm-up and after the three calls, and the three calls' samples and
    sampler log-probs (one seed each)."""
    import bench
    from transformers import CompileConfig

    config = CompileConfig(mode="default", backend=backend)
    config._compile_all_devices = True
    agent.lm.generation_config.compile_config = config
    agent.args.compile_decode = True
    generate = agent.lm.generate
    scores = record_scores(agent)
    bench.reset_compile()
    samples = []
    for c, (prompts, gates) in enumerate(DECODE_CALLS):
        torch.manual_seed(0)
        samples.append(pamoe.generate(agent, prompts, gates, 1.0, batch_size=3)[0])
        if c == 0:
            warm = bench.compile_counters()
    agent.lm.generate = generate
    return warm, bench.compile_counters(), samples[1:], scores[1:]


# a warm-up call, then three with other prompts (other lengths) and other experts per prompt
DECODE_CALLS = [
    (
        [f"<|im_start|>user\nTask {i}: {'go ' * (i + c)}<|im_end|>\n" for i in (1, 4, 7)],
        F.one_hot(torch.tensor(k), 4).float()[:, None],
    )
    for c, k in enumerate(([0, 1, 2], [3, 3, 0], [2, 0, 1], [1, 2, 3]))
]


def assert_one_graph(warm, after):
    """The compiled decode step is one graph: no graph break and nothing unimplemented since the
    reset, and no graph added after the warm-up call."""
    assert after["graph_breaks"] == 0 and after["unimplemented"] == 0, after
    assert after["graphs"] == warm["graphs"] >= 1, (warm, after)


COMPILE_BACKEND = "inductor"


def test_the_compiled_decode_step_is_one_graph_and_samples_what_eager_does(hf_model):
    """--compile_decode on a 2-layer model with 4 routed experts: the decode step compiles into one
    graph that no change of gates or prompts recompiles, and the compiled calls sample the eager
    path's tokens with its log-probs (float32, 1e-4). What a lent GPU would otherwise be the first
    to reveal; its speed is not measured here."""
    flags = ["--model", hf_model, "--action_format", "tagged", "--max_new_tokens", "16"]
    agent = make_agent(*flags, "--max_prompt_tokens", "64")
    randomize_experts(agent)
    warm, after, compiled, compiled_scores = compiled_decode(agent, COMPILE_BACKEND)
    assert_one_graph(warm, after)
    agent.args.compile_decode = False  # the eager path: a dynamic cache, nothing compiled
    eager_scores = record_scores(agent)
    for c, (prompts, gates) in enumerate(DECODE_CALLS[1:]):
        torch.manual_seed(0)
        eager = pamoe.generate(agent, prompts, gates, 1.0, batch_size=3)[0]
        for (p1, r1, _), (p2, r2, _) in zip(compiled[c], eager):
            assert torch.equal(p1, p2) and torch.equal(r1, r2)
        torch.testing.assert_close(compiled_scores[c], eager_scores[c], atol=1e-4, rtol=0)


def test_the_one_graph_check_sees_a_graph_break_in_the_experts(hf_model, monkeypatch):
    """The check of the test above fails when the experts' forward breaks the graph."""
    forward = pamoe.LoRAExperts.forward

    def broken(self, x):
        torch._dynamo.graph_break()
        return forward(self, x)

    monkeypatch.setattr(pamoe.LoRAExperts, "forward", broken)
    flags = ["--model", hf_model, "--action_format", "tagged", "--max_new_tokens", "16"]
    agent = make_agent(*flags, "--max_prompt_tokens", "64")
    warm, after, _, _ = compiled_decode(agent, "eager")  # dynamo's capture alone: what breaks
    with pytest.raises(AssertionError):
        assert_one_graph(warm, after)
    assert after["graph_breaks"] > 0


GPU_USER_CASES = {
    "toy, float32": ["--env", "toy"],
    "toy, bfloat16": ["--env", "toy", "--dtype", "bfloat16"],
    "alfworld, float32": ["--env", "alfworld"],
    "alfworld, bfloat16": ["--env", "alfworld", "--dtype", "bfloat16"],
    "alfworld, the paper's GiGPO in game groups, dual clip": (
        "--env alfworld --advantage gigpo --group_size 2 --clip_c 3"
    ).split(),
}


@pytest.mark.parametrize("case", GPU_USER_CASES)
def test_the_gpu_users_path_on_cpu(hf_model, mini, tmp_path, case):
    """`pamoe.py --model <folder> --action_format tagged` as on a GPU, minus CUDA: a Hugging Face
    model folder with a byte-level tokenizer and a chat template, micro-batches and activation
    checkpointing, one iteration and an evaluation, in float32 and in bf16, with GAE or GiGPO."""
    out = str(tmp_path / "run")
    flags = (
        "--action_format tagged --max_new_tokens 24 --max_prompt_tokens 384 --num_envs 2 "
        "--max_steps 3 --router_window 3 --iterations 1 --eval_every 1 --eval_episodes 2 "
        "--micro_batch 2 --grad_ckpt true"
    ).split()
    paths = ["--model", hf_model, "--alfworld_data", mini, "--out_dir", out]
    last = pamoe.main(SMALL + flags + paths + GPU_USER_CASES[case])
    assert last["env_steps"] == 6 and math.isfinite(last["pg_loss"])
    assert 1 <= last["resp_len_mean"] <= last["resp_len_max"] <= 24
    # where the iteration's time went: prefill and decode of every generate call, env, features
    assert all(last[k] > 0 for k in ("prefill_s", "decode_s", "env_s", "features_s"))
    assert last["decode_ms_per_step"] > 0 and last["gen_tokens_per_s"] > 0
    dtype = "bfloat16" if "bfloat16" in case else "float32"
    agent = make_agent("--model", hf_model, "--dtype", dtype)
    # the frozen base; experts, routers and critic stay float32
    assert agent.lm.dtype == getattr(torch, dtype)
    assert all(p.dtype == torch.float32 for p in agent.parameters() if p.requires_grad)


PREFLIGHTS = {
    "tiny": ["--max_new_tokens", "4"],
    "tiny, bf16, checkpointed, micro-batches": (
        "--max_new_tokens 4 --dtype bfloat16 --grad_ckpt --micro_batch 2"
    ).split(),
    "the GPU user's first command, before any game is downloaded": (
        "--model HF --env alfworld --action_format tagged --max_new_tokens 16"
    ).split(),
    "the paper's setting: GiGPO in game groups, dual clip": (
        "--model HF --env alfworld --action_format tagged --max_new_tokens 16 --advantage gigpo "
        "--group_size 4 --clip_c 3"
    ).split(),
}


@pytest.mark.parametrize("flags", PREFLIGHTS.values(), ids=PREFLIGHTS)
def test_preflight_reports_memory_and_time_and_trains_nothing(
    tmp_path, capsys, monkeypatch, hf_model, flags
):
    import bench

    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    out = str(tmp_path / "run")
    flags = [hf_model if f == "HF" else f for f in flags]
    report = bench.main(
        ["preflight"] + SMALL + ["--max_prompt_tokens", "128", "--out_dir", out] + flags
    )
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ")[0] for line in lines[-4:]] == ["preflight", "rollout", "PPO", "one"]
    assert "peak memory" in lines[-3] and "ms per decode step" in lines[-3]
    assert "ms per token" in lines[-2] and "typical" in lines[-1]
    assert report["peak_gib"] > 0 and report["decode_ms_per_step"] > 0 and report["prefill_s"] > 0
    assert 0 < report["iteration_s_typical"] <= report["iteration_s"]
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))  # trains nothing


def test_gpu_rollout_runs_on_the_cpu_with_a_small_model(tmp_path, monkeypatch, capsys):
    """bench.py gpu-rollout, the device script, in miniature and where matplotlib is absent (as on
    the device): every row measured, the static path samples what the eager one does (no compile
    on the CPU, and it says so), an estimate of the preset's run."""
    import bench

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importing it would fail
    out = str(tmp_path / "gpu-rollout.json")
    flags = "gpu-rollout --size small --batch 4 --prompt 48 --new 6".split() + ["--out", out]
    report = bench.main(flags)
    assert len(report["rows"]) == 4 and all(r["decode_ms_per_step"] > 0 for r in report["rows"])
    assert not any(r["compiled"] for r in report["rows"]) and all(
        r["graphs"] == 0 for r in report["rows"]
    )
    assert capsys.readouterr().out.count("static (no compile on the CPU)") == 2
    assert report["agreement"]["tokens_equal"] == 1 and report["agreement"]["max_logp_diff"] < 1e-4
    assert report["estimate"]["iteration_min"] > 0 and json.load(open(out))["size"] == "small"


def test_memory_model_counts_what_backward_keeps_and_checkpointing_cuts_it():
    """bench.py memory's measurement on the tiny model: bytes kept for backward grow linearly with
    length, and with --grad_ckpt little more than each layer's input stays; the derived table ranks
    the GPUs and the flag sensibly."""
    import bench

    model = envs.build_tiny(envs.vocabulary(), 0)[0].eval().requires_grad_(False)
    routing = bench.attach(model, "phase", 4, 8)
    plain = [bench.micro_batch_bytes(model, routing, 4, T, 16)[0] for T in (64, 128, 256)]
    pamoe.checkpoint_layers(model)
    ckpt = [bench.micro_batch_bytes(model, routing, 4, T, 16)[0] for T in (128, 256)]
    per_token, ckpt_per_token = (plain[2] - plain[1]) / 128, (ckpt[1] - ckpt[0]) / 128
    layer_input = model.config.hidden_size * 4  # float32
    # linear in the tokens
    assert plain[1] - plain[0] == pytest.approx((plain[2] - plain[1]) / 2, rel=0.02)
    assert layer_input * 2 <= ckpt_per_token < per_token / 4
    rows = [
        dict(
            layers=n,
            T=T,
            grad_ckpt=c,
            body_bytes=((1e5 if not c else 3e3) * n + 6e3) * T + 2e6 * n,
            head_per_response_token=3e3,
        )
        for n in (2, 4)
        for c in (False, True)
        for T in (512, 1024)
    ]
    opts = argparse.Namespace(prompt=2048, new=512, num_envs=32, experts=4, rank=32)
    sizes = dict(
        layer=46_797_824,
        experts_per_layer=1_310_720,
        embedding=233_373_184,
        router_and_critic=30_000_000,
        logits_chunk_saved=300_000_000,
    )
    table = bench.derive(rows, sizes, opts)["table"]
    fits = [(r["micro_batch grad_ckpt=False"], r["micro_batch grad_ckpt=True"]) for r in table]
    assert fits == sorted(fits) and all(0 < plain_ < ckpt_ for plain_, ckpt_ in fits)


# --- data parallel: torchrun ranks, each on its share of the lanes --------------------------------
def take_lanes(R, lanes):
    """What a rank stepping `lanes` (a range) collects of the rollout R: their steps, lanes numbered
    from 0."""
    mine = [i for i, n in enumerate(R.lane) if n in lanes]
    part = {
        f.name: [getattr(R, f.name)[i] for i in mine]
        for f in dataclasses.fields(R)
        if isinstance(getattr(R, f.name), list)
    }
    part["lane"] = [n - lanes.start for n in part["lane"]]
    return pamoe.Rollout(
        **part,
        features=R.features,
        goal_states=R.goal_states[lanes.start : lanes.stop],
        goal_mask=R.goal_mask[lanes.start : lanes.stop],
        final_window={n - lanes.start: w for n, w in R.final_window.items() if n in lanes},
    )


UPDATE_CASES = {
    "phase": ["--routing", "phase"],
    "phase, sq balance, routing information, micro-batches": (
        "--routing phase --balance sq --info_coef 1 --micro_batch 5"
    ).split(),
    "token": ["--routing", "token"],
    "token, sq balance, micro-batches": "--routing token --balance sq --micro_batch 5".split(),
    "phase, gigpo in groups of 2, dual clip, rspo": (
        "--routing phase --advantage gigpo --group_size 2 --clip_c 3 --rspo"
    ).split(),
    "token, rspo": "--routing token --rspo".split(),
}


def update_on_my_lanes(flags, R):
    """This rank's experts, router, critic and gradients after one PPO update (one minibatch, one
    epoch, no clipping) on its share of the rollout R of 4 lanes. The step is SGD at learning rate
    1, so that the parameters move by the gradient itself (Adam's first step, about lr * sign(g),
    would blow float noise up to a full step where the true gradient is 0, as for the attention's
    key bias)."""
    agent = make_agent("--minibatch", "64", "--max_grad_norm", "1e9", "--balance_coef", "1", *flags)
    randomize_experts(agent)  # else the experts' B = 0 and no gradient reaches the phase router
    R = take_lanes(R, pamoe.my_lanes(4))
    torch.manual_seed(0)
    opt = torch.optim.SGD([dict(group, lr=1.0) for group in agent.param_groups()])
    pamoe.ppo_update(agent, opt, R, pamoe.prepare_batch(agent, R), {"updates": 0})
    return {
        **agent.trainable_state(),
        **{f"{n}.grad": p.grad for n, p in agent.named_parameters() if p.requires_grad},
    }


def update_rank(rank, port, folder):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
    )
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rollouts = torch.load(os.path.join(folder, "rollouts.pt"), weights_only=False)
    results = [update_on_my_lanes(f, R) for f, R in zip(UPDATE_CASES.values(), rollouts)]
    # a nan on one rank only: every rank must stop, none may wait for it in a collective
    if rank == 1:
        pamoe.kl_k3 = lambda *args: torch.tensor(float("nan"))
    try:
        update_on_my_lanes([], rollouts[0])
    except pamoe.NonFiniteError as e:
        results.append(str(e))
    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_two_ranks_update_on_halves_of_a_rollout_as_one_process_on_all_of_it(tmp_path):
    """Data parallel PPO is exact: one rollout of 4 lanes, split 2 + 2 across 2 ranks (gloo), gives
    after one update the same experts, router, critic and gradients as one process on the whole
    rollout: advantages whitened, token means, value and switch means, load balance (a nonlinear
    function of the batch's mean router probabilities and of the choices), all over both ranks'
    steps. A nan on one rank stops both."""
    rollouts = []
    for flags in UPDATE_CASES.values():
        agent = make_agent(*flags)
        randomize_experts(agent)
        rollouts.append(
            pamoe.rollout(agent, envs.make_env_batch("toy", 4, 6), [1, 2, 3, 4], 2.0, 1.0, False)
        )
    torch.save(rollouts, tmp_path / "rollouts.pt")
    with socket.socket() as s:  # a free port for the ranks' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(update_rank, args=(port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r.pop() for r in ranks] == ["kl", "kl"]
    for case, R, two, other in zip(UPDATE_CASES, rollouts, *ranks):
        one = update_on_my_lanes(UPDATE_CASES[case], R)
        assert one.keys() == two.keys() and any(
            "router" in n and float(t.abs().max()) > 0
            for n, t in two.items()
            if n.endswith(".grad")
        )
        for n in one:
            assert torch.equal(two[n], other[n]), (case, n)  # the ranks stay identical
            torch.testing.assert_close(
                two[n],
                one[n],
                rtol=1e-4,
                atol=1e-5 * float(one[n].abs().max()) + 1e-7,
                msg=f"{case}: {n}",
            )


def torchrun(*flags):
    """pamoe.py under torchrun, 2 ranks on this machine (gloo; --standalone rendezvous on a free
    port)."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "pamoe.py",
            *flags,
        ],
        cwd=os.path.dirname(os.path.abspath(__file__)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return run.stdout


def test_two_ranks_train_evaluate_checkpoint_and_resume_with_torchrun(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    ckpt, flags = (
        os.path.join(out, "checkpoint.pt"),
        SMALL + ["--eval_every", "2", "--eval_episodes", "6", "--out_dir", out],
    )
    printed = torchrun(*flags, "--iterations", "2")
    # rank 0 alone prints: before training and at iteration 2
    assert printed.count("eval success") == 2
    metrics = read_metrics(out)
    # one line per iteration: rank 0 alone writes
    assert [m["iteration"] for m in metrics] == [0, 1, 2]
    # statistics of all 4 training and 6 evaluation episodes, not of one rank's half: a toy episode
    # takes >= 4 steps
    assert all(m["env_steps"] == 4 * m["steps"] >= 16 for m in metrics[1:])
    # usage by task type and by phase: each counts every step
    tables = printed.split("[iteration 2]")[1]
    eval_steps = sum(int(n) for n in re.findall(r"\(n=(\d+)\)", tables)) / 2
    assert eval_steps == 6 * metrics[-1]["eval/steps"] >= 24
    state = torch.load(ckpt, weights_only=False)
    assert state["world_size"] == 2 and not torch.equal(
        state["rng"][0]["torch"], state["rng"][1]["torch"]
    )
    torchrun(*flags, "--iterations", "3", "--resume", ckpt)
    assert [m["iteration"] for m in read_metrics(out)] == [0, 1, 2, 3]
    with pytest.raises(
        SystemExit, match="written by 2 processes and this run has 1: resume with as many"
    ):
        pamoe.main(flags + ["--iterations", "4", "--resume", ckpt])
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(
        SystemExit, match="--num_envs 4 and --eval_episodes 128: too few for 8 processes; use >= 8"
    ):
        pamoe.parse_args(SMALL)


def test_two_torchrun_agents_meet_as_two_nodes_through_the_c10d_rendezvous(tmp_path):
    """Several nodes, proven on one machine: two torchrun agents (--nnodes 2, one process each)
    rendezvous through c10d on a free local port, train 2 iterations together and leave one metrics
    line per iteration and a checkpoint of 2 processes."""
    out = str(tmp_path / "run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"127.0.0.1:{port}",
        "pamoe.py",
        *SMALL,
        "--iterations",
        "2",
        "--out_dir",
        out,
    ]
    nodes = [
        subprocess.Popen(
            cmd,
            cwd=os.path.dirname(os.path.abspath(__file__)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        logs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert [m["iteration"] for m in read_metrics(out)] == [1, 2]
    # both nodes' lanes in every line
    assert all(m["env_steps"] == 4 * m["steps"] for m in read_metrics(out))
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["world_size"] == 2
