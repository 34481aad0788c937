#!/bin/bash
# The scoring stage as whole processes, side by side: the code before issue 23 (git worktree at
# ac1cdf0 in $OLD) and this checkout, on the full LUME release (5,466 items, 256 new tokens, batch
# 32) and the 13M hub-shaped OLMo built by hub13m.py in $MODEL. Times from /usr/bin/time -v.
set -e
OLD=${OLD:?set OLD to a checkout of ac1cdf0}; MODEL=${MODEL:?set MODEL to hub13m.py output}
NEW=$(cd "$(dirname "$0")/../.." && pwd); DATA=$NEW/../shared/lume-data/lume
for tree in "$OLD" "$NEW"; do
  out=$(mktemp -d)/run
  (cd "$tree" && /usr/bin/time -v python run.py --task all --method none --model "$MODEL" --data "$DATA" \
     --mia-data none --mmlu none --out "$out" > "$out.log" 2> "$out.time")
  echo "$tree: $(grep 'Elapsed (wall' "$out.time")"; echo "  generations: $out/generations.jsonl"
done
