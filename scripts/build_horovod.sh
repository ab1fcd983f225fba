#!/usr/bin/env bash
# Build a Horovod wheel from its source distribution, patched for torch 2.13 / TF 2.21,
# and cache it.  Usage: scripts/build_horovod.sh PYTHON WHEEL_DIR
# Prints the path of the wheel on its last line.  Re-running with a cached wheel is a no-op.
set -euo pipefail
PY=${1:?usage: build_horovod.sh PYTHON WHEEL_DIR}
WHEEL_DIR=${2:?usage: build_horovod.sh PYTHON WHEEL_DIR}
HOROVOD_VERSION=${HOROVOD_VERSION:-0.28.1}

existing=$(ls "$WHEEL_DIR"/horovod-"$HOROVOD_VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [ -n "$existing" ]; then
  echo "$existing"
  exit 0
fi

die() { echo "build_horovod: $*" >&2; exit 1; }
command -v gcc >/dev/null && command -v g++ >/dev/null \
  || die "no C/C++ compiler: install one (Debian: apt-get install -y build-essential)"
# pip's cmake 4.x breaks Horovod's CMakeLists; a system cmake 3.x works.
CMAKE=${HOROVOD_CMAKE:-/usr/bin/cmake}
[ -x "$CMAKE" ] || CMAKE=$(command -v cmake || true)
[ -n "$CMAKE" ] || die "no cmake: install cmake 3.x (Debian: apt-get install -y cmake) or set HOROVOD_CMAKE"
case "$("$CMAKE" --version | head -n1)" in
  *" 3."*) ;;
  *) die "$CMAKE is not cmake 3.x ($("$CMAKE" --version | head -n1)); Horovod 0.28.1 needs 3.x: set HOROVOD_CMAKE" ;;
esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "build_horovod: fetching the horovod==$HOROVOD_VERSION source distribution" >&2
"$PY" -m pip download -q --no-deps --no-binary :all: -d "$work" "horovod==$HOROVOD_VERSION" >&2 \
  || die "could not download horovod==$HOROVOD_VERSION from the package registry (is it reachable?)"
tar xzf "$work"/horovod-"$HOROVOD_VERSION".tar.gz -C "$work"
src="$work/horovod-$HOROVOD_VERSION"

echo "build_horovod: patching for torch 2.13 / TF 2.21 / tf-keras" >&2
# torch 2.13 headers need C++17, and gloo must use the same standard as the rest.
sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
  "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
# The XLA ops are GPU-only and do not compile against TF 2.21 headers (highwayhash).
sed -i 's/^#if TENSORFLOW_VERSION >= 2006000000$/#if TENSORFLOW_VERSION >= 2006000000 \&\& HAVE_GPU/' \
  "$src/horovod/tensorflow/xla_mpi_ops.cc"
# Under TF 2.21 `keras` is Keras 3; Horovod's Keras layer works with tf.keras (tf-keras).
sed -i 's/^    from keras import backend as K$/    from tensorflow.keras import backend as K/' \
  "$src/horovod/tensorflow/keras/__init__.py" "$src/horovod/tensorflow/keras/callbacks.py"
# A dead peer must not abort the survivors: with process sets besides the global one, the
# shutdown negotiates their removal over the global Gloo context, which throws gloo::IoException
# outside any handler (std::terminate).  Catch it and finalize the remaining sets locally, so
# pending operations fail with HorovodInternalError, as without process sets.
"$PY" - "$src/horovod/common/process_set.cc" <<'PATCH' || die "patch failed: process_set.cc"
import sys
path = sys.argv[1]
src = open(path).read()
old = """  for (auto id : ids_copy) {
    if (id == 0) {"""
