#!/usr/bin/env bash
# The vendor's cut_weight.sh, on vicuna-bench: bash cut_weight.sh --float N [--input-dir IN] [--output-dir OUT]
# Cuts a Hugging Face model directory N ways: OUT/tokenizer/, OUT/part_model/<rank>/ (vicuna-bench cut).
set -euo pipefail

# Edit these, as with the vendor's script, or pass --input-dir / --output-dir (or set them in the environment).
INPUT_DIR="${INPUT_DIR:-./vicuna-13b-v1.5-16k}"
OUTPUT_DIR="${OUTPUT_DIR:-}"  # empty: ${INPUT_DIR}_parallel_N (the vendor guide's model_path)

usage() { echo "usage: $(basename "$0") --float N [--input-dir IN] [--output-dir OUT]" >&2; exit 2; }
WORLD_SIZE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --float) [ $# -ge 2 ] || usage; WORLD_SIZE="$2"; shift 2 ;;
        --float=*) WORLD_SIZE="${1#*=}"; shift ;;
        --input-dir) [ $# -ge 2 ] || usage; INPUT_DIR="$2"; shift 2 ;;
        --input-dir=*) INPUT_DIR="${1#*=}"; shift ;;
        --output-dir) [ $# -ge 2 ] || usage; OUTPUT_DIR="$2"; shift 2 ;;
        --output-dir=*) OUTPUT_DIR="${1#*=}"; shift ;;
        -h|--help) usage ;;
        *) echo "$(basename "$0"): error: unknown argument '$1'" >&2; usage ;;
    esac
done
[ -n "$WORLD_SIZE" ] || { echo "$(basename "$0"): error: --float N (the number of parts) is required" >&2; usage; }
OUTPUT_DIR="${OUTPUT_DIR:-${INPUT_DIR%/}_parallel_${WORLD_SIZE}}"

source "$(dirname "${BASH_SOURCE[0]}")/_find_python.sh"
exec "$VB_PYTHON" -m vicuna_bench cut --input-dir "$INPUT_DIR" --output-dir "$OUTPUT_DIR" --world-size "$WORLD_SIZE"
