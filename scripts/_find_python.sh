# Sourced by the wrappers: sets VB_PYTHON to a python that can import vicuna_bench.
# Order: $VICUNA_BENCH_PYTHON; this checkout's .venv; the python beside a vicuna-bench
# on PATH; python3. A checkout's own package goes first on PYTHONPATH, so its
# scripts run its code even where another vicuna-bench is installed.
_vb_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -f "$_vb_root/vicuna_bench/__init__.py" ]; then
    export PYTHONPATH="$_vb_root${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -n "${VICUNA_BENCH_PYTHON:-}" ]; then
    VB_PYTHON="$VICUNA_BENCH_PYTHON"
elif [ -x "$_vb_root/.venv/bin/python" ]; then
    VB_PYTHON="$_vb_root/.venv/bin/python"
elif command -v vicuna-bench >/dev/null 2>&1 && [ -x "$(dirname "$(command -v vicuna-bench)")/python" ]; then
    VB_PYTHON="$(dirname "$(command -v vicuna-bench)")/python"
else
    VB_PYTHON="python3"
fi
if ! "$VB_PYTHON" -c "import vicuna_bench" >/dev/null 2>&1; then
    echo "$(basename "$0"): error: $VB_PYTHON cannot import vicuna_bench (install it, or set VICUNA_BENCH_PYTHON)" >&2
    exit 2
fi
