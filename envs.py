"""Text environments for PA-MoE: one small interface, a toy ALFWorld in miniature, real ALFWorld
(the `alfworld` package's text engine) with an offline mini game set, the prompt, where a generated
answer ends and the projection from model text to a command, and `tiny`, the toy's stand-in for a
pretrained LLM (built and warmed up here, frozen in pamoe.py).

Interface (every env, batched over N lanes stepped in lockstep):
    batch.reset(seeds)  -> list of (observation, info)
    batch.step(actions) -> list of (observation, reward, terminated, truncated, info), None for a
    lane
                           whose action is None (its episode already ended)
    batch.step_phase(info, command) -> the phase label of a step (analysis only, never training):
    toy, the hidden
                           phase of the state (find / take / transform / carry / place); alfworld,
                           the verb's phase
    batch.solve(n)      -> toy only: the scripted solver's next command in lane n (tiny's warm-up)
    info: goal, admissible (list of commands), task_type, won (toy: also phase; alfworld: also game)

Command line:
    python envs.py make-alfworld-mini DIR    the offline mini ALFWorld game set (then
    --alfworld_data DIR)
"""

import contextlib
import dataclasses
import itertools
import json
import os
import random
import re
import select
import subprocess
import sys

# --------------------------------------------------------------------------------------------------
# Toy env: ALFWorld in miniature. A room with places, one target object and one distractor. Tasks
# run through phases: find the object (search the storage places), take it, transform it at an
# appliance (clean / heat / cool), carry it to the target place, place it. The task mix is skewed
# towards plain pick-and-place so that simplicity bias can show. Commands follow ALFWorld 0.4.2
# syntax. Sized so that a randomly initialised 2-layer model can learn every task type on a CPU
# within the demo's budget (README, "The CPU demo"): two storage places, three appliances, and every
# observation while carrying ends with what is carried (ALFWorld's `inventory` answer), so that the
# current observation tells the state without the history. One departure from ALFWorld: putting the
# object at the target before it is transformed fails the task (the episode ends, lost); ALFWorld
# would let the agent take it back, but an agent that sees no history cannot know where it left the
# object, so the episode was lost anyway and spent its remaining steps on nothing.
# --------------------------------------------------------------------------------------------------
PLACES = ["countertop 1", "shelf 1", "sinkbasin 1", "microwave 1", "fridge 1"]
STORAGE = PLACES[:2]  # where objects start, and where they must go
OBJECTS = ["apple", "mug", "tomato", "potato"]
# task type -> (appliance, verb, adjective in the goal); pick needs no transform
TRANSFORMS = {
    "clean": ("sinkbasin 1", "clean", "clean"),
    "heat": ("microwave 1", "heat", "hot"),
    "cool": ("fridge 1", "cool", "cool"),
}
APPLIANCE_VERB = {appliance: verb for appliance, verb, _ in TRANSFORMS.values()}
TASK_TYPES = ["pick", "clean", "heat", "cool"]
TASK_MIX = [0.4, 0.2, 0.2, 0.2]  # pick stays the most frequent and the easiest
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
        self.target = distractor_place  # the other storage place
        self.contents = {p: [] for p in PLACES}
        self.contents[obj_place].append(self.obj)
        self.contents[distractor_place].append(f"{distractor} 1")
        self.at = None  # the place the agent is at
        self.holding = None
        self.transformed = False
        self.won = False
        self.failed = False
        self.t = 0
        if self.task_type == "pick":
            self.goal = f"put some {target_obj} in {self.target}."
        else:
            self.goal = f"put a {TRANSFORMS[self.task_type][2]} {target_obj} in {self.target}."
        obs = (
            "You are in the middle of a room. Looking quickly around you, you see "
            + ", ".join(PLACES)
            + "."
        )
        return obs, self._info()

    def admissible(self):
        """Every `go to` first, in a fixed order, so that its label keeps its meaning; then what
        applies here: take, move, or at an appliance the transform. (ALFWorld's look / inventory /
        examine are left out: in this fully described room they only dilute exploration for a model
        that starts from random weights.)"""
        cmds = [f"go to {p}" for p in PLACES]
        if self.at is not None and self.holding is None:
            cmds += [f"take {o} from {self.at}" for o in self.contents[self.at]]
        if self.at is not None and self.holding is not None:
            # at an appliance the held object can only be transformed (ALFWorld would also let it be
            # put inside: a dead end that only slows exploration here)
            cmds.append(
                f"{APPLIANCE_VERB[self.at]} {self.holding} with {self.at}"
                if self.at in APPLIANCE_VERB
                else f"move {self.holding} to {self.at}"
            )
        return cmds

    def phase(self):
        """The hidden phase of the current state (analysis only)."""
        if self.holding != self.obj:
            return "take" if self.at is not None and self.obj in self.contents[self.at] else "find"
        if self.task_type != "pick" and not self.transformed:
            return "transform"
        return "place" if self.at == self.target else "carry"

    def _info(self):
        return {
            "goal": self.goal,
            "admissible": self.admissible(),
            "task_type": self.task_type,
            "won": self.won,
            "phase": self.phase(),
        }

    def step(self, action):
        """Any text is accepted; a command that is not admissible changes nothing ("Nothing
        happens.")."""
        assert not (self.won or self.failed) and self.t < self.max_steps, (
            "step() after the episode ended; call reset()"
        )
        self.t += 1
        action = action.strip().lower()
        obs = "Nothing happens."
        if action in self.admissible():
            verb, _, rest = action.partition(" ")
            if action.startswith("go to "):
                self.at = action[len("go to ") :]
                seen = ", ".join(f"a {o}" for o in self.contents[self.at]) or "nothing"
                obs = f"You arrive at {self.at}. On the {self.at}, you see {seen}."
            elif verb == "take":
                self.holding = rest.split(" from ")[0]
                self.contents[self.at].remove(self.holding)
                obs = f"You pick up the {self.holding} from the {self.at}."
            elif verb == "move":
                obs = f"You move the {self.holding} to the {self.at}."
                self.contents[self.at].append(self.holding)
                placed = self.holding == self.obj and self.at == self.target
                self.won = placed and (self.task_type == "pick" or self.transformed)
                self.failed = placed and not self.won  # untransformed: the task fails
                self.holding = None
            else:  # clean / heat / cool
                self.transformed |= (
                    self.holding == self.obj and TRANSFORMS.get(self.task_type, ("",))[0] == self.at
                )
                obs = f"You {verb} the {self.holding} using the {self.at}."
        if self.holding is not None:
            hot = self.transformed and self.holding == self.obj
            adjective = TRANSFORMS[self.task_type][2] + " " if hot else ""
            obs += f" You are carrying: a {adjective}{self.holding}."
        truncated = not (self.won or self.failed) and self.t >= self.max_steps
        return obs, WIN_REWARD * self.won, self.won or self.failed, truncated, self._info()

    def solve(self):
        """Scripted solver: the next command of a shortest solution, read off the true state."""
        # put it down where that is possible
        if self.holding is not None and self.holding != self.obj:
            return (
                f"move {self.holding} to {self.at}" if self.at in STORAGE else f"go to {STORAGE[0]}"
            )
        if self.holding is None:
            here = self.at is not None and self.obj in self.contents[self.at]
            where = next(p for p in PLACES if self.obj in self.contents[p])
            return f"take {self.obj} from {self.at}" if here else f"go to {where}"
        if self.task_type != "pick" and not self.transformed:
            appliance, verb, _ = TRANSFORMS[self.task_type]
            return (
                f"{verb} {self.obj} with {appliance}"
                if self.at == appliance
                else f"go to {appliance}"
            )
        return (
            f"move {self.obj} to {self.target}"
            if self.at == self.target
            else f"go to {self.target}"
        )


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

    def step_phase(self, info, command):
        """Phase label of a step (analysis only): the phase of the state the agent acted in."""
        return info["phase"]

    def solve(self, n):
        """The scripted solver's next command in lane n (the `tiny` warm-up's prior; the toy
        only)."""
        return self.envs[n].solve()

    def close(self):
        pass


