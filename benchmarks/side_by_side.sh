#!/usr/bin/env bash
# Run one benchmark command on another commit and on the working tree, alternating, in one
# invocation, so that both see the same machine state (what a change's "no slower" claim needs).
#
#   benchmarks/side_by_side.sh REV ROUNDS COMMAND...
#
# COMMAND runs from the root of each tree with PYTHONPATH set to it, so each tree's benchmark
# script imports its own gtopk_hvd (the .venv of the working tree serves both). REV is checked
# out in a temporary git worktree that is removed at the end. Example (4 ranks on this host):
#   benchmarks/side_by_side.sh HEAD~3 2 env OMP_NUM_THREADS=1 .venv/bin/horovodrun -np 4 \
#       -H localhost:4 .venv/bin/python benchmarks/bench_layer_rounds.py
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ $# -ge 3 ] || { echo "usage: $0 REV ROUNDS COMMAND..." >&2; exit 2; }
rev=$1 rounds=$2
shift 2
base=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$base" >/dev/null 2>&1 || rm -rf "$base"' EXIT
git -C "$root" worktree add -q --detach "$base" "$rev"
ln -s "$root/.venv" "$base/.venv"
for round in $(seq 1 "$rounds"); do
  for tree in "$base" "$root"; do
    label=$([ "$tree" = "$root" ] && echo "working tree" || echo "$rev ($(git -C "$root" rev-parse --short "$rev"))")
    echo "=== round $round: $label"
    (cd "$tree" && PYTHONPATH="$tree" "$@")
  done
done
