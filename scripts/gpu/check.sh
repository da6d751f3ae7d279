#!/usr/bin/env bash
# GPU check of issue #7 (FlashInfer over the pruned cell store), one command on a CUDA machine:
#
#   bash scripts/gpu/check.sh [all|test|bench]      # default: all
#
# 1. installs the carried wheels (.whl/, from scripts/gpu/fetch_wheels.sh) into /tmp/kvzap-gpu-site unless
#    flashinfer already imports;
# 2. test:  pytest tests/core/test_flashinfer_attention.py on CUDA — real FlashInfer kernels vs attention.attend in
#    bf16 (relative error per scenario and path, plan/run microseconds), plus the CPU tests of the plan arguments;
# 3. bench: scripts/gpu/bench_decode.py — decode tokens/s pruned vs dense (table on stdout, JSON in $OUT).
#
# Logs and JSON go to $OUT (the device tool's return folder) or /tmp/kvzap-gpu-check. BENCH_ARGS adds arguments to
# the benchmark (e.g. BENCH_ARGS="--batches 1 8 --contexts 2048 8192"). The first FlashInfer call JIT-compiles
# its kernels with nvcc (minutes; cached in ~/.cache/flashinfer while the machine stays up).
set -euo pipefail
cd "$(dirname "$0")/../.."
stage=${1:-all}
case "$stage" in all|test|bench) ;; *) echo "usage: $0 [all|test|bench]" >&2; exit 2 ;; esac
out=${OUT:-/tmp/kvzap-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if ! python3 -c "import flashinfer" 2>/dev/null; then
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "check.sh: flashinfer is not installed and .whl/ holds no wheels: run scripts/gpu/fetch_wheels.sh" \
             "where PyPI is reachable and carry .whl (scripts/gpu/README.md)" >&2
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/kvzap-gpu-site .whl/*.whl
    export PYTHONPATH=/tmp/kvzap-gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# FlashInfer's JIT uses CUDA_HOME, else dirname(dirname(`which nvcc`)) (flashinfer/jit/cpp_ext.py get_cuda_path),
# and links every module with -L$CUDA_HOME/lib64 -L$CUDA_HOME/lib64/stubs -lcudart -lcuda. Pin CUDA_HOME to the
# toolkit nvcc really runs from, and check that link in seconds instead of after the first compile.
if [[ -z ${CUDA_HOME:-} ]] && command -v nvcc >/dev/null; then
    top=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
    if [[ -n $top ]]; then CUDA_HOME=$(cd "$top" && pwd -P); export CUDA_HOME; fi
fi
echo "CUDA_HOME=${CUDA_HOME:-unset} nvcc=$(command -v nvcc || echo MISSING) ninja=$(command -v ninja || echo MISSING)"
if ! command -v ninja >/dev/null; then   # FlashInfer runs "ninja" from PATH; the pip package keeps it in ninja.BIN_DIR
    ninja_dir=$(python3 -c "import ninja; print(ninja.BIN_DIR)" 2>/dev/null) && export PATH=$ninja_dir:$PATH
fi
# shellcheck disable=SC2086
link_check() {
    echo 'int main(){return 0;}' | ${CXX:-c++} -x c++ - -o /tmp/kvzap-linkcheck \
        -L"${CUDA_HOME:-/usr/local/cuda}/lib64" -L"${CUDA_HOME:-/usr/local/cuda}/lib64/stubs" \
        ${FLASHINFER_EXTRA_LDFLAGS:-} -lcudart -lcuda  # unquoted on purpose: a list of flags
}
if ! link_check 2>/tmp/kvzap-linkcheck.err; then
    # e.g. no lib64/stubs/libcuda.so, or a pip toolkit with lib/libcudart.so.13 only: offer unversioned links
    mkdir -p /tmp/kvzap-cudalib
    cudart=
    for f in "${CUDA_HOME:-/usr/local/cuda}"/lib*/libcudart.so*; do [[ -e $f ]] && cudart=$f && break; done
    libcuda=$(ldconfig -p | awk '/libcuda\.so\.1 /{print $NF; exit}')
    [[ -n $cudart ]] && ln -sf "$cudart" /tmp/kvzap-cudalib/libcudart.so
    [[ -n $libcuda ]] && ln -sf "$libcuda" /tmp/kvzap-cudalib/libcuda.so
    export FLASHINFER_EXTRA_LDFLAGS="-L/tmp/kvzap-cudalib ${FLASHINFER_EXTRA_LDFLAGS:-}"
    if ! link_check 2>>/tmp/kvzap-linkcheck.err; then
        echo "check.sh: cannot link -lcudart -lcuda as FlashInfer's JIT will:" >&2
        cat /tmp/kvzap-linkcheck.err >&2
        exit 2
    fi
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: not available"
python3 - <<'PY'
import sys, torch, flashinfer
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"flashinfer {flashinfer.__version__}, "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE (no CUDA device seen by torch)'}")
PY
status=0
if [[ $stage == all || $stage == test ]]; then
    echo "== equivalence: FlashInfer vs attend on CUDA ($(date +%T))"
    timeout "${TEST_TIMEOUT:-240}" \
        python3 -m pytest tests/core/test_flashinfer_attention.py -q -s -rs -p no:cacheprovider 2>&1 \
        | tee "$out/equivalence.log" || status=1
    if grep -qi "SKIPPED.*CUDA device" "$out/equivalence.log"; then
        echo "check.sh: the CUDA test was skipped: no GPU seen by torch" >&2
        status=1
    fi
fi
if [[ $stage == all || $stage == bench ]]; then
    echo "== decode benchmark ($(date +%T))"
    # shellcheck disable=SC2086
    timeout "${BENCH_TIMEOUT:-150}" \
        python3 scripts/gpu/bench_decode.py --json "$out/bench_decode.json" ${BENCH_ARGS:-} 2>&1 \
        | tee "$out/bench_decode.log" || status=1
fi
echo "== done ($(date +%T)), status $status; files in $out"
exit $status