# --------------------------------------------------------------------------------------------------
# ALFWorld: the real `alfworld` package (0.4.2, text engine), one worker subprocess per lane.
# AlfredTWEnv finds and checks the games of a split; each worker plays the games it is given with
# the same TextWorld PDDL engine and wrappers that AlfredTWEnv.init_env uses. Own workers instead of
# init_env's gym batch because the seed must choose the game (fixed evaluation games, per-task-type
# tables) and a dead or hung game must be reported with its file and replaced, not take the run
# down.
# --------------------------------------------------------------------------------------------------
ALFWORLD_SPLITS = {
    "train": "train",
    "eval_in_distribution": "valid_seen",
    "eval_out_of_distribution": "valid_unseen",
}
ALFWORLD_TASKS = {
    "pick_and_place_simple": "Pick",
    "look_at_obj_in_light": "Look",
    "pick_clean_then_place_in_recep": "Clean",
    "pick_heat_then_place_in_recep": "Heat",
    "pick_cool_then_place_in_recep": "Cool",
    "pick_two_obj_and_place": "Pick2",
}
ALFWORLD_PHASES = {
    "go": "navigate",
    "take": "manipulate",
    "move": "manipulate",
    "put": "manipulate",
    "heat": "transform",
    "cool": "transform",
    "clean": "transform",
    "use": "transform",
    "slice": "transform",
    "look": "explore",
    "examine": "explore",
    "inventory": "explore",
    "open": "explore",
    "close": "explore",
}
STEP_TIMEOUT = 60.0  # seconds a worker may take for one reset or step before it counts as hung
ALFWORLD_FIXES = (
    "With internet: `ALFWORLD_DATA=DIR alfworld-download` (the official games, once). Offline: "
    "`python envs.py make-alfworld-mini DIR` (the project's small game set), then --alfworld_data "
    "DIR"
)


def alfworld_data_error(data, splits=("train",)):
    """None if `data` holds ALFWorld games of these splits (official or the mini set), else the
    message that names the fixes."""
    missing = [
        ALFWORLD_SPLITS[s]
        for s in splits
        if not os.path.isdir(os.path.join(data, "json_2.1.1", ALFWORLD_SPLITS[s]))
    ]
    if data and not missing:
        return None
    where = (
        f"no ALFWorld games under {data!r} (expected {data}/json_2.1.1/{missing[0]})"
        if data
        else "no ALFWorld data: pass --alfworld_data DIR or set ALFWORLD_DATA"
    )
    return f"{where}. {ALFWORLD_FIXES}"


