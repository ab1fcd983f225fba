#!/usr/bin/env bash
# Make SimGrid's Python bindings importable from .venv: Debian's python3-simgrid (3.32; PyPI's
# simgrid is a source package that compiles for a long time).  Needs root for apt-get once;
# then links the one extension module into .venv (a .pth file pointing at a folder holding
# only it, so nothing else of the system's site-packages leaks into the venv).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
venv="$root/.venv"
[ -x "$venv/bin/python" ] || { echo "run 'make env' first" >&2; exit 1; }
so=$(ls /usr/lib/python3/dist-packages/simgrid.cpython-*.so 2>/dev/null | head -n1 || true)
if [ -z "$so" ]; then
  echo "==> installing python3-simgrid (apt-get)" >&2
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-simgrid >&2
  else
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-simgrid >&2
  fi
  so=$(ls /usr/lib/python3/dist-packages/simgrid.cpython-*.so | head -n1)
fi
link_dir="$venv/simgrid-link"
mkdir -p "$link_dir"
ln -sf "$so" "$link_dir/$(basename "$so")"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$link_dir" > "$site/simgrid_link.pth"
"$venv/bin/python" -c "import simgrid" 2>/dev/null \
  || { echo "simgrid does not import in .venv (the .so is for $(basename "$so"))" >&2; exit 1; }
echo "==> SimGrid importable from $venv" >&2
