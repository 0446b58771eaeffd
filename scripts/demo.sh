#!/usr/bin/env bash
# The main job on the embedded defaults: validate the example recipe, render its turn DAG, then hold a
# short two-persona conversation in one room, printing each turn's summary (tokens processed vs cached,
# invariant prefix hash, slot, composition cache hits). The embedded server is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
tf=".venv/bin/turnflow"
recipe="recipes/voice-chat.yaml"
room="demo-$(date +%Y%m%d-%H%M%S)"
out="build/demo"
mkdir -p "$out"
trap '$tf server down >/dev/null 2>&1 || true' EXIT

echo "== validate"
$tf validate recipes/

echo "== render the turn DAG"
$tf render "$recipe" -o "$out/voice-chat.svg"
$tf render "$recipe" -o "$out/voice-chat.html"

echo "== starting the embedded model server (a small generated model: replies are noise, the mechanics are real)"
$tf server up

turn() {  # persona, text
  echo
  echo "alice -> $1: $2"
  $tf run "$recipe" --persona "$1" --room "$room" --speaker alice --text "$2" --json > "$out/last.json"
  .venv/bin/python - "$out/last.json" <<'PY'
import json, sys
from turnflow.cli import summary_line
print(summary_line(json.load(open(sys.argv[1]))))
PY
}

turn maya   "Morning Maya, what's on the sprint board today?"
turn maya   "Anything blocked on the payments migration?"
turn helper "Helper, what's the weather like for the offsite?"
turn maya   "Maya, please move the retro to Thursday."
turn helper "And convert twenty miles to kilometres."
turn maya   "Thanks, let's wrap up the standup."

$tf render "$recipe" -o "$out/voice-chat-last-turn.svg" --report "$out/last.json"
echo
echo "== wrote $out/voice-chat.svg, $out/voice-chat.html and $out/voice-chat-last-turn.svg (last turn's timings)"
echo "   room '$room' continues with: $tf run $recipe --persona maya --room $room --text '...'"