def alfworld_games(data, split):
    """Game files of a split that AlfredTWEnv accepts (all six task types), in a fixed shuffled
    order."""
    # importing alfworld would create ~/.cache/alfworld otherwise
    os.environ["ALFWORLD_DATA"] = data
    import alfworld.info
    from alfworld.agents.environment.alfred_tw_env import AlfredTWEnv

    root = os.path.join(data, "json_2.1.1", ALFWORLD_SPLITS[split])
    config = {
        "env": {
            "goal_desc_human_anns_prob": 0.0,
            "regen_game_files": False,
            "task_types": [1, 2, 3, 4, 5, 6],
        },
        "logic": {
            "domain": alfworld.info.ALFRED_PDDL_PATH,
            "grammar": alfworld.info.ALFRED_TWL2_PATH,
        },
        "dataset": {
            "data_path": root,
            "eval_id_data_path": root,
            "eval_ood_data_path": root,
            "num_train_games": -1,
            "num_eval_games": -1,
        },
    }
    # it prints progress; stdout stays the training log
    with contextlib.redirect_stdout(sys.stderr):
        files = sorted(AlfredTWEnv(config, train_eval=split).game_files)
    if not files:
        raise SystemExit(f"envs.py: error: no playable games in {root}. {ALFWORLD_FIXES}")
    random.Random(0).shuffle(files)  # neighbouring seeds get mixed task types
    return files


class EnvWorkerError(RuntimeError):
    pass


