#!/usr/bin/env bash
# The main job on the embedded defaults: validate the example recipe, render its turn DAG, then hold a
# short spoken two-persona conversation in one room (Maya on a model that hears, Helper on a text-only
# model behind the STT bridge), printing each turn's summary (tokens processed vs cached, invariant prefix
# hash, slot, composition cache hits, audio route, first audio) and writing each spoken reply to a WAV.
# The embedded servers are stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
tf=".venv/bin/turnflow"
recipe="recipes/voice-chat.yaml"
room="demo-$(date +%Y%m%d-%H%M%S)"
out="build/demo"
mkdir -p "$out"
trap '$tf server down >/dev/null 2>&1 || true' EXIT   # stops every embedded server

echo "== the example personas' voice and skill adapters (generated LoRAs) into the registry"
TURNFLOW=$tf ./scripts/example-adapters.sh
$tf adapters list

echo "== validate"
$tf validate recipes/

echo "== render the turn DAG"
$tf render "$recipe" -o "$out/voice-chat.svg"
$tf render "$recipe" -o "$out/voice-chat.html"

echo "== starting the embedded model servers (a small generated model: replies are noise, the mechanics are real)"
$tf server up --backend local-audio     # hears: audio goes to the model as input_audio, no STT
$tf server up --backend local           # text-only: the STT bridge transcribes

n=0
turn() {  # persona, backend, what alice says
  n=$((n + 1))
  echo
  echo "alice -> $1 ($2): \"$3\""
  espeak-ng -v en-us+f4 -s 150 -w "$out/alice-$n.wav" "$3"
  $tf run "$recipe" --persona "$1" --backend "$2" --room "$room" --speaker alice \
      --audio "$out/alice-$n.wav" --out "$out/reply-$n-$1.wav" --json > "$out/last.json"
  .venv/bin/python - "$out/last.json" <<'PY'
import json, sys
from turnflow.cli import summary_line
report = json.load(open(sys.argv[1]))
print(summary_line(report))
adapters = report["adapters"]
applied = [adapters["voice"] or "-"] + [f"{s['id']}@{s['scale']}" for s in adapters["skills"]]
paged = f", paged in {', '.join(adapters['paged_in'])} in {adapters['page_ms']:.0f} ms" if adapters["paged_in"] else ""
fp = report["speech"].get("voice_fingerprint") or {}
print(f"  adapters: {' '.join(applied)}{paged}; voice F0 {fp.get('f0_hz')} Hz")
if report.get("transcript"):
    print(f"  (STT bridge heard: {report['transcript']!r})")
PY
}

turn maya   local-audio "Morning Maya, what's on the sprint board today?"
turn maya   local-audio "Anything blocked on the payments migration?"
turn helper local       "Helper, what's the weather like for the offsite?"
turn maya   local-audio "Maya, please move the retro to Thursday."
turn helper local       "And convert twenty miles to kilometres."
turn maya   local-audio "Thanks, let's wrap up the standup."

$tf render "$recipe" --hears -o "$out/voice-chat-last-turn.svg" --report "$out/last.json"
echo
echo "== wrote the DAG ($out/voice-chat.svg, .html, voice-chat-last-turn.svg with the last turn's timings)"
echo "   and the spoken replies ($out/reply-*.wav)"
echo "   the room continues with: $tf run $recipe --persona maya --room $room --text '...'"
