"""Text environments for PA-MoE: one small interface, a toy ALFWorld in miniature, the prompt and the
projection from model text to a command.

Interface (every env, batched over N lanes stepped in lockstep):
    batch.reset(seeds)  -> list of (observation, info)
    batch.step(actions) -> list of (observation, reward, terminated, truncated, info), None for a lane
                           whose action is None (its episode already ended)
    info: goal, admissible (list of commands), task_type, won, and phase: the hidden phase of the state the
    agent is now in (find / take / transform / carry / place). Phases serve analysis only, never training.
"""
import random
import re

# ---------------------------------------------------------------------------------------------------------
# Toy env: ALFWorld in miniature. A room with places, one target object and one distractor. Tasks run through
# phases: find the object (search the storage places), take it, transform it at an appliance (clean / heat /
# cool), carry it to the target place, place it. The task mix is skewed towards plain pick-and-place so that
# simplicity bias can show. Commands follow ALFWorld 0.4.2 syntax.
# ---------------------------------------------------------------------------------------------------------
PLACES = ["countertop 1", "shelf 1", "diningtable 1", "sinkbasin 1", "microwave 1", "fridge 1"]
STORAGE = PLACES[:2]  # where objects start
TARGETS = PLACES[:3]  # where they must go
OBJECTS = ["apple", "mug", "tomato", "potato"]
# task type -> (appliance, verb, adjective in the goal); pick needs no transform
TRANSFORMS = {"clean": ("sinkbasin 1", "clean", "clean"), "heat": ("microwave 1", "heat", "hot"),
              "cool": ("fridge 1", "cool", "cool")}
TASK_TYPES = ["pick", "clean", "heat", "cool"]
TASK_MIX = [0.7, 0.1, 0.1, 0.1]
PHASES = ["find", "take", "transform", "carry", "place"]
WIN_REWARD = 10.0


class ToyEnv:
    """One episode at a time; deterministic given the seed passed to reset."""

    def __init__(self, max_steps=20):
        self.max_steps = max_steps

    def reset(self, seed):
        rng = random.Random(seed)
        self.task_type = rng.choices(TASK_TYPES, TASK_MIX)[0]
        target_obj, distractor = rng.sample(OBJECTS, 2)
        self.obj = f"{target_obj} 1"
        obj_place, distractor_place = rng.sample(STORAGE, 2)
        self.target = rng.choice([p for p in TARGETS if p != obj_place])
        self.contents = {p: [] for p in PLACES}
        self.contents[obj_place].append(self.obj)
        self.contents[distractor_place].append(f"{distractor} 1")
        self.at, self.holding, self.transformed, self.won, self.t = None, None, False, False, 0
        if self.task_type == "pick":
            self.goal = f"put some {target_obj} in {self.target}."
        else:
            self.goal = f"put a {TRANSFORMS[self.task_type][2]} {target_obj} in {self.target}."
        obs = "You are in the middle of a room. Looking quickly around you, you see " + ", ".join(PLACES) + "."
        return obs, self._info()

    def admissible(self):
        """Every `go to` first, in a fixed order, so that its label keeps its meaning; then what applies here.
        (ALFWorld's look / inventory / examine are left out: in this fully described room they only dilute
        exploration for a model that starts from random weights.)"""
        cmds = [f"go to {p}" for p in PLACES]
        if self.at is not None and self.holding is None:
            cmds += [f"take {o} from {self.at}" for o in self.contents[self.at]]
        if self.at is not None and self.holding is not None:
            cmds.append(f"move {self.holding} to {self.at}")
            for appliance, verb, _ in TRANSFORMS.values():
                if self.at == appliance:
                    cmds.append(f"{verb} {self.holding} with {appliance}")
        return cmds

    def phase(self):
        """The hidden phase of the current state (analysis only)."""
        if self.holding != self.obj:
            return "take" if self.at is not None and self.obj in self.contents[self.at] else "find"
        if self.task_type != "pick" and not self.transformed:
            return "transform"
        return "place" if self.at == self.target else "carry"

    def _info(self):
        return {"goal": self.goal, "admissible": self.admissible(), "task_type": self.task_type,
                "won": self.won, "phase": self.phase()}

    def step(self, action):
        """Any text is accepted; a command that is not admissible changes nothing ("Nothing happens.")."""
        assert not self.won and self.t < self.max_steps, "step() after the episode ended; call reset()"
        self.t += 1
        action = action.strip().lower()
        obs = "Nothing happens."
        if action in self.admissible():
            verb, _, rest = action.partition(" ")
            if action.startswith("go to "):
                self.at = action[len("go to "):]
                seen = ", ".join(f"a {o}" for o in self.contents[self.at]) or "nothing"
                obs = f"You arrive at {self.at}. On the {self.at}, you see {seen}."
            elif verb == "take":
                self.holding = rest.split(" from ")[0]
                self.contents[self.at].remove(self.holding)
                obs = f"You pick up the {self.holding} from the {self.at}."
            elif verb == "move":
                obs = f"You move the {self.holding} to the {self.at}."
                self.contents[self.at].append(self.holding)
                self.won = (self.holding == self.obj and self.at == self.target
                            and (self.task_type == "pick" or self.transformed))
                self.holding = None
            else:  # clean / heat / cool
                self.transformed |= self.holding == self.obj and TRANSFORMS.get(self.task_type, ("",))[0] == self.at
                obs = f"You {verb} the {self.holding} using the {self.at}."
        truncated = not self.won and self.t >= self.max_steps
        return obs, WIN_REWARD * self.won, self.won, truncated, self._info()

    def solve(self):
        """Scripted solver: the next command of a shortest solution, read off the true state."""
        if self.holding is not None and self.holding != self.obj:
            return f"move {self.holding} to {self.at}"
        if self.holding is None:
            here = self.at is not None and self.obj in self.contents[self.at]
            where = next(p for p in PLACES if self.obj in self.contents[p])
            return f"take {self.obj} from {self.at}" if here else f"go to {where}"
        if self.task_type != "pick" and not self.transformed:
            appliance, verb, _ = TRANSFORMS[self.task_type]
            return f"{verb} {self.obj} with {appliance}" if self.at == appliance else f"go to {appliance}"
        return f"move {self.obj} to {self.target}" if self.at == self.target else f"go to {self.target}"


