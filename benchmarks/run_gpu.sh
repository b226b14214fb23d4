#!/usr/bin/env bash
# Every benchmark on a CUDA GPU, one process at a time; JSON and logs under OUT. `make bench-gpu` runs it.
#
#   bash benchmarks/run_gpu.sh [OUT] [STEP ...]
#
# OUT: the first argument, else $OUT, else benchmarks/out. STEP (default: all, in this order):
#   core            bench_core.py: mixprec's recipes against torch.autocast, eager and compiled
#   fp8             = fp8-quantize fp8-linear fp8-gpt (bench_fp8.py; compile caches warmed in parallel first)
#   optim           bench_optim.py: the AdamW step against torch, bitsandbytes and torchao; GPT memory
#   train           = train-eager train-compiled (bench_train.py: the trainer against a bare loop)
#   <area>          any other benchmarks/bench_<area>.py, run as `bench_<area>.py --json OUT/<area>.json`
# Each step writes OUT/<step>.json and OUT/<step>.log; OUT/env.json records the device, driver,
# software versions, commit and date; OUT/gpu_clocks.csv the GPU's clocks, power and throttle reasons
# every 250 ms (these benchmarks run the GPU at its power cap, which moves timings; see
# results/fp8.md). Peers (torchao, bitsandbytes) are installed from the wheels in .whl/ when present;
# without them their rows say why they are missing. Every step runs even if one before it failed; the
# exit status is 0 only when every step exited 0. STEP_TIMEOUT (seconds, default 3600) bounds each step,
# BUDGET_S (seconds) the whole run (a GPU held for a fixed time). Python: $PYTHON, else python3. The commit
# recorded: $BENCH_COMMIT when set (a copy of the tree whose .git is absent or stale), else git's, else "unknown".
set -u -o pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-${OUT:-$root/benchmarks/out}}
shift $(( $# > 0 ? 1 : 0 ))
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 1
cd "$root"
py=${PYTHON:-python3}
work=$(mktemp -d)                         # trainer run directories, installed peers
trap 'kill "${smi_pid:-}" 2>/dev/null; rm -rf "$work"' EXIT
log="$out/run.log"
step_timeout=${STEP_TIMEOUT:-3600}        # seconds per step: a hung compile fails its step, not the run
budget=${BUDGET_S:-0}                     # seconds for all steps (0: no limit): a step that would start
                                          # with under a minute left is skipped, the others are cut to fit

say() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$log"; }

# ---- environment --------------------------------------------------------------------------------
if compgen -G ".whl/*/*.whl" > /dev/null || compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" \
      $(find .whl -name '*.whl') >> "$log" 2>&1 || say "peer wheels from .whl/ did not install (see run.log)"
fi
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}:$work/site" PYTHONUNBUFFERED=1
if [[ -n ${BENCH_COMMIT:-} ]]; then
  commit=$BENCH_COMMIT
else
  commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]] && commit="$commit (uncommitted changes)"
fi
"$py" - "$out/env.json" "$commit" <<'EOF' 2>&1 | tee -a "$log"
import importlib, json, subprocess, sys, time
import torch
env = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": sys.argv[2], "python": sys.version.split()[0],
       "torch": torch.__version__, "cuda": torch.version.cuda,
       "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
try:
    env["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm",
         "--format=csv,noheader"],
        capture_output=True, text=True, timeout=30).stdout.strip()
except (OSError, subprocess.SubprocessError) as err:
    env["nvidia_smi"] = f"not run: {err}"
for name in ("triton", "torchao", "bitsandbytes"):
    try:
        env[name] = importlib.import_module(name).__version__
    except Exception as err:  # a peer that is missing or broken is recorded, not fatal
        env[name] = f"not available: {type(err).__name__}"
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env))
EOF
"$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
  || { say "no CUDA GPU visible to $py: these benchmarks need one"; exit 1; }
has_torchao=$("$py" -c 'import torchao' 2>/dev/null && echo 1 || echo 0)
gpu_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active \
    --format=csv -lms 250 > "$out/gpu_clocks.csv" 2>/dev/null &
smi_pid=$!

# ---- steps --------------------------------------------------------------------------------------
failed=()
run() {   # run NAME CMD...: CMD's output to OUT/NAME.log, its exit status checked
  local name=$1; shift
  local limit=$step_timeout
  if (( budget > 0 )); then
    local left=$(( budget - SECONDS ))
    if (( left < 60 )); then
      failed+=("$name (skipped: ${left}s of BUDGET_S left)")
      say "$name skipped: ${left}s of BUDGET_S left"
      return
    fi
    (( left < limit )) && limit=$left
  fi
  say "$name: $*"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    failed+=("$name (exit $rc)")
    say "$name FAILED, exit $rc; last lines of $name.log:"
    tail -n 15 "$out/$name.log" | tee -a "$log"
  else
    say "$name done"
  fi
}

