#!/usr/bin/env bash
# The GPU checks of lightning-gan, sized for a short lease of one GPU (docs/results.md holds what they
# measured).
#
#   bash benchmarks/gpu_session.sh prepare             # here: MNIST into .device-data/, wheels into .device-wheels/
#   bash benchmarks/gpu_session.sh check               # on the GPU: CUDA tests, the throughput table, Parzen (~4 min)
#   bash benchmarks/gpu_session.sh reproduce CONFIG MINUTES [FLAGS...]   # on the GPU: Parzen curve of one config
#       (PRECISION=high before it: with TF32 matmuls)
#   bash benchmarks/gpu_session.sh profile             # on the GPU: kernels per update, replays with and without TF32
#
# `prepare` needs pip with access to PyPI and MNIST's four IDX files (LIGHTNING_GAN_DATA_ROOT, default
# data, the package's download folder). The GPU machine needs a python3 with pip, torch, lightning, torchvision, torchmetrics, scipy,
# h5py, rich and pytest; the wheels bring what LightningCLI needs besides (jsonargparse and its signature helpers).
# Results are written under $OUT (default benchmarks/results).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
WHEELS=(jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0)

use_wheels() {
    if compgen -G ".device-wheels/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .device-wheels/*.whl
        export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
    fi
    export PYTHONPATH="$PWD:${PYTHONPATH:-}" WANDB_MODE=disabled PYTHONUNBUFFERED=1
    mkdir -p "$OUT"
}

case "${1:-}" in
prepare)
    raw="${LIGHTNING_GAN_DATA_ROOT:-data}/MNIST/raw"
    mkdir -p .device-data/MNIST/raw .device-wheels
    install -m 644 "$raw"/*-ubyte .device-data/MNIST/raw/
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .device-wheels "${WHEELS[@]}"
    ls -l .device-data/MNIST/raw .device-wheels
    ;;
check)
    use_wheels
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu_check.txt"
    python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" \
        | tee -a "$OUT/gpu_check.txt"
    # the CUDA tests only (the others pass on CPUs); a failure is reported whole in pytest_cuda.log, and the
    # throughput is measured all the same
    (LIGHTNING_GAN_DATA_ROOT=.device-data python3 -m pytest -q -p no:cacheprovider -k "on_a_gpu or cuda_matches" \
        tests/test_graphed.py tests/test_compiling.py tests/test_averaging.py tests/test_stacked_steps.py tests/test_parzen.py \
        >"$OUT/pytest_cuda.log" 2>&1 || true)
    tail -15 "$OUT/pytest_cuda.log" | tee -a "$OUT/gpu_check.txt"
    python3 benchmarks/throughput.py --device cuda --steps 1000 --warmup 100 --repeats 2 --data-dir .device-data \
        2>&1 | grep --line-buffered -v "^\(GPU\|TPU\|Seed\|💡\|LOCAL_RANK\|\`Trainer\)" | tee "$OUT/throughput_cuda.md"
    # the Parzen protocol on the GPU, against the bare matrix-product floor of the same run
    python3 benchmarks/parzen.py --device cuda --mnist-root .device-data 2>&1 | tee "$OUT/parzen_cuda.md"
    ;;
profile)
    use_wheels
    python3 benchmarks/update_profile.py --data-dir .device-data 2>&1 \
        | grep --line-buffered -v "^\(GPU\|TPU\|Seed\|💡\|LOCAL_RANK\|\`Trainer\)" | tee "$OUT/update_profile.txt"
    ;;
reproduce)
    [[ $# -ge 3 ]] || { sed -n '2,14p' "$0"; exit 2; }
    use_wheels
    config="$2" minutes="$3"
    shift 3
    name="$(basename "$config" .yaml)_$(date +%H%M%S)"
    python3 benchmarks/reproduce_mnist.py --config "$config" --data-dir .device-data --minutes "$minutes" \
        --eval-every 20 --out "$OUT" --name "$name" ${PRECISION:+--matmul-precision "$PRECISION"} -- "$@" 2>&1 | grep --line-buffered -v "^\(GPU\|TPU\|Seed\|💡\|LOCAL_RANK\)"
    ;;
*)
    sed -n '2,14p' "$0"
    exit 2
    ;;
esac