tail = """        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    }
  }
"""
new_head = """  try {
  if (gtopk_hvd_loop_failed) {
    // gtopk_hvd patch: the background loop died of a peer's failure.  Reset every connection
    // of every set (a survivor blocked in a receive from this rank wakes with an error now,
    // not after HOROVOD_GLOO_TIMEOUT_SECONDS), and do not negotiate over the global context.
#if HAVE_GLOO
    for (auto id : ids_copy) {
      auto& gc = id_to_process_set_[id].gloo_context;
      for (auto* c : {&gc.ctx, &gc.global_ctx, &gc.local_ctx, &gc.cross_ctx}) {
        if (*c) (*c)->closeConnections();
      }
    }
#endif
    throw std::runtime_error("the background loop failed");
  }
  for (auto id : ids_copy) {
    if (id == 0) {"""
new_tail = tail + """  } catch (const std::exception& ex) {
    // gtopk_hvd patch: a peer is gone; finalize every remaining set here.
    LOG(ERROR) << "Finalizing process sets without negotiation: " << ex.what();
    for (auto other : std::vector<int32_t>(ids_.begin(), ids_.end())) {
      if (other != 0) {
        id_to_process_set_[other].Finalize(status);
        DeregisterProcessSet(other);
      }
    }
    id_to_be_removed_ = NO_PENDING_REMOVAL;
  }
"""
ns = "namespace horovod {\nnamespace common {\n"
flag = ns + "\n// gtopk_hvd patch: set by the background loop when it ends on an exception\nbool gtopk_hvd_loop_failed = false;\n"
assert src.count(old) == 1 and src.count(tail) == 1 and src.count(ns) == 1, \
    "process_set.cc changed: update the patch"
src = src.replace(old, new_head).replace(tail, new_tail).replace(ns, flag)
open(path, "w").write(src)
PATCH
# operations.cc only records that the background loop ended on an exception
# (gtopk_hvd_loop_failed); process_set.cc (above) then closes every Gloo connection instead of
# negotiating.  Without it, after a peer died, a survivor's old connections stayed open and
# another survivor blocked in a receive from it waited out HOROVOD_GLOO_TIMEOUT_SECONDS while
# the rest were already re-initialising under Elastic (their rendezvous has the same bound).
"$PY" - "$src/horovod/common/operations.cc" <<'PATCH' || die "patch failed: operations.cc"
import sys
path = sys.argv[1]
src = open(path).read()
ns = "namespace horovod {\nnamespace common {\n"
loop = "  // Iterate until shutdown.\n  try {\n"
caught = """        << "Horovod background loop uncaught exception: " << ex.what();\n"""
assert src.count(ns) == 1 and src.count(loop) == 1 and src.count(caught) == 1, \
    "operations.cc changed: update the patch"
src = src.replace(ns, ns + "\nextern bool gtopk_hvd_loop_failed;  // gtopk_hvd patch (process_set.cc)\n")
src = src.replace(loop, "  // Iterate until shutdown.\n  gtopk_hvd_loop_failed = false;  // gtopk_hvd patch\n  try {\n")
src = src.replace(caught, caught + "    gtopk_hvd_loop_failed = true;  // gtopk_hvd patch\n")
open(path, "w").write(src)
PATCH
# Finalizing a process set (a shutdown, Elastic's reset after a dead peer, a removed set) calls
# each pending operation's callback and then drops its tensors while the background thread holds
# the process-set table's mutex.  Dropping the last reference to a PyTorch tensor whose Python
# object the C++ side keeps alive takes the GIL; a Python thread holding the GIL and starting an
# operation waits for that mutex (ProcessSetTable::Contains): a deadlock, seen once in ~20 Elastic
# kill tests.  Keep the finalized entries aside and drop them once the mutex is released.
"$PY" - "$src/horovod/common/tensor_queue.cc" "$src/horovod/common/operations.cc" <<'PATCH' || die "patch failed: tensor_queue.cc"
import sys
queue, ops = sys.argv[1], sys.argv[2]
src = open(queue).read()
ns = "namespace horovod {\nnamespace common {\n"
old = """    e.second.FinishWithCallback(status);
  }
  tensor_table_.clear();
"""
new = """    e.second.FinishWithCallback(status);
  }
  {
    // gtopk_hvd patch: released later, without the process-set table's mutex
    std::lock_guard<std::mutex> g(gtopk_hvd_finalized_mutex);
    for (auto& e : tensor_table_) {
      gtopk_hvd_finalized.push_back(std::move(e.second));
    }
  }
  tensor_table_.clear();
"""
helper = ns + """
// gtopk_hvd patch: entries of finalized tensor queues, released by
// gtopk_hvd_release_finalized_entries() where no lock is held (their tensors may need the GIL).
static std::mutex gtopk_hvd_finalized_mutex;
static std::vector<TensorTableEntry> gtopk_hvd_finalized;
void gtopk_hvd_release_finalized_entries() {
  std::vector<TensorTableEntry> released;
  {
    std::lock_guard<std::mutex> g(gtopk_hvd_finalized_mutex);
    released.swap(gtopk_hvd_finalized);
  }
}
"""
assert src.count(ns) == 1 and src.count(old) == 1, "tensor_queue.cc changed: update the patch"
src = src.replace(ns, helper).replace(old, new)
if "#include <vector>" not in src:
    src = src.replace('#include "tensor_queue.h"\n', '#include "tensor_queue.h"\n\n#include <vector>\n')