fp8_linear_variants=bf16:eager,mixprec-tensorwise:eager,mixprec-rowwise:eager,mixprec-blockwise:eager
fp8_linear_variants+=,bf16:compiled,mixprec-tensorwise:compiled,mixprec-rowwise:compiled,mixprec-blockwise:compiled
fp8_linear_variants+=,mixprec-tensorwise@cublas:compiled
fp8_gpt_variants=(bf16 mixprec-tensorwise mixprec-rowwise mixprec-blockwise)
if [[ $has_torchao == 1 ]]; then
  fp8_linear_variants+=,torchao-tensorwise:compiled,torchao-rowwise:compiled
  fp8_gpt_variants+=(torchao-tensorwise torchao-rowwise)
fi
# all GPT variants resident at once take about 14 GiB each: on a GPU under 130 GiB each FP8 variant
# gets its own process beside its BF16 anchor, timed in the same interleaved rounds
gpt_together=$([[ ${gpu_mib:-0} -ge 130000 ]] && echo 1 || echo 0)

warm_fp8() {   # fill inductor's and Triton's on-disk caches in parallel; nothing is timed
  say "fp8: compile caches warming in parallel"
  local pids=() layers=1 v
  [[ $gpt_together == 1 ]] && layers=4    # the same graph as the timed run where it fits beside the others
  "$py" benchmarks/bench_fp8.py linear --warm-only --variants "$fp8_linear_variants" > "$out/fp8-warm-linear.log" 2>&1 &
  pids+=($!)
  for v in "${fp8_gpt_variants[@]}"; do
    "$py" benchmarks/bench_fp8.py gpt --warm-only --variants "$v" --layers "$layers" > "$out/fp8-warm-gpt-$v.log" 2>&1 &
    pids+=($!)
  done
  for v in "${pids[@]}"; do wait "$v" || say "a warm-up process exited $? (its timed step will show why)"; done
}

run_step() {
  case $1 in
    core) run core "$py" benchmarks/bench_core.py --device cuda --compile --json "$out/core.json" ;;
    fp8) run_step fp8-quantize; warm_fp8; run_step fp8-linear; run_step fp8-gpt ;;
    fp8-quantize) run fp8-quantize "$py" benchmarks/bench_fp8.py quantize --json "$out/fp8-quantize.json" ;;
    fp8-linear) run fp8-linear "$py" benchmarks/bench_fp8.py linear --variants "$fp8_linear_variants" --rounds 5 \
                    --json "$out/fp8-linear.json" ;;
    fp8-gpt)
      if [[ $gpt_together == 1 ]]; then
        local joined; joined=$(IFS=,; echo "${fp8_gpt_variants[*]}")
        run fp8-gpt "$py" benchmarks/bench_fp8.py gpt --variants "$joined" --rounds 5 --json "$out/fp8-gpt.json"
      else
        local v
        for v in "${fp8_gpt_variants[@]:1}"; do
          run "fp8-gpt-$v" "$py" benchmarks/bench_fp8.py gpt --variants "bf16,$v" --rounds 5 \
              --json "$out/fp8-gpt-$v.json"
        done
      fi ;;
    optim) run optim "$py" benchmarks/bench_optim.py --device cuda --json "$out/optim.json" ;;
    train) run_step train-eager; run_step train-compiled ;;
    train-eager) run train-eager "$py" benchmarks/bench_train.py --step-trace --out "$work/train" \
                     --json "$out/train-eager.json" ;;
    train-compiled) run train-compiled "$py" benchmarks/bench_train.py --compile --repeats 4 \
                        --out "$work/train-compiled" --json "$out/train-compiled.json" ;;
    *)
      if [[ -f benchmarks/bench_$1.py ]]; then
        run "$1" "$py" "benchmarks/bench_$1.py" --json "$out/$1.json"
      else
        failed+=("$1 (no such step)")
        say "no step '$1': choose core, fp8, fp8-quantize, fp8-linear, fp8-gpt, optim, train, train-eager," \
            "train-compiled or the <area> of a benchmarks/bench_<area>.py"
      fi ;;
  esac
}

steps=("$@")
if [[ ${#steps[@]} -eq 0 ]]; then
  steps=(core fp8 optim train)
  for f in benchmarks/bench_*.py; do       # benchmarks added beside the four
    area=$(basename "$f" .py); area=${area#bench_}
    [[ " core fp8 optim train " == *" $area "* ]] || steps+=("$area")
  done
fi
say "steps: ${steps[*]}; output: $out"
for s in "${steps[@]}"; do run_step "$s"; done

if [[ ${#failed[@]} -gt 0 ]]; then
  say "failed: ${failed[*]}"
  exit 1
fi
say "all steps passed"