class AlfworldWorker:
    """One `python envs.py alfworld-worker` subprocess, spoken to in JSON lines; started on first
    use."""

    def __init__(self, data):
        self.data, self.game, self.proc = data, None, None

    def send(self, request):
        """A reset (re)starts a dead worker; a step to a dead one is left for receive() to
        report."""
        if request["cmd"] == "reset" and (self.proc is None or self.proc.poll() is not None):
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "alfworld-worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=dict(os.environ, ALFWORLD_DATA=self.data),
            )
        if self.proc is None:
            return
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except OSError:  # a dead worker: receive() reports it
            pass

    def receive(self):
        if self.proc is None:
            raise EnvWorkerError(f"ALFWorld worker died earlier, on {self.game}")
        ready, _, _ = select.select([self.proc.stdout], [], [], STEP_TIMEOUT)
        line = self.proc.stdout.readline() if ready else ""
        # end of its output (or half a reply): it died; no output in time: it hangs
        if not line.endswith("\n"):
            try:
                why = f"died (exit code {self.proc.wait(timeout=5)})" if ready else "hung"
            except subprocess.TimeoutExpired:
                why = "closed its output"
            self.kill()
            raise EnvWorkerError(f"ALFWorld worker {why} on {self.game}")
        reply = json.loads(line)
        if "error" in reply:
            raise EnvWorkerError(f"ALFWorld failed on {self.game}: {reply['error']}")
        return reply

    def kill(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "close"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()


def alfworld_worker():
    """The worker's loop: reset to a game file or step it; reply with observation, admissible
    commands, won."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the engine prints goes to stderr, never into the protocol
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos

    request = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"])
    env = None
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "close":
            break
        try:
            if msg["cmd"] == "reset":
                if env is None:
                    env = textworld.start(
                        msg["game"],
                        request_infos=request,
                        wrappers=[AlfredDemangler(), AlfredInfos],
                    )
                else:
                    env.load(msg["game"])
                state = env.reset()
            else:
                state, _, _ = env.step(msg["action"])
            reply = {
                "obs": state.feedback,
                "admissible": list(state.admissible_commands),
                "won": bool(state.won),
            }
        except Exception as e:  # reported by the parent, with the game file
            reply = {"error": f"{type(e).__name__}: {e}"}
        proto.write(json.dumps(reply) + "\n")
        proto.flush()


class AlfworldBatch:
    """N ALFWorld games stepped in lockstep: lane n of reset(seeds) plays game seeds[n] mod (number
    of games) of the split. Reward 10 on the win; an episode ends on the win (terminated) or after
    max_steps (truncated). A worker that dies or hangs mid-episode is reported with its game file on
    stderr, its lane's episode ends there as truncated (info["error"]), and the worker is restarted
    on the next reset; a game that fails to reset twice raises EnvWorkerError."""

    def __init__(self, n, max_steps, data, split):
        self.files, self.max_steps = alfworld_games(data, split), max_steps
        self.workers = [AlfworldWorker(data) for _ in range(n)]
        self.t, self.goal, self.task_type = [0] * n, [""] * n, [""] * n

    def _info(self, n, reply):
        return {
            "goal": self.goal[n],
            "admissible": [c for c in reply["admissible"] if c != "help"],
            "task_type": self.task_type[n],
            "won": reply["won"],
            "game": self.workers[n].game,
        }

    def reset(self, seeds):
        assert len(seeds) == len(self.workers), f"need {len(self.workers)} seeds, got {len(seeds)}"
        for n, (w, s) in enumerate(zip(self.workers, seeds)):
            w.game, self.t[n] = self.files[s % len(self.files)], 0
            self.task_type[n] = ALFWORLD_TASKS[
                os.path.basename(os.path.dirname(os.path.dirname(w.game))).split("-")[0]
            ]
            w.send({"cmd": "reset", "game": w.game})
        out = []
        for n, w in enumerate(self.workers):
            try:
                reply = w.receive()
            except EnvWorkerError as e:  # one retry on a fresh worker, then give up loudly
                print(f"envs.py: {e}; retrying", file=sys.stderr)
                w.kill()
                w.send({"cmd": "reset", "game": w.game})
                try:
                    reply = w.receive()
                except EnvWorkerError:
                    # replies left unread would answer the wrong requests later
                    for other in self.workers:
                        other.kill()
                    raise
            intro, _, goal = reply["obs"].partition("Your task is to: ")
            self.goal[n] = goal.strip()
            # drop the "-= Welcome to TextWorld, ALFRED! =-" banner
            obs = intro.split("=-", 2)[-1].strip()
            out.append((obs, self._info(n, reply)))
        return out

    def step(self, actions):
        for w, a in zip(self.workers, actions):
            if a is not None:
                w.send({"cmd": "step", "action": a})
        out = []
        for n, (w, a) in enumerate(zip(self.workers, actions)):
            if a is None:
                out.append(None)
                continue
            self.t[n] += 1
            try:
                reply = w.receive()
            except EnvWorkerError as e:
                print(f"envs.py: {e}; its episode ends here (truncated)", file=sys.stderr)
                out.append(
                    (
                        "The game stopped responding.",
                        0.0,
                        False,
                        True,
                        {**self._info(n, {"admissible": [], "won": False}), "error": str(e)},
                    )
                )
                continue
            won = reply["won"]
            out.append(
                (
                    reply["obs"],
                    WIN_REWARD * won,
                    won,
                    not won and self.t[n] >= self.max_steps,
                    self._info(n, reply),
                )
            )
        return out

    def step_phase(self, info, command):
        """Phase label of a step (analysis only), from the verb of the command taken; None: invalid
        output."""
        return ALFWORLD_PHASES.get(command.split()[0], "other") if command else "invalid"

    def close(self):
        for w in self.workers:
            w.close()


# --------------------------------------------------------------------------------------------------
# The mini ALFWorld game set (offline): PDDL problems written here, in the official folder layout,
# played by the real engine. Rooms are lists of receptacle types (* = openable); every room has a
# sink basin, a microwave, a fridge and a desk lamp so that all six task types fit. Train and
# in-distribution games share rooms 0-2 with different placements; out-of-distribution games use
# room 3 only.
# --------------------------------------------------------------------------------------------------
MINI_ROOMS = [
    [
        "CounterTop",
        "CounterTop",
        "DiningTable",
        "Shelf",
        "Cabinet*",
        "Drawer*",
        "SideTable",
        "GarbageCan",
    ],
    ["Sofa", "CoffeeTable", "SideTable", "Shelf", "Drawer*", "Dresser", "CounterTop", "GarbageCan"],
    ["Bed", "Desk", "SideTable", "Dresser", "Drawer*", "Shelf", "CounterTop", "Cabinet*"],
    [
        "ArmChair",
        "CoffeeTable",
        "DiningTable",
        "Cabinet*",
        "CounterTop",
        "SideTable",
        "Desk",
        "Safe*",
    ],
]
MINI_APPLIANCES = ["SinkBasin", "Microwave*", "Fridge*"]
FOOD = ("clean", "heat", "cool")
MINI_OBJECTS = {  # object type -> what can be done to it besides taking it
    "Apple": FOOD,
    "Tomato": FOOD,
    "Potato": FOOD,
    "Egg": FOOD,
    "Mug": FOOD,
    "Cup": FOOD,
    "Bowl": FOOD,
    "Plate": FOOD,
    "Cloth": ("clean",),
    "SoapBar": ("clean",),
    "Book": (),
    "CellPhone": (),
    "KeyChain": (),
    "Pencil": (),
    "CD": (),
    "AlarmClock": (),
    "CreditCard": (),
    "Watch": (),
}
# task -> (verb, appliance type)
MINI_TRANSFORM = {
    "pick_clean_then_place_in_recep": ("clean", "SinkBasin"),
    "pick_heat_then_place_in_recep": ("heat", "Microwave"),
    "pick_cool_then_place_in_recep": ("cool", "Fridge"),
}
# rooms, games/type
MINI_SPLITS = {"train": ([0, 1, 2], 3), "valid_seen": ([0, 1, 2], 2), "valid_unseen": ([3], 2)}


def mangle(kind, i, j, suffix=""):
    """An ALFRED-style id: Type|+0i.00|+00.90|+0j.00, with | . + spelt out as the engine expects."""
    return f"{kind}_bar__plus_0{i}_dot_00_bar__plus_00_dot_90_bar__plus_0{j}_dot_{i}{j}" + suffix


def demangled_names(ids):
    """The names the engine shows (replicating alfworld's Demangler): per type, ids in sorted order
    are numbered from the count down to 1; a sink basin reads `sinkbasin`."""
    count, names = {}, {}
    kinds = {i: i.split("_bar_", 1)[0] + ("basin" if "basin" in i.lower() else "") for i in ids}
    for i in sorted(ids):
        count[kinds[i]] = count.get(kinds[i], 0) + 1
    left = {k: list(range(1, c + 1)) for k, c in count.items()}
    for i in sorted(ids):
        names[i] = f"{kinds[i].lower()} {left[kinds[i]].pop()}"
    return names


def mini_game(task, room, rng):
    """One game: (PDDL problem text, traj_data, solution commands)."""
    import alfworld.gen.goal_library as glib
    import alfworld.gen.constants as constants

    receps = [(r.rstrip("*"), r.endswith("*")) for r in MINI_ROOMS[room] + MINI_APPLIANCES]
    rids = [
        mangle("Sink", i, room, "_bar_SinkBasin") if k == "SinkBasin" else mangle(k, i, room)
        for i, (k, _) in enumerate(receps)
    ]
    openable = {rid for rid, (_, o) in zip(rids, receps) if o}
    surfaces = [
        rid for rid, (k, o) in zip(rids, receps) if not o and k not in ("SinkBasin", "GarbageCan")
    ]
    lamp_home = next(rid for rid, (k, _) in zip(rids, receps) if k in ("SideTable", "Desk"))
    verb, appliance = MINI_TRANSFORM.get(task, (None, None))
    otype = rng.choice([o for o, can in MINI_OBJECTS.items() if verb is None or verb in can])
    n_target = 2 if task == "pick_two_obj_and_place" else 1
    starts = rng.sample(
        [s for s in surfaces if s != lamp_home or task != "look_at_obj_in_light"], n_target + 1
    )
    goal_recep = starts[-1]  # the target receptacle holds none of the target objects at the start
    others = [o for o in MINI_OBJECTS if o != otype]
    objects = [(otype, starts[i]) for i in range(n_target)]
    # distractors
    objects += [(rng.choice(others), rng.choice(surfaces + sorted(openable))) for _ in range(3)]
    oids = [mangle(k, 10 + n, room) for n, (k, _) in enumerate(objects)]
    lamp = mangle("DeskLamp", 9, room)
    names = demangled_names(rids + oids + [lamp])
    rtype = dict(zip(rids, (k for k, _ in receps)))
    locs = {rid: f"loc_bar_{i}_bar_{room}_bar_1_bar_45" for i, rid in enumerate(rids)}
    init = ["(atLocation agent1 loc_bar_0_bar_0_bar_0_bar_30)"]
    for rid in rids:
        init += [
            f"(receptacleType {rid} {rtype[rid]}Type)",
            f"(receptacleAtLocation {rid} {locs[rid]})",
        ]
        init += [f"(openable {rid})"] if rid in openable else []
    for oid, (k, where) in zip(oids + [lamp], objects + [("DeskLamp", lamp_home)]):
        init += [
            f"(objectType {oid} {k}Type)",
            f"(inReceptacle {oid} {where})",
            f"(objectAtLocation {oid} {locs[where]})",
        ]
        init += [f"(pickupable {oid})"] if k != "DeskLamp" else [f"(toggleable {oid})"]
        init += [f"({v}able {oid})" for v in MINI_OBJECTS.get(k, ())]
    init += [
        f"(canContain {r}Type {o}Type)"
        for r in sorted(set(rtype.values()))
        for o in sorted({k for k, _ in objects})
    ]
    params = {
        "object_target": otype,
        "parent_target": "" if task == "look_at_obj_in_light" else rtype[goal_recep],
        "toggle_target": "DeskLamp" if task == "look_at_obj_in_light" else "",
        "mrecep_target": "",
        "object_sliced": False,
    }
    # the library's goal closes the (define ...) too; its variables are typed with '#'
    goal = glib.gdict[task]["pddl"].format(
        obj=otype, recep=params["parent_target"], toggle="DeskLamp", mrecep=""
    )
    # a name that is both (Bowl, Mug, ArmChair...) is a receptacle type only where this room uses it
    # as one
    kinds = {
        **{t: "rtype" for t in constants.RECEPTACLES},
        **{t: "otype" for t in constants.OBJECTS},
        **{t: "rtype" for t in rtype.values()},
    }
    problem = "\n".join(
        [
            "(define (problem plan_mini)",
            "(:domain alfred)",
            "(:objects",
            "agent1 - agent",
            *[f"{t}Type - {k}" for t, k in sorted(kinds.items())],
            *[f"{o} - object" for o in oids + [lamp]],
            *[f"{r} - receptacle" for r in rids],
            "loc_bar_0_bar_0_bar_0_bar_30 - location",
            *[f"{loc} - location" for loc in locs.values()],
            ")",
            "(:init",
            *init,
            ")",
            goal.replace("#", "-"),
        ]
    )
    traj = {
        "task_type": task,
        "task_id": f"trial_mini_{rng.randrange(10**6):06d}",
        "pddl_params": params,
        "turk_annotations": {"anns": []},
    }
    solution = []
    for oid, (_, start) in zip(oids[:n_target], objects):
        where, obj = names[start], names[oid]
        solution += [f"go to {where}", f"take {obj} from {where}"]
        if verb:
            app = names[next(r for r in rids if rtype[r] == appliance)]
            solution += [f"go to {app}", f"{verb} {obj} with {app}"]
        if task == "look_at_obj_in_light":
            solution += [f"go to {names[lamp_home]}", f"use {names[lamp]}"]
        else:
            solution += [f"go to {names[goal_recep]}", f"move {obj} to {names[goal_recep]}"]
    return problem, traj, solution


def make_alfworld_mini(root, seed=0):
    """Write the mini game set under
    root/json_2.1.1/<split>/<task>-<Obj>-None-<Recep>-<room>/<trial>/ with the files AlfredTWEnv
    reads (traj_data.json, initial_state.pddl, game.tw-pddl) plus solution.json (a winning command
    sequence, for tests)."""
    import alfworld.info
    from alfworld.agents.utils.misc import add_task_to_grammar

    domain, grammar = (
        open(alfworld.info.ALFRED_PDDL_PATH).read(),
        open(alfworld.info.ALFRED_TWL2_PATH).read(),
    )
    rng, count = random.Random(seed), 0
    for split, (rooms, per_type) in MINI_SPLITS.items():
        for task in ALFWORLD_TASKS:
            for g in range(per_type):
                room = rooms[g % len(rooms)]
                problem, traj, solution = mini_game(task, room, rng)
                p = traj["pddl_params"]
                folder = os.path.join(
                    root,
                    "json_2.1.1",
                    split,
                    f"{task}-{p['object_target']}-None-"
                    f"{p['parent_target'] or p['toggle_target']}-{room}{g}",
                    traj["task_id"],
                )
                os.makedirs(folder, exist_ok=True)
                files = {
                    "traj_data.json": json.dumps(traj, indent=1),
                    "initial_state.pddl": problem,
                    "game.tw-pddl": json.dumps(
                        {
                            "pddl_domain": domain,
                            "solvable": True,
                            "walkthrough": None,
                            "grammar": add_task_to_grammar(grammar, traj, rng=rng),
                            "pddl_problem": problem,
                        }
                    ),
                    "solution.json": json.dumps(solution),
                }
                for name, text in files.items():
                    with open(os.path.join(folder, name), "w") as f:
                        f.write(text)
                count += 1
    return count


ENVS = ("toy", "alfworld")
# evaluation table order
TASK_COLUMNS = {"toy": TASK_TYPES, "alfworld": list(ALFWORLD_TASKS.values())}


def make_env_batch(name, n, max_steps, split="train", data=None):
    """toy: every split draws from the same generator (training and evaluation seeds never meet);
    alfworld: the split's games under `data`."""
    if name == "toy":
        return ToyBatch(n, max_steps)
    if name == "alfworld":
        return AlfworldBatch(n, max_steps, data, split)
    raise ValueError(f"unknown env {name!r}; use one of {ENVS}")


# --------------------------------------------------------------------------------------------------
# Prompt and projection (paper: the prompt states the environment, the task, the step count, the
# last H observations and actions and the admissible actions; the answer is
# <think>..</think><action>..</action>). `label` format: small models answer with the number of an
# admissible action instead.
# --------------------------------------------------------------------------------------------------
ANSWER = {
    "tagged": (
        "First reason step by step inside <think> </think>, then write exactly one admissible "
        "action inside <action> </action>."
    ),
    "label": "Answer with a number.",
}


def listed_actions(admissible):
    """The actions shown to the model and numbered by their labels (ALFWorld's "help" is left
    out)."""
    return [a for a in admissible if a != "help"]


def build_prompt(goal, obs, history, admissible, step, max_steps, action_format):
    """history: list of (observation, action) pairs before the current observation, oldest first.
    `tagged`: the paper's prompt; `label` (a small model that answers with a number): the same
    content in fewer words, since prompt tokens are most of the CPU demo's compute."""
    paper = action_format == "tagged"
    lines = (
        [
            "You are an agent in a household text environment.",
            f"Your task is to: {goal}",
            f"This is step {step + 1} of at most {max_steps}.",
        ]
        if paper
        else [f"Task: {goal}", f"Step {step + 1} of {max_steps}."]
    )
    if history:
        lines.append(f"Your last {len(history)} observations and actions:")
        for past_obs, past_act in history:
            lines += [f"Observation: {past_obs}", f"Action: {past_act}"]
    lines += [f"{'Current observation' if paper else 'Observation'}: {obs}", "Admissible actions:"]
    lines += [f"{i + 1}: {cmd}" for i, cmd in enumerate(listed_actions(admissible))]
    lines.append(ANSWER[action_format])
    return "\n".join(lines)


def parse_action(text, admissible):
    """Model text -> (command, valid). Accepted: `<think>...</think><action>CMD</action>` (the
    paper's form) or a bare label (the number of a listed action). CMD may itself be a label.
    Anything else is invalid: the command is returned as None and the caller applies the
    invalid-action penalty."""
    listed = listed_actions(admissible)
    text = text.strip()
    if "<action>" in text or "<think>" in text:
        think = re.search(r"<think>.*?</think>", text, re.S)
        act = re.search(r"<action>(.*?)</action>", text, re.S)
        if not (think and act):
            return None, False
        text = act.group(1).strip()
    if text.isascii() and text.isdigit() and 1 <= int(text) <= len(listed):
        return listed[int(text) - 1], True
    cmd = " ".join(text.lower().split())
    return (cmd, True) if cmd in listed else (None, False)


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How a step's prompt is written: past steps shown, the step limit stated, the answer format,
    and the token limit the prompt must fit."""

    history: int = 0
    max_steps: int = 15
    action_format: str = "label"
    max_prompt_tokens: int = 2048


def fit_prompt(tok, prompt_format, info, obs, history, t):
    """The model's prompt of step t (in the tokenizer's chat template, if it has one) within
    prompt_format.max_prompt_tokens: the oldest history goes first; if even the prompt without
    history is too long, the tokenizer cuts its left end."""
    f = prompt_format
    for keep in range(min(f.history, len(history)), -1, -1):
        past = history[-keep:] if keep else []
        text = build_prompt(
            info["goal"], obs, past, info["admissible"], t, f.max_steps, f.action_format
        )
        if tok.chat_template:
            messages = [{"role": "user", "content": text}]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if keep == 0 or len(tok(text, add_special_tokens=False).input_ids) <= f.max_prompt_tokens:
            return text


def response_length(ids, tok, stop):
    """How many of a sequence's generated token ids (a list) were sampled: up to and including the
    first EOS, or the token that completes the text `stop` if that comes first (generate stops the
    sequence there; padding follows)."""
    n = ids.index(tok.eos_token_id) + 1 if tok.eos_token_id in ids else len(ids)
    pieces = tok.batch_decode([[i] for i in ids[:n]]) if stop else []  # the text of each token
    at = "".join(pieces).find(stop) if stop else -1
    ends = itertools.accumulate(map(len, pieces))  # where each token's text ends
    return n if at < 0 else next(i + 1 for i, end in enumerate(ends) if end >= at + len(stop))


# --------------------------------------------------------------------------------------------------
# `tiny`: the CPU demo's stand-in for a pretrained LLM (pamoe.py --model tiny). Built from a config,
# then warmed up before it is frozen on the toy's own text: the answer format and a weak prior of
# every task type, as an instruction-tuned LLM brings to ALFWorld (the paper's base wins some games
# by prompting alone).
# --------------------------------------------------------------------------------------------------
def build_tiny(vocab, seed):
    """A 2-layer Qwen2-architecture model with a word-level tokenizer built from `vocab`, random
    weights: no download anywhere."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    words = ["<pad>", "<unk>", "<eos>"] + vocab
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece()  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(words),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        initializer_range=0.1,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=2,
    )
    return Qwen2ForCausalLM(config), tok


