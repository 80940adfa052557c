#!/usr/bin/env bash
# Every GPU figure of docs/gpu.md in one command, for a machine lent for a few minutes at a time:
#
#   bash benchmarks/device.sh OUT_DIR [SECONDS]
#
# Parts run one after another, most wanted first, each alone on the device and cut off at the time left of
# SECONDS (default 540), so a short lease still returns what was measured. Each part's output goes to
# OUT_DIR/{part}.log and a line per part (exit status, seconds) to OUT_DIR/summary.txt:
#
#   speed_qmle_{walker,dog}  benchmarks/speed.py for qmle_dmc.py at N = 1 and 16 (JSON beside the log)
#   jobs                     benchmarks/learning.py run --jobs 4 on one GPU, JAX's preallocation left at its
#                            default, with the GPU's memory sampled every half second (jobs_memory.csv)
#   cache_{first,second}     time to the first update of dog-walk with an empty, then a filled XLA cache
#   speed_others             benchmarks/speed.py for Wolpertinger, qtopt_cem.py and aql_discrete.py
set -u
out=${1:?usage: bash benchmarks/device.sh OUT_DIR [SECONDS]}
budget=${2:-540}
repo=$(cd "$(dirname "$0")/.." && pwd)
scratch=$(mktemp -d)
mkdir -p "$out"
started=$(date +%s)

part() {  # name, most seconds, command...
    local name=$1 most=$2 left
    shift 2
    left=$((budget - ($(date +%s) - started)))
    ((left < most)) && most=$left
    if ((most < 15)); then
        echo "$name: not run, $left s left" | tee -a "$out/summary.txt"
        return
    fi
    local t0=$(date +%s)
    (cd "$scratch" && timeout -k 5 "$most" "$@") > "$out/$name.log" 2>&1
    echo "$name: exit $? after $(($(date +%s) - t0)) s (limit $most s)" | tee -a "$out/summary.txt"
}

nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" \
    > "$out/versions.txt" 2>&1

speed=(python3 "$repo/benchmarks/speed.py" --agents qmle_dmc --num-envs 1 16 --timesteps 4000 --repeats 10)
part speed_qmle_walker 130 "${speed[@]}" --env-ids walker-walk --output "$out/speed_qmle_walker.json"
part speed_qmle_dog 130 "${speed[@]}" --env-ids dog-walk --output "$out/speed_qmle_dog.json"

# learning.py itself turns preallocation off for --jobs > 1; the variable is removed here so that the
# measurement shows what the runner does, not what this machine's shell set.
nvidia-smi --query-gpu=timestamp,memory.used,memory.total --format=csv -lms 500 > "$out/jobs_memory.csv" 2>&1 &
sampler=$!
part jobs 90 env -u XLA_PYTHON_CLIENT_PREALLOCATE python3 "$repo/benchmarks/learning.py" run --env-ids walker-walk \
    --seeds 1 2 3 4 --total-timesteps 2000 --jobs 4 --runs-dir "$scratch/runs" --extra="--eval-frequency 0"
kill $sampler
tail -n 3 "$scratch"/runs/logs/*.log >> "$out/jobs.log" 2>&1

cache=(env JAX_COMPILATION_CACHE_DIR="$scratch/xla" python3 "$repo/qmle_dmc.py" --env-id dog-walk --total-timesteps 1100 --eval-frequency 0)
part cache_first 70 "${cache[@]}" --exp-name cache_first
part cache_second 50 "${cache[@]}" --exp-name cache_second

part speed_others 400 python3 "$repo/benchmarks/speed.py" --agents wolpertinger qtopt_cem aql_discrete \
    --env-ids dog-walk walker-walk --num-envs 1 16 --timesteps 4000 --repeats 10 --output "$out/speed_others.json"
rm -rf "$scratch"
