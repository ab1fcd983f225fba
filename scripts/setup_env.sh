#!/usr/bin/env bash
# Create (or reuse) .venv at the repository root with pinned torch, TensorFlow, a Horovod
# built from source, and gtopk_hvd in editable mode.  Idempotent: a second run takes seconds.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
VENV="$root/.venv"
PYTHON=${PYTHON:-python3}
HOROVOD_VERSION=0.28.1
TORCH_VERSION=2.13.0
TF_VERSION=2.21.0
TF_KERAS_VERSION=2.21.0

step() { echo "==> setup: $*" >&2; }
fail() { echo "setup failed at step '$1'. Hint: $2" >&2; exit 1; }

# Everything that decides the environment's content goes into the stamp.
stamp_src=$(cat requirements.txt scripts/setup_env.sh scripts/build_horovod.sh setup.py | sha256sum | cut -c1-16)
if [ -f "$VENV/.gtopk_stamp" ] && [ "$(cat "$VENV/.gtopk_stamp")" = "$stamp_src" ] \
   && "$VENV/bin/python" -c "import horovod.torch, horovod.tensorflow, gtopk_hvd" 2>/dev/null; then
  step "reusing $VENV"
  exit 0
fi

"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>/dev/null \
  || fail "python" "these pins are for Python 3.11; set PYTHON=/path/to/python3.11"
if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV"
  "$PYTHON" -m venv "$VENV" || fail "venv" "install the venv module (Debian: apt-get install -y python3-venv)"
fi
PIP=(pip_quiet)
# pip's find-links / extra-index settings on some machines print one warning per package.
pip_quiet() {
  "$VENV/bin/python" -m pip --disable-pip-version-check "$@" \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}

# pip byte-compiles what it installs on one core; here every install skips that and
# compile_all compiles site-packages on every core (about 30 s less on 2 cores).  Files that
# do not compile (Python 2 examples inside some packages) are skipped, as pip skips them.
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
compile_all() { "$VENV/bin/python" -m compileall -q -j 0 "$SITE" >/dev/null 2>&1 || true; }

step "installing pinned dependencies (torch $TORCH_VERSION CPU, tensorflow-cpu $TF_VERSION)"
# torch first and alone, so that nothing later can pull a CUDA build.
"${PIP[@]}" install -q --no-compile "torch==$TORCH_VERSION" \
  || fail "torch" "torch==$TORCH_VERSION (CPU) must be reachable through pip (find-links or the registry)"
compile_all
"$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda is None else 1)" \
  || fail "torch" "a CUDA build of torch got installed; remove .venv and re-run"
"${PIP[@]}" install -q --no-compile -r requirements.txt setuptools wheel \
  || fail "dependencies" "is the package registry reachable? (pip install -r requirements.txt)"
# tf-keras declares `tensorflow`; we have tensorflow-cpu, so install it without deps.
"${PIP[@]}" install -q --no-compile --no-deps "tf-keras==$TF_KERAS_VERSION" \
  || fail "tf-keras" "pip install --no-deps tf-keras"

# bump HOROVOD_PATCH whenever scripts/build_horovod.sh patches the source differently
HOROVOD_PATCH=6
key="horovod-$HOROVOD_VERSION-p$HOROVOD_PATCH-torch$TORCH_VERSION-tf$TF_VERSION-py$("$VENV/bin/python" -c 'import sys; print("%d%d" % sys.version_info[:2])')"
cache=${GTOPK_HVD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gtopk_hvd}/wheels/$key
if [ "$(cat "$VENV/.horovod_key" 2>/dev/null)" != "$key" ] \
   || ! "$VENV/bin/python" -c "import horovod, sys; sys.exit(0 if horovod.__version__ == '$HOROVOD_VERSION' else 1)" 2>/dev/null; then
  step "Horovod $HOROVOD_VERSION wheel (cache: $cache)"
  wheel=$(HOROVOD_VERSION=$HOROVOD_VERSION scripts/build_horovod.sh "$VENV/bin/python" "$cache" | tail -n1) \
    || fail "horovod build" "see the compiler output above; needs gcc/g++ and cmake 3.x"
  "${PIP[@]}" install -q --no-compile --no-deps --force-reinstall "$wheel" \
    || fail "horovod install" "remove $cache and re-run"
  echo "$key" > "$VENV/.horovod_key"
fi
compile_all  # what was installed since torch (already compiled files are skipped)

step "verifying Horovod frameworks"
# horovodrun --check-build can claim a framework that does not load: initialise each for real.
if ! check_out=$(TF_USE_LEGACY_KERAS=1 TF_CPP_MIN_LOG_LEVEL=3 "$VENV/bin/python" - 2>&1 <<'PY'
import horovod.torch as h
h.init()
import horovod.tensorflow as t
t.init()
import horovod.tensorflow.keras  # noqa: F401  (the tf-keras layer)
PY
); then
  echo "$check_out" | tail -n 30 >&2
  fail "horovod check" "Horovod does not load; remove the cached wheel ($cache) and .venv, then re-run"
fi

step "installing gtopk_hvd (editable)"
"${PIP[@]}" install -q --no-deps --no-build-isolation -e . || fail "gtopk_hvd" "pip install -e . failed"
echo "$stamp_src" > "$VENV/.gtopk_stamp"
step "ready: $VENV"