def saved_tiny_tokenizer(folder):
    """`tiny`'s word-level tokenizer as saved in a model folder (an ablation's base, an export's
    base/), loaded as written; None for any other folder. transformers 5's AutoTokenizer rebuilds
    the tokenizer of every qwen2 config as byte-level BPE from the vocabulary alone, which cuts
    tiny's words into unknown pieces."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        if json.load(f).get("model", {}).get("type") != "WordLevel":
            return None
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(folder)


def pretrain_tiny(model, tok, env, seed, steps, prior, prompt_format, alfworld_data=None, batch=32):
    """Stand-in for pretraining, `tiny` only: `steps` supervised steps on the base before it is
    frozen, on the prompts of toy episodes played by a noisy solver (each step the scripted
    solver's command with probability q = prior, else a uniformly drawn admissible one). Loss:
    next-token prediction on the prompt (the text a pretrained model has read) + cross-entropy of
    the answer label to that same mixture, (1 - q) uniform + q one-hot (solver): the answer format
    and a weak prior of every task type, as an instruction-tuned LLM brings one (q = 0: the format
    only, no skill)."""
    import torch
    import torch.nn.functional as F

    if steps == 0:
        return
    rng = random.Random(seed)
    q = prior if env == "toy" else 0.0  # alfworld: no solver
    prompts, n_labels, solver = noisy_solver_prompts(
        env, q, rng, prompt_format, alfworld_data, batch
    )
    label_ids = [tok.convert_tokens_to_ids(str(i + 1)) for i in range(max(n_labels))]
    label_ids = torch.tensor(label_ids)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = [rng.randrange(len(prompts)) for _ in range(batch)]
        enc = tok(
            [prompts[i] for i in idx],
            padding=True,
            padding_side="right",
            return_tensors="pt",
            add_special_tokens=False,
        )
        hidden = model.base_model(**enc).last_hidden_state
        logits = model.get_output_embeddings()(hidden).float()  # (B, T, V)
        last = logits[torch.arange(batch), enc.attention_mask.sum(1) - 1]  # (B, V) after the prompt
        logp = F.log_softmax(last, -1)[:, label_ids]  # (B, n)
        n = torch.tensor([n_labels[i] for i in idx])[:, None]
        # (B, n): the mixture (1 - q) uniform + q solver
        target = (torch.arange(len(label_ids))[None] < n) * (1 - q) / n
        target[torch.arange(batch), [solver[i] for i in idx]] += q
        loss = -(target * logp).sum(1).mean()  # cross-entropy to the mixture
        # next-token prediction on the prompt text itself: what pretraining gives the base
        nxt = torch.where(enc.attention_mask[:, 1:].bool(), enc.input_ids[:, 1:], -100)
        loss = loss + F.cross_entropy(logits[:, :-1].flatten(0, 1), nxt.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def noisy_solver_prompts(env, q, rng, prompt_format, alfworld_data, batch):
    """The prompts of 4 x batch episodes played by the noisy solver (the solver's command with
    probability q, else a random admissible one), each with its number of listed actions and the
    solver's label (alfworld: no solver, the first action stands in)."""
    f = prompt_format
    env_batch = make_env_batch(env, batch, f.max_steps, "train", alfworld_data)
    prompts, n_labels, solver = [], [], []
    with contextlib.closing(env_batch):
        for ep in range(4):
            # negative seeds: toy episodes training never sees (alfworld: training games)
            obs_info = env_batch.reset([-(ep * batch + i) - 1 for i in range(batch)])
            history = [[] for _ in range(batch)]
            live = [True] * batch
            for t in range(f.max_steps):
                actions = [None] * batch
                for n, (obs, info) in enumerate(obs_info):
                    if not live[n]:
                        continue
                    listed = listed_actions(info["admissible"])
                    best = env_batch.solve(n) if q else listed[0]
                    past = history[n][-f.history :] if f.history else []
                    prompts.append(
                        build_prompt(
                            info["goal"],
                            obs,
                            past,
                            info["admissible"],
                            t,
                            f.max_steps,
                            f.action_format,
                        )
                    )
                    n_labels.append(len(listed))
                    solver.append(listed.index(best))
                    actions[n] = best if rng.random() < q else rng.choice(listed)
                    history[n].append((obs, actions[n]))
                for n, result in enumerate(env_batch.step(actions)):
                    if result is not None:
                        obs_info[n] = (result[0], result[4])
                        live[n] = not (result[2] or result[3])
    return prompts, n_labels, solver


# What ALFWorld's engine says, for the `tiny` model's word-level vocabulary (words outside it read
# as <unk>)
ALFWORLD_TEXT = """
You are in the middle of a room. Looking quickly around you, you see a cabinet 1, and a drawer 2.
You arrive at countertop 1. On the countertop 1, you see a apple 1, an egg 2, and nothing. The
fridge 1 is closed. You open the fridge 1. The fridge 1 is open. In it, you see a lettuce 1. You
close the drawer 1. Nothing happens. You pick up the apple 1 from the countertop 1. You move the
apple 1 to the shelf 1. You put the mug 1 in/on it. You heat the apple 1 using the microwave 1.
You cool the apple 1 using the fridge 1. You clean the apple 1 using the sinkbasin 1. You turn on
the desklamp 1. You turn off the floorlamp 1. You are carrying: a book 1. You are not carrying
anything. This is a normal book 1. There's nothing special about it. Your task is to: put some
apple on countertop. put a clean apple in fridge. put a hot apple in fridge. put a cool apple in
fridge. find two apple and put them in cabinet. look at book under the desklamp. examine the book
with the desklamp. go to take move put in on open close use heat cool clean slice examine
inventory look help with from to."""


def vocabulary(env="toy", max_labels=60):
    """Every word the toy env and the prompt can produce: the vocabulary of the `tiny` model's
    tokenizer. For
    alfworld: also the engine's sentences and every object and receptacle type alfworld knows."""
    if env == "alfworld":
        import alfworld.gen.constants as constants

        names = [
            n.lower()
            for n in [*constants.OBJECTS, *constants.RECEPTACLES, "SinkBasin", "BathtubBasin"]
        ]
        words = (
            set(vocabulary("toy", max_labels=200))
            | set(re.findall(r"\w+|[^\w\s]", ALFWORLD_TEXT))
            | set(names)
        )
        return sorted(words)
    env, texts = ToyEnv(max_steps=100), list(ANSWER.values())
    for seed in range(100):  # solved episodes, probing a bad command at every state
        obs, info = env.reset(seed)
        while True:
            texts += [
                build_prompt(
                    info["goal"], obs, [(obs, "go to shelf 1")], info["admissible"], 0, 1, f
                )
                for f in ANSWER
            ]
            if env.won:
                break
            texts.append(env.step("nonsense")[0])
            obs, _, _, _, info = env.step(env.solve())
    words = {w for t in texts for w in re.findall(r"\w+|[^\w\s]", t)}
    return sorted(words | {str(i) for i in range(max_labels + 1)})


if __name__ == "__main__":
    if sys.argv[1:2] == ["alfworld-worker"]:
        alfworld_worker()
    elif sys.argv[1:2] == ["make-alfworld-mini"] and len(sys.argv) == 3:
        n = make_alfworld_mini(sys.argv[2])
        print(
            f"wrote {n} games under {sys.argv[2]}/json_2.1.1; use --env alfworld --alfworld_data "
            f"{sys.argv[2]}"
        )
    else:
        sys.exit(
            "usage: python envs.py make-alfworld-mini DIR   (writes the offline mini ALFWorld game "
            "set)"
        )