open(queue, "w").write(src)

src = open(ops).read()
shutdown = "#if HAVE_GPU\n  gpu_context.Finalize();\n#endif\n"
loop = "  bool should_shutdown = false;\n  for (auto process_set_id"
assert src.count(ns) == 1 and src.count(shutdown) == 1 and src.count(loop) == 1, \
    "operations.cc changed: update the patch"
src = src.replace(ns, ns + "\nvoid gtopk_hvd_release_finalized_entries();  // gtopk_hvd patch (tensor_queue.cc)\n")
src = src.replace(shutdown, "  gtopk_hvd_release_finalized_entries();  // gtopk_hvd patch: no lock held here\n\n" + shutdown)
src = src.replace(loop, "  gtopk_hvd_release_finalized_entries();  // gtopk_hvd patch: sets removed above\n" + loop)
open(ops, "w").write(src)
PATCH
# After the background loop failed (a dead peer), the shutdown deregisters every process set
# but the global one; an operation enqueued on one of them in that window (a gradient hook
# starting its next exchange) failed with ValueError ("Process set provided does not exist"),
# which Elastic does not recover from, instead of HorovodInternalError.  Check shut_down first.
"$PY" - "$src/horovod/common/operations.cc" <<'PATCH' || die "patch failed: operations.cc (shut_down first)"
import re, sys
path = sys.argv[1]
src = open(path).read()
check = re.compile(r'(  if \(!horovod_global\.process_set_table\.Contains\(process_set_id\)\) \{\n'
                   r'    return Status::InvalidArgument\(\s*"\w+: Process set provided)')
src, n = check.subn(lambda m: "  if (horovod_global.shut_down) {  // gtopk_hvd patch: shut_down first\n"
                    "    return SHUT_DOWN_ERROR;\n  }\n" + m.group(1), src)
assert n == 5, f"operations.cc changed: {n} enqueue checks found, 5 expected: update the patch"
open(path, "w").write(src)
PATCH
# A process set whose members sit at different local ranks on different hosts (2 hosts of 3
# ranks: gTop-k's set (0, 1, 4, 5) at P = 6) hung Horovod's init for HOROVOD_GLOO_TIMEOUT_SECONDS,
# then failed: the set's cross-host Gloo context took its members from the ranks with this
# process's global local rank but named its rendezvous after the local rank inside the set, so
# rank 4 (local rank 1) waited in "cross_0" for a partner that joined "cross_1".  Name it after
# the global local rank, which is what chooses the members.
"$PY" - "$src/horovod/common/gloo/gloo_context.cc" <<'PATCH' || die "patch failed: gloo_context.cc"
import sys
path = sys.argv[1]
src = open(path).read()
old = """    cross_ctx = Rendezvous(HOROVOD_GLOO_CROSS_PREFIX +
                               std::to_string(local_rank) + process_set_suffix,"""
