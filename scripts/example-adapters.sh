#!/usr/bin/env bash
# The example personas' adapters for the generated models: a voice LoRA each, and their skill LoRAs.
# Random weights (generated:tiny/<name>), so anyone can try adapters without a download. Idempotent.
set -euo pipefail
turnflow=${TURNFLOW:-turnflow}
add() {
  "$turnflow" adapters add "generated:tiny/$1" --kind "$2" --id "$1" --license CC0-1.0 --author "turnflow examples" >/dev/null
}
for voice in maya-voice helper-voice teacher-voice codereview-voice; do add "$voice" voice; done
for skill in standup-facilitation incident-comms tool-use socratic-tutoring python-pedagogy code-review secure-coding; do
  add "$skill" skill
done
echo "turnflow: example adapters in the registry ($("$turnflow" adapters list | wc -l) variants; turnflow adapters list)"
