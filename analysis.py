"""analysis.py: what a run says about itself, beside pamoe.py's training.

- expert_diagnostics: the paper's parameter occupancy (its Fig. 1) and the gradient conflict
  between task types, per expert (pamoe.py --diagnostics, at each evaluation);
- nmi and usage_tables: how the evaluation's routing lines up with the task types and phases
  (every evaluation's eval/phase_nmi, eval/usage/* and the tables of eval.log);
- rollout_stats, episode_metrics, evaluation_metrics, iteration_metrics, evaluation_report: a
  metrics.jsonl line and an evaluation's text, from a rollout's per-step lists (pamoe.Rollout);
  explained_variance and zero_advantage_shares: the update's word on its advantages;
- report_iteration, keep_until: on resume, the logs cut back to the checkpoint's iteration;
- Clock and DecodeMark: where an iteration's time goes (prefill, decode, env, ...).

Functions of what they are given: this module imports neither pamoe.py nor bench.py.
"""

import contextlib
import math
import os
import time
from collections import Counter, defaultdict

import numpy as np
import torch
import torch.nn.functional as F

import envs

LETTERS = "ABCDEFGHIJKLMNOP"  # expert names in tables, metrics and exports


def expert_diagnostics(task_types, lanes, types, gradient):
    """Occupancy and conflict over one rollout, from gradient(idx) (K, n): the gradient, w.r.t.
    each expert k's parameters, of the share of the policy-gradient term that the steps idx carry.
    task_types, lanes: this rank's steps'; types: the task types of all ranks (every rank calls
    gradient for the same groups, in the same order). g_k,c is the gradient of the steps of task
    type c, g_k,c = g_k,c,0 + g_k,c,1 over the episodes of even and odd lanes, two halves drawn
    from one distribution.
        occupancy/<k>/<c> = |g_k,c| / sum_c' |g_k,c'|         which task types train expert k
        conflict/<k> = mean over pairs c != c' of cos(g_k,c, g_k,c')     (pairs of non-zero g)
        conflict_pick/<k> = mean over c != pick of cos(g_k,pick, g_k,c)   the frequent type
        coherence/<k> = mean over c of cos(g_k,c,0, g_k,c,1)   the split-half noise floor
    An expert no step was routed to has none of them."""
    halves = {}  # (c, half) -> (K, n)
    for c in types:
        for half in (0, 1):
            steps_of = [
                i for i, (t, n) in enumerate(zip(task_types, lanes)) if t == c and n % 2 == half
            ]
            halves[c, half] = gradient(steps_of)
    g = {c: halves[c, 0] + halves[c, 1] for c in types}
    out, K = {}, len(g[types[0]])
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
                np.mean([cosine(g[c][k], g[d][k]) for c, d in pairs])
            )
        if "pick" in live and len(live) > 1:
            rare = [cosine(g["pick"][k], g[c][k]) for c in live if c != "pick"]
            out[f"conflict_pick/{LETTERS[k]}"] = float(np.mean(rare))
        split = [
            cosine(halves[c, 0][k], halves[c, 1][k])
            for c in live
            if halves[c, 0][k].norm() > 0 and halves[c, 1][k].norm() > 0
        ]
        if split:
            out[f"coherence/{LETTERS[k]}"] = float(np.mean(split))
    return out


def cosine(x, y):
    return float(F.cosine_similarity(x, y, dim=0))


def nmi(a, b):
    """Normalised mutual information I(a; b) / mean(H(a), H(b)) of two labelings of the same items
    (lists of hashables): 1 for a one-to-one map, 0 for independent labelings or when either is
    constant."""
    n, count_a, count_b, count_ab = len(a), Counter(a), Counter(b), Counter(zip(a, b))
    mi = sum(c / n * math.log(c * n / (count_a[x] * count_b[y])) for (x, y), c in count_ab.items())
    h = [-sum(c / n * math.log(c / n) for c in count.values()) for count in (count_a, count_b)]
    return 0.0 if min(h) <= 0 else max(0.0, mi) / (sum(h) / 2)


