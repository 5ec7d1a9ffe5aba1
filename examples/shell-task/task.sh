#!/usr/bin/env bash
# A shell task: the same CFLOW_* variables as run(shard). Counts the records of one CSV input
# and sums its y column; the combined counts.csv has one line per input.
set -euo pipefail
name=$(basename "$CFLOW_INPUT")
awk -F, -v src="$name" 'NR > 1 { n++; if ($5 != "") { s += $5 } }
  END { print "source,records,y_sum"; printf "%s,%d,%.4f\n", src, n, s }' "$CFLOW_INPUT" \
  > "$CFLOW_OUTPUT_DIR/counts.csv"
echo "counted $name (attempt $CFLOW_ATTEMPT of shard $CFLOW_SHARD_ID)"
