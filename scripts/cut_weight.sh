#!/usr/bin/env bash
# The vendor's cut_weight.sh, on vicuna-bench: bash cut_weight.sh --float N [--input-dir IN] [--output-dir OUT]
# Cuts a Hugging Face model directory N ways: OUT/tokenizer/, OUT/part_model/<rank>/ (vicuna-bench cut).
set -euo pipefail

# Edit these, as with the vendor's script, or pass --input-dir / --output-dir (or set them in the environment).
INPUT_DIR="${INPUT_DIR:-./vicuna-13b-v1.5-16k}"
OUTPUT_DIR="${OUTPUT_DIR:-}"  # empty: ${INPUT_DIR}_parallel_N (the vendor guide's model_path)

usage() {
    cat <<USAGE
usage: $(basename "$0") --float N [--input-dir IN] [--output-dir OUT]

Cut the Hugging Face model directory IN into N tensor-parallel parts for
'run_sdk_test.sh N ...': OUT/tokenizer/ and OUT/part_model/<rank>/ (the
vendor's layout) plus OUT/manifest.json (each file's sha256, checked at load).

  --float N         the number of parts (the world size the parts run at)
  --input-dir IN    the model to cut (default \$INPUT_DIR, else ./vicuna-13b-v1.5-16k)
  --output-dir OUT  where the parts go; must be absent or empty
                    (default \$OUTPUT_DIR, else IN_parallel_N)
  -h, --help        this text

Runs: vicuna-bench cut --input-dir IN --output-dir OUT --world-size N
USAGE
}
fail() { echo "$(basename "$0"): error: $1" >&2; echo "usage: $(basename "$0") --float N [--input-dir IN] [--output-dir OUT] (--help for more)" >&2; exit 2; }

WORLD_SIZE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --float) [ $# -ge 2 ] || fail "--float needs a value"; WORLD_SIZE="$2"; shift 2 ;;
        --float=*) WORLD_SIZE="${1#*=}"; shift ;;
        --input-dir) [ $# -ge 2 ] || fail "--input-dir needs a value"; INPUT_DIR="$2"; shift 2 ;;
        --input-dir=*) INPUT_DIR="${1#*=}"; shift ;;
        --output-dir) [ $# -ge 2 ] || fail "--output-dir needs a value"; OUTPUT_DIR="$2"; shift 2 ;;
        --output-dir=*) OUTPUT_DIR="${1#*=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) fail "unknown argument '$1'" ;;
    esac
done
[ -n "$WORLD_SIZE" ] || fail "--float N (the number of parts) is required"
OUTPUT_DIR="${OUTPUT_DIR:-${INPUT_DIR%/}_parallel_${WORLD_SIZE}}"

source "$(dirname "${BASH_SOURCE[0]}")/_find_python.sh"
exec "$VB_PYTHON" -m vicuna_bench cut --input-dir "$INPUT_DIR" --output-dir "$OUTPUT_DIR" --world-size "$WORLD_SIZE"
