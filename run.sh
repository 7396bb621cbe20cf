#!/usr/bin/env bash
# PA-MoE in one command.
#   bash run.sh            train: CPU -> toy env + tiny model (~10 min, 2 cores); CUDA -> toy env + Qwen2.5-1.5B
#   bash run.sh test       the test suite
#   bash run.sh --flag v   train with extra pamoe.py flags (they override the preset)
set -euo pipefail
cd "$(dirname "$0")"

# Use the active Python when it already has what requirements.txt needs (a GPU user keeps their own torch);
# otherwise install the pinned requirements into .venv once (again when requirements.txt changes).
if python3 - <<'PY' 2>/dev/null
import importlib.metadata as md
need = {"torch": (2, 4), "transformers": (4, 51), "numpy": (1, 24), "tqdm": (4, 60), "pytest": (7, 0)}
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
  fi
fi

if [ "${1:-}" = "test" ]; then
  shift
  exec "$PY" -m pytest -q test_pamoe.py "$@"
fi

if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  # one GPU: a real model, the paper's answer format and learning rates (unverified on the toy env, see README)
  preset=(--model Qwen/Qwen2.5-1.5B-Instruct --action_format tagged --max_new_tokens 512 --num_envs 32
          --lr_experts 1e-6 --lr_router 1e-4 --lr_critic 1e-4 --out_dir runs/pamoe-gpu)
else
  preset=(--model tiny --out_dir runs/pamoe)
fi
exec "$PY" pamoe.py "${preset[@]}" "$@"
