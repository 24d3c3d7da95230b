"""The performance harness: first-token and per-token latency into CSV, one room per concern.

cases: which cases run and with what settings (PerfSettings, sweep, case_pair, warm-up, file names);
measure: the warm-up and each case's samples and energy (CaseResult, PerfRun);
figures: the statistics (percentiles, the decode step's bandwidth floor);
writers: the reference and extended CSVs, the samples JSON, the summary table;
plot: the PNG; baseline: the regression gate against an earlier CSV; job: PerfJob, which runs them in order.
Layered in that order: a module imports only the ones listed before it.
"""

from .cases import (DEFAULT_MAX_LEN_EXP, DEFAULT_MIN_LEN_EXP, MAX_LEN_EXP_LIMIT, MODES, Case, PerfSettings,
                    default_model_name, file_stem, parse_case_pair, select_cases, settings_work, sweep_cases,
                    warmup_case)
from .measure import CaseResult, PerfRun, measure_case, merge_results, open_energy, start_run
from .figures import decode_floor_ms, decode_step_bytes, percentile
from .writers import (EXTENDED_COLUMNS, REFERENCE_HEADER, cpu_binding_text, energy_source_text, extended_row,
                      extended_rows, load_columns, reference_line, samples_doc, summary_table, write_tables)
from .plot import save_figure, write_plot
from .baseline import Baseline, Comparison, compare_to_baseline, gate, load_baseline
from .job import PerfJob

__all__ = [
    "DEFAULT_MAX_LEN_EXP", "DEFAULT_MIN_LEN_EXP", "MAX_LEN_EXP_LIMIT", "MODES", "Case", "PerfSettings",
    "default_model_name", "file_stem", "parse_case_pair", "select_cases", "settings_work", "sweep_cases",
    "warmup_case",
    "CaseResult", "PerfRun", "measure_case", "merge_results", "open_energy", "start_run",
    "decode_floor_ms", "decode_step_bytes", "percentile",
    "EXTENDED_COLUMNS", "REFERENCE_HEADER", "cpu_binding_text", "energy_source_text", "extended_row",
    "extended_rows", "load_columns", "reference_line", "samples_doc", "summary_table", "write_tables",
    "save_figure", "write_plot",
    "Baseline", "Comparison", "compare_to_baseline", "gate", "load_baseline",
    "PerfJob",
]