new = """    // gtopk_hvd patch: the members share this process's global local rank: name it so
    cross_ctx = Rendezvous(HOROVOD_GLOO_CROSS_PREFIX +
                               std::to_string(global_context.local_ctx->rank) +
                               process_set_suffix,"""
assert src.count(old) == 1, "gloo_context.cc changed: update the patch"
open(path, "w").write(src.replace(old, new))
PATCH
# horovodrun checks which frameworks Horovod was built with by importing each extension in a
# forked child that is meant to be silent but mutes Python's sys.stderr only: importing
# TensorFlow there printed its C++ start-up banners (oneDNN, cpu_feature_guard) into every
# launch, PyTorch jobs included.  Mute the child's file descriptors 1 and 2 as well.
"$PY" - "$src/horovod/common/util.py" <<'PATCH' || die "patch failed: util.py"
import sys
path = sys.argv[1]
src = open(path).read()
old = """            sys.stderr = open(os.devnull, 'w')
"""
new = old + """            # gtopk_hvd patch: mute C++ output too (TensorFlow's start-up banners)
            _null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(_null, 1)
            os.dup2(_null, 2)
"""
assert src.count(old) == 1, "horovod/common/util.py changed: update the patch"
open(path, "w").write(src.replace(old, new))
PATCH
grep -q 'gtopk_hvd patch: mute C++ output' "$src/horovod/common/util.py" || die "patch failed: util.py"
grep -q 'gtopk_hvd patch: a peer is gone' "$src/horovod/common/process_set.cc" \
  || die "patch failed: process_set.cc"
grep -q 'gtopk_hvd_loop_failed = true' "$src/horovod/common/operations.cc" \
  || die "patch failed: operations.cc"
grep -q 'gtopk_hvd patch: released later' "$src/horovod/common/tensor_queue.cc" \
  || die "patch failed: tensor_queue.cc"
grep -q 'gtopk_hvd_release_finalized_entries();  // gtopk_hvd patch: no lock' "$src/horovod/common/operations.cc" \
  || die "patch failed: operations.cc (finalized entries)"
[ "$(grep -c 'gtopk_hvd patch: shut_down first' "$src/horovod/common/operations.cc")" = 5 ] \
  || die "patch failed: operations.cc (shut_down first)"
grep -q 'gtopk_hvd patch: the members share' "$src/horovod/common/gloo/gloo_context.cc" \
  || die "patch failed: gloo_context.cc"
grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt" || die "patch failed: torch CMakeLists"
grep -q '&& HAVE_GPU' "$src/horovod/tensorflow/xla_mpi_ops.cc" || die "patch failed: xla_mpi_ops.cc"
grep -q 'from tensorflow.keras import backend' "$src/horovod/tensorflow/keras/callbacks.py" \
  || die "patch failed: keras callbacks"

mpi=0
if [ "${HOROVOD_WITH_MPI:-}" = 1 ] || { [ -z "${HOROVOD_WITHOUT_MPI:-}" ] && command -v mpicxx >/dev/null; }; then mpi=1; fi
echo "build_horovod: compiling (torch + tensorflow, gloo$([ $mpi = 1 ] && echo ' + mpi'); a few minutes)" >&2
export HOROVOD_CMAKE="$CMAKE" HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 \
  HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS=${MAKEFLAGS:--j$(nproc)}
if [ $mpi = 1 ]; then export HOROVOD_WITH_MPI=1; else export HOROVOD_WITHOUT_MPI=1; fi
mkdir -p "$WHEEL_DIR"
( cd "$src" && "$PY" -m pip wheel -v --no-deps --no-build-isolation -w "$work/out" . ) >"$work/build.log" 2>&1 || {
  tail -n 60 "$work/build.log" >&2
  cp "$work/build.log" "$WHEEL_DIR/last-failed-build.log" 2>/dev/null || true
  die "compiling Horovod failed (log above, full log in $WHEEL_DIR/last-failed-build.log)"
}
cp "$work"/out/horovod-*.whl "$WHEEL_DIR"/
ls "$WHEEL_DIR"/horovod-"$HOROVOD_VERSION"-*.whl | head -n1