class ToyBatch:
    """N toy envs stepped in lockstep."""

    def __init__(self, n, max_steps=20):
        self.envs = [ToyEnv(max_steps) for _ in range(n)]
        self.max_steps = max_steps

    def reset(self, seeds):
        assert len(seeds) == len(self.envs), f"need {len(self.envs)} seeds, got {len(seeds)}"
        return [env.reset(s) for env, s in zip(self.envs, seeds)]

    def step(self, actions):
        return [None if a is None else env.step(a) for env, a in zip(self.envs, actions)]

    def close(self):
        pass


def make_env_batch(name, n, max_steps):
    if name == "toy":
        return ToyBatch(n, max_steps)
    raise ValueError(f"unknown env {name!r}; use --env toy")


# ---------------------------------------------------------------------------------------------------------
# Prompt and projection (paper: the prompt states the environment, the task, the step count, the last H
# observations and actions and the admissible actions; the answer is <think>..</think><action>..</action>).
# `label` format: small models answer with the number of an admissible action instead.
# ---------------------------------------------------------------------------------------------------------
ANSWER = {
    "tagged": "First reason step by step inside <think> </think>, then write exactly one admissible action "
              "inside <action> </action>.",
    "label": "Answer with the number of one admissible action.",
}


def listed_actions(admissible):
    """The actions shown to the model and numbered by their labels (ALFWorld's "help" is left out)."""
    return [a for a in admissible if a != "help"]


def build_prompt(goal, obs, history, admissible, step, max_steps, action_format):
    """history: list of (observation, action) pairs before the current observation, oldest first."""
    lines = ["You are an agent in a household text environment.", f"Your task is to: {goal}",
             f"This is step {step + 1} of at most {max_steps}."]
    if history:
        lines.append(f"Your last {len(history)} observations and actions:")
        for past_obs, past_act in history:
            lines += [f"Observation: {past_obs}", f"Action: {past_act}"]
    lines += [f"Current observation: {obs}", "Admissible actions:"]
    lines += [f"{i + 1}: {cmd}" for i, cmd in enumerate(listed_actions(admissible))]
    lines.append(ANSWER[action_format])
    return "\n".join(lines)


def parse_action(text, admissible):
    """Model text -> (command, valid). Accepted: `<think>...</think><action>CMD</action>` (the paper's form) or a
    bare label (the number of a listed action). CMD may itself be a label. Anything else is invalid: the
    command is returned as None and the caller applies the invalid-action penalty."""
    listed = listed_actions(admissible)
    text = text.strip()
    if "<action>" in text or "<think>" in text:
        think = re.search(r"<think>.*?</think>", text, re.S)
        act = re.search(r"<action>(.*?)</action>", text, re.S)
        if not (think and act):
            return None, False
        text = act.group(1).strip()
    if text.isdigit() and 1 <= int(text) <= len(listed):
        return listed[int(text) - 1], True
    cmd = " ".join(text.lower().split())
    return (cmd, True) if cmd in listed else (None, False)


def vocabulary(max_labels=60):
    """Every word the toy env and the prompt can produce: the vocabulary of the `tiny` model's tokenizer."""
    env, texts = ToyEnv(max_steps=100), list(ANSWER.values())
    for seed in range(100):  # solved episodes, probing a bad command at every state
        obs, info = env.reset(seed)
        while True:
            texts.append(build_prompt(info["goal"], obs, [(obs, "go to shelf 1")], info["admissible"], 0, 1, "tagged"))
            if env.won:
                break
            texts.append(env.step("nonsense")[0])
            obs, _, _, _, info = env.step(env.solve())
    words = {w for t in texts for w in re.findall(r"\w+|[^\w\s]", t)}
    return sorted(words | {str(i) for i in range(max_labels + 1)})
