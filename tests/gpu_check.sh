#!/bin/bash
# The real-GPU check: tests/test_gpu_real.py (nvidia-smi, a CUDA kernel,
# PyTorch) and tests/test_gpu.py, as root and as an unprivileged user, plus
# the CLI by hand, on a machine with an NVIDIA GPU and its driver.
#
# Usage: tests/gpu_check.sh [WHEELS_DIR] [LOG_DIR]
#   WHEELS_DIR (optional): heel's wheel and any dependency the machine lacks
#   (cffi, trio, outcome, sniffio, pytest-trio), installed with --no-index
#   into a private directory (tests/gpu_wheels.sh makes them); without it,
#   heel must be importable already.
#   LOG_DIR: where the log goes (default: the current directory).
#
# It runs the tests from a copy of tests/ outside the checkout, so that the
# installed heel (with its compiled module) is the one imported.
set -u
wheels=${1:-}
logdir=${2:-.}
log=$logdir/gpu-check.log
here=$(cd "$(dirname "$0")" && pwd)
python=$(command -v "${PYTHON:-python3}")
export PYTHONUNBUFFERED=1

say() { printf '\n===== %s\n' "$*"; }
{
say "machine"
uname -a
cat /sys/kernel/security/lsm 2>/dev/null; echo
"$python" --version; command -v "$python"
nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
ls -l /dev/nvidia* /dev/dri 2>&1 | head -20
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
cat /proc/sys/user/max_user_namespaces 2>/dev/null
cat /proc/sys/kernel/unprivileged_userns_clone 2>/dev/null

site=
if [ -n "$wheels" ]; then
    say "install"
    site=$(mktemp -d /tmp/heel-site.XXXXXX)
    chmod 755 "$site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl \
        || { echo "install failed"; exit 1; }
    export PYTHONPATH=$site
fi

cd /  # not the checkout: ./heel there has no compiled module
say "doctor"
"$python" -m heel doctor
for args in "" "--level strict" "--level permissive" "--no-allow-gpu"; do
    say "heel run $args -- nvidia-smi -L"
    # shellcheck disable=SC2086
    "$python" -m heel run $args -- "$(command -v nvidia-smi)" -L
    echo "exit status $?"
done

torch='import torch; print("cuda available:", torch.cuda.is_available())'
for args in "" "--pass-env LD_LIBRARY_PATH"; do
    say "heel run $args -- python -c 'import torch ...'"
    # shellcheck disable=SC2086
    "$python" -m heel run $args -- "$python" -c "$torch" 2>&1 | tail -3
done

work=$(mktemp -d /tmp/heel-gpu-tests.XXXXXX)
cp -r "$here" "$work/tests"
cp "$here/../pyproject.toml" "$work/"
rm -rf "$work/tests/__pycache__"
chmod -R a+rX "$work"
tests="tests/test_gpu_real.py tests/test_gpu.py"

say "pytest as $(id -un)"
(cd "$work" && timeout 300 "$python" -m pytest -p no:cacheprovider -rs -v $tests)
echo "pytest exit status $?"

if [ "$(id -u)" = 0 ]; then
    say "pytest as nobody"
    home=$(mktemp -d /tmp/heel-nobody.XXXXXX)
    chown 65534:65534 "$home"
    (cd "$work" && timeout 300 setpriv --reuid=65534 --regid=65534 --clear-groups \
        env -i HOME="$home" PATH="$PATH" LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}" PYTHONPATH="${PYTHONPATH:-}" \
        PYTHONUNBUFFERED=1 "$python" -m pytest -p no:cacheprovider -rs -v $tests)
    echo "pytest (nobody) exit status $?"
    rm -rf "$home"
fi
rm -rf "$work" ${site:+"$site"}
} 2>&1 | tee "$log"
