#!/usr/bin/env bash
# Debian packages turnflow uses: graphviz (render SVG/PNG/HTML), espeak-ng (TTS bridge), sox (audio tools),
# a C++ compiler (building llama-server), python3-venv, postgresql (the tests' shared conversation store: they
# start a throw-away server from its binaries). Installs only what is missing.
set -euo pipefail

need=()
command -v dot >/dev/null 2>&1 || need+=(graphviz)
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
command -v sox >/dev/null 2>&1 || need+=(sox)
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v make >/dev/null 2>&1 || need+=(make)
python3 -c "import ensurepip, venv" >/dev/null 2>&1 || need+=(python3-venv)
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1 || need+=(postgresql)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "turnflow: please install: ${need[*]} (no apt-get here)" >&2
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  sudo=""
elif command -v sudo >/dev/null 2>&1; then
  sudo="sudo"
else
  echo "turnflow: not root and no sudo; please install: ${need[*]}" >&2
  exit 0
fi
echo "turnflow: installing Debian packages: ${need[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