def usage_tables(steps, by_task, K):
    """Expert usage by task type and by phase, and one phase timeline per task type, of the
    evaluation's steps (anything with per-step lists k, task_type and phase) and its episodes by
    task type: the eval/usage/* metrics and the text."""
    lines, m = [], {}
    for key, column in (("task type", steps.task_type), ("phase", steps.phase)):
        usage = defaultdict(Counter)
        for k, label in zip(steps.k, column):
            usage[label][k] += 1
        letters = " ".join(f"{LETTERS[k]:>5}" for k in range(K))
        lines.append(f"expert usage by {key} (fraction of steps): {letters}")
        for name, count in sorted(usage.items()):
            n = sum(count.values())
            shares = " ".join(f"{count[k] / n:5.2f}" for k in range(K))
            lines.append(f"  {name:<10}{shares}   (n={n})")
            if key == "task type":
                for k in range(K):
                    m[f"eval/usage/{name}/{LETTERS[k]}"] = count[k] / n
    code = {}
    for phase in sorted(set(steps.phase)):  # one letter per phase: its initial, upper if taken
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


def rollout_stats(steps, N):
    """Per-episode summaries of N episodes' steps: success, return, length, switches, task type,
    experts and phases."""
    episodes = [{"return": 0.0, "won": False, "experts": [], "phases": []} for _ in range(N)]
    columns = zip(steps.lane, steps.reward, steps.won, steps.task_type, steps.k, steps.phase)
    for n, reward, won, task_type, k, phase in columns:
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
        "invalid": steps.invalid,
    }
    for task_type in task_types:
        m[f"success/{task_type}"] = [e["won"] for e in episodes if e["task_type"] == task_type]
    for k in range(K):
        m[f"expert_share/{LETTERS[k]}"] = np.equal(steps.k, k)
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
    m["resp_len_mean"] = np.mean(all_steps.resp_len)
    m["resp_len_max"] = max(all_steps.resp_len)
    m["env_steps"] = len(all_steps.k)
    m.update(times)  # rollout, prepare and update; prefill, decode, env and features; counts
    if times.get("decode_steps"):
        m["decode_ms_per_step"] = 1000 * times["decode_s"] / times["decode_steps"]
    if times.get("generated"):  # every row of every decode step, finished or not
        m["gen_tokens_per_s"] = times["generated"] / (times["prefill_s"] + times["decode_s"])
    m["iteration_s"] = time.time() - t0
    m["sps"] = m["env_steps"] / m["iteration_s"]
    return m


def evaluation_report(it, metrics, tables):
    """The text of an evaluation: success in all and per task type, then the tables."""
    columns = " ".join(
        f"{k.split('/')[-1]} {v:.2f}" for k, v in metrics.items() if k.startswith("eval/success/")
    )
    return f"[iteration {it}] eval success: All {metrics['eval/success']:.2f} {columns}\n{tables}"


def evaluation_metrics(steps, n_episodes, K, task_types):
    """An evaluation's eval/* metrics and its tables, from all ranks' steps of its n_episodes:
    success, returns and expert shares (per task type too), how the routing lines up with phases
    and task types (NMI), the share's entropy and the usage tables."""
    episodes = rollout_stats(steps, n_episodes)
    by_task = {c: [e for e in episodes if e["task_type"] == c] for c in task_types}
    m = episode_metrics(steps, episodes, K, task_types, "eval/")
    share = [m[f"eval/expert_share/{LETTERS[k]}"] for k in range(K)]
    m["eval/phase_nmi"] = nmi(steps.k, steps.phase)
    m["eval/task_nmi"] = nmi(steps.k, steps.task_type)
    m["eval/share_entropy"] = -sum(x * math.log(x) for x in share if x > 0)
    usage, tables = usage_tables(steps, by_task, K)
    return {**m, **usage}, tables


def explained_variance(values, returns):
    """1 - Var(returns - values) / Var(returns): the share of the returns' variance the critic
    explains (nan when the returns do not vary)."""
    if returns.var() == 0:
        return float("nan")
    return float(1 - (returns - values).var() / returns.var())


def zero_advantage_shares(parts):
    """zero_adv/<task>: each task type's share of steps whose advantage is 0, from every rank's
    (task types, advantage is 0) lists."""
    by_task = defaultdict(list)
    for part_tasks, part_zero in parts:
        for task, is_zero in zip(part_tasks, part_zero):
            by_task[task].append(is_zero)
    return {f"zero_adv/{task}": float(np.mean(z)) for task, z in by_task.items()}


def report_iteration(line):
    """The iteration an evaluation report of eval.log (evaluation_report) begins with, None for
    its other lines."""
    if not line.startswith("[iteration "):
        return None
    return int(line.split("]")[0][len("[iteration ") :])


def keep_until(path, start, iteration_of):
    """On resume, keep the lines of a log that belong to iterations <= start: iteration_of(line)
    is the iteration a line begins (None: the line belongs to the one before it)."""
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
