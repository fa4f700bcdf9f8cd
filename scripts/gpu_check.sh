#!/usr/bin/env bash
# The first command to run on a CUDA machine: about 8 minutes, one results folder, a summary.
#
#   bash scripts/gpu_check.sh [RESULTS_DIR]        # default: outputs/gpu_check/<date-time>
#
# 1. tests:  python -m pytest -m gpu (kernels against the brute-force reference in fp16/bf16 for
#            every variant, the one-MUFU sigmoid at b = −log 16384, KV cache, dropout, softcap,
#            torch.compile, flash-attn's backend if installed, bf16/fp16 training, no host syncs)
# 2. bench:  scripts/bench_attention.py at seq 1k/4k/16k, head dim 64/128, causal and full,
#            forward/backward TFLOPS of flash_sigmoid vs SDPA-flash and flash-attn (if installed)
# 3. vit, lm: 200-step bf16 runs of vit_flash_sigmoid and lm_flash_sigmoid
# Each part runs even if an earlier one failed; the exit status counts the failed parts.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: needs a CUDA device (torch.cuda.is_available() is False); on CPU run: python -m pytest -q" >&2
    exit 2
fi
out="${1:-outputs/gpu_check/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
export WANDB_MODE=disabled HF_HUB_OFFLINE=1
failed=()

part() {  # part NAME TIMEOUT_S COMMAND...: run, log to $out/NAME.log, report
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "== $name: $*"
    if timeout "$limit" "$@" >"$out/$name.log" 2>&1; then
        echo "   ok ($((SECONDS - start)) s)"
    else
        echo "   FAILED, exit $? ($((SECONDS - start)) s): see $out/$name.log"
        failed+=("$name")
    fi
    tail -n 4 "$out/$name.log" | sed 's/^/   | /'
}

part tests 240 python -m pytest -m gpu -q -p no:cacheprovider --junitxml="$out/tests.xml"
part bench 150 python scripts/bench_attention.py --device cuda --seqs 1024 4096 16384 --head-dims 64 128 \
    --out "$out/bench_attention"
for task in vit lm; do
    part "$task" 90 python -m attention_simulator.train "+experiment=${task}_flash_sigmoid" trainer.device=cuda \
        trainer.precision=bf16 trainer.max_steps=200 logger.wandb=false "hydra.run.dir=$out/${task}_flash_sigmoid"
done

echo
echo "results: $out"
if ((${#failed[@]})); then
    echo "failed: ${failed[*]}"
else
    echo "all parts passed"
fi
exit "${#failed[@]}"
