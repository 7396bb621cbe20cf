#!/usr/bin/env bash
# PA-MoE in one command.
#   bash run.sh            train. CUDA: ALFWorld + Qwen2.5-1.5B-Instruct (needs the official games: ALFWORLD_DATA);
#                          CPU: toy env + tiny model (README: how long it takes)
#   bash run.sh preflight  the same preset: one rollout step and one PPO micro-batch at the largest sizes, peak
#                          memory and time per token, then exit (a GPU user's first command, README)
#   bash run.sh alfworld   ALFWorld; on CPU: tiny model on the offline mini game set (made once, slow but complete)
#   bash run.sh test       the test suite
#   bash run.sh bench      cost of routed experts vs one LoRA -> bench.json (python bench.py --help)
#   bash run.sh ablation   routing ablation, 5 arms x 8 seeds on the toy env with intervals (README: its time)
#   bash run.sh --flag v   train with extra pamoe.py flags (they override the preset)
set -euo pipefail
cd "$(dirname "$0")"

# Use the active Python when it already has what requirements.txt needs (a GPU user keeps their own torch);
# otherwise install the pinned requirements into .venv once (again when requirements.txt changes).
if python3 - <<'PY' 2>/dev/null
import importlib.metadata as md
need = {"torch": (2, 4), "transformers": (4, 51), "numpy": (1, 24), "tqdm": (4, 60), "pytest": (7, 0),
        "alfworld": (0, 4)}
for name, low in need.items():
    assert tuple(int(x) for x in md.version(name).split("+")[0].split(".")[:2]) >= low, name
PY
then
  PY=python3
else
  PY=.venv/bin/python
  stamp=.venv/.requirements.txt
  if [ ! -x "$PY" ] || ! cmp -s requirements.txt "$stamp"; then
    echo "run.sh: installing requirements.txt into .venv" >&2
    python3 -m venv .venv
    "$PY" -m pip install --quiet --disable-pip-version-check -r requirements.txt
    cp requirements.txt "$stamp"
    echo "run.sh: installed into .venv; for README's python and torchrun commands: source .venv/bin/activate" >&2
  fi
fi

# glibc keeps freed memory for the next tensor instead of mapping and zeroing fresh pages for each large one:
# fewer page faults, the same numbers
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-33554432}"
export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-1073741824}"

case "${1:-}" in
  test) shift; exec "$PY" -m pytest -q test_pamoe.py "$@" ;;
  bench) shift; exec "$PY" bench.py "$@" ;;
  ablation) shift; exec "$PY" bench.py ablation "$@" ;;
esac

job=default
case "${1:-}" in alfworld|preflight) job=$1; shift ;; esac
if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  # one GPU: the paper's ALFWorld setting scaled to one GPU (see README, "Reproducing the paper on one GPU").
  # Memory: fits a 24 GB card by README's memory table (derived); on 40 GB add --grad_ckpt false --micro_batch 4,
  # on 80 GB --grad_ckpt false (faster: no replayed forward)
  preset=(--env alfworld --model Qwen/Qwen2.5-1.5B-Instruct --action_format tagged --max_new_tokens 512 --history 2
          --max_steps 50 --num_envs 32 --iterations 150 --eval_every 10 --eval_episodes 128 --minibatch 8
          --micro_batch 8 --grad_ckpt true --epochs 1 --clip 0.2 --clip_c 3 --rank 32 --router_hidden 256 --router_layers 3
          --ent_coef 0.001 --lr_experts 1e-6 --lr_router 1e-4 --lr_critic 1e-5 --anneal_lr false --out_dir runs/pamoe-gpu)
elif [ "$job" = "alfworld" ]; then
  # CPU: the whole ALFWorld path with the tiny model on the project's offline mini game set
  export ALFWORLD_DATA="${ALFWORLD_DATA:-runs/alfworld-mini}"
  if [ ! -d "$ALFWORLD_DATA/json_2.1.1" ]; then "$PY" envs.py make-alfworld-mini "$ALFWORLD_DATA"; fi
  preset=(--env alfworld --model tiny --tiny_steps 150 --history 2 --max_steps 50 --num_envs 8
          --iterations 5 --eval_every 5 --eval_episodes 12 --out_dir runs/pamoe-alfworld)
else
  preset=(--model tiny --out_dir runs/pamoe)
fi
if [ "$job" = "preflight" ]; then exec "$PY" bench.py preflight "${preset[@]}" "$@"; fi
exec "$PY" pamoe.py "${preset[@]}" "$@"
