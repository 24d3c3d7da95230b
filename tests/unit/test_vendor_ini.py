"""The vendor's sdk_config.ini: the guide's file parses to the documented
settings; every bad value, key or section is one UserError naming it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from vicuna_bench import vendor
from vicuna_bench.errors import UserError

pytestmark = pytest.mark.unit

GUIDE = Path(__file__).parent / "data" / "sdk_config_guide.ini"


def write_ini(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sdk_config.ini"
    path.write_text(text)
    return path


def test_guide_ini_parses_to_the_documented_settings(caplog):
    with caplog.at_level(logging.WARNING, logger="vicuna_bench"):
        cfg = vendor.read_sdk_config(GUIDE, env={})
    m, p, q = cfg.model, cfg.performance, cfg.precision
    assert m.model_path == "./vicuna-13b-v1.5-16k_parallel_8"  # the unbalanced quote stripped
    assert m.device_ids == (0, 1, 2, 3, 4, 5, 6, 7)
    assert (m.parallel_backend, m.log_dir, m.bind_cpu) == ("hccl", "./log", True)
    assert p.model_name == "vicuna_13b"
    assert (p.batch_size, p.min_len_exp, p.max_len_exp) == (1, 5, 10)
    assert p.case_pair == ((256, 256), (512, 512))
    assert p.save_file_name is None  # empty: the default
    assert (p.perf_mode, p.skip_decode) == ("normal", False)
    assert (q.mode, q.work_dir, q.batch, q.shot, q.seq_len_out) == ("mmlu", "./mmlu", 1, 5, 2)
    # device_id is the guide's spelling: accepted, with one warning naming it.
    assert len(cfg.warnings) == 1 and "device_id is read as device_ids" in cfg.warnings[0]
    assert [r.getMessage() for r in caplog.records] == list(cfg.warnings)


def test_a_missing_key_takes_the_settings_tables_default(tmp_path):
    # The expected values are REFERENCE.md's INI (shared/spec/REFERENCE.md, "The INI file"): batch_size 1,
    # min_len_exp 5, max_len_exp 10 (the docs; its code's 11 overflows a 2048 cache), bind_cpu 1, batch 1,
    # shot 5, seq_len_out 2 (the shipped example); perf_mode detail (docs/vendor-dropin.md: TIMEIT's mode).
    from vicuna_bench import perf, sdk

    cfg = vendor.read_sdk_config(write_ini(tmp_path, "[model]\nmodel_path=/m\n"), env={})
    p, q = cfg.performance, cfg.precision
    assert (cfg.model.bind_cpu, p.batch_size, p.case_pair, p.perf_mode) == (True, 1, None, "detail")
    assert (q.batch, q.shot, q.seq_len_out) == (1, 5, 2)
    # The exponents are the table's "not given" (None): the sweep 2^5 .. 2^10.
    assert (p.min_len_exp, p.max_len_exp) == (None, None)
    cases = perf.select_cases(p.case_pair, p.min_len_exp, p.max_len_exp)
    assert (cases[0].seq_in, cases[-1].seq_in, cases[-1].seq_out) == (32, 1024, 1024)
    # What sdk-test layers agrees with the sections.
    layered = sdk.layered_values(cfg, "precision")
    assert (layered["batch"], layered["shot"], layered["seq_len_out"]) == (1, 5, 2)
    assert sdk.layered_values(cfg, "perf")["perf_mode"] == "detail"
    # The vendor's own keys have no setting, hence no default: not set.
    m = cfg.model
    assert (m.device_ids, m.parallel_backend, p.skip_decode, p.save_file_name) == (None, None, None, None)
    assert cfg.explicit_settings() == {"model_path": "/m"}
    assert cfg.warnings == ()


def test_max_len_exp_is_checked_against_the_sweeps_min(tmp_path):
    # min_len_exp 11 alone: the sweep's largest power is 10 (REFERENCE.md's docs), below it.
    with pytest.raises(UserError, match=r"max_len_exp=10 is below min_len_exp=11"):
        vendor.read_sdk_config(write_ini(tmp_path, "[performance]\nmin_len_exp=11\n"), env={})


def test_explicit_settings_use_option_names(tmp_path):
    cfg = vendor.read_sdk_config(GUIDE, env={})
    s = cfg.explicit_settings()
    assert s["device_ids"] == (0, 1, 2, 3, 4, 5, 6, 7)
    assert s["case_pair"] == ((256, 256), (512, 512))
    assert s["seq_len_out"] == 2
    assert "save_file_name" not in s  # left empty in the file


def test_unknown_key_names_it_its_section_and_the_valid_keys(tmp_path):
    path = write_ini(tmp_path, "[performance]\nbatch_size=1\nbatchsize=4\n")
    with pytest.raises(UserError) as err:
        vendor.read_sdk_config(path, env={})
    msg = str(err.value)
    assert "'batchsize'" in msg and "[performance]" in msg and str(path) in msg
    assert "batch_size" in msg and "case_pair" in msg and "perf_mode" in msg
    assert "\n" not in msg


def test_unknown_section_names_it(tmp_path):
    with pytest.raises(UserError, match=r"unknown section \[perf\].*valid: \[model\], \[performance\], \[precision\]"):
        vendor.read_sdk_config(write_ini(tmp_path, "[perf]\nbatch_size=1\n"), env={})


def test_default_section_is_not_copied_into_every_section(tmp_path):
    with pytest.raises(UserError, match=r"unknown section \[DEFAULT\]"):
        vendor.read_sdk_config(write_ini(tmp_path, "[DEFAULT]\nbatch_size=2\n[model]\nmodel_path=/m\n"), env={})


@pytest.mark.parametrize(
    "value",
    ["[[256,256],[512]]", "[[256,'x']]", "__import__('os').system('true')", "[[0,8]]", "[]", "[[256,256],", "256,256"],
)
def test_malformed_case_pair_fails_with_its_value(tmp_path, value):
    path = write_ini(tmp_path, f"[performance]\ncase_pair={value}\n")
    with pytest.raises(UserError) as err:
        vendor.read_sdk_config(path, env={})
    msg = str(err.value)
    assert "[performance] case_pair=" in msg and repr(value) in msg


def test_case_pair_in_quotes_and_tuples(tmp_path):
    cfg = vendor.read_sdk_config(write_ini(tmp_path, "[performance]\ncase_pair=\"[[16384, 128]]\n"), env={})
    assert cfg.performance.case_pair == ((16384, 128),)
    cfg = vendor.read_sdk_config(write_ini(tmp_path, "[performance]\ncase_pair=((32, 8), (64, 8))\n"), env={})
    assert cfg.performance.case_pair == ((32, 8), (64, 8))


def test_legacy_ceval_section_is_precision_with_a_warning(tmp_path):
    cfg = vendor.read_sdk_config(write_ini(tmp_path, "[ceval]\nmode=ceval\nwork_dir=./ceval\nshot=3\n"), env={})
    assert (cfg.precision.mode, cfg.precision.work_dir, cfg.precision.shot) == ("ceval", "./ceval", 3)
    assert len(cfg.warnings) == 1 and "[ceval] is the legacy name of [precision]" in cfg.warnings[0]


def test_ceval_and_precision_together_is_an_error(tmp_path):
    with pytest.raises(UserError, match=r"both \[precision\] and \[ceval\]"):
        vendor.read_sdk_config(write_ini(tmp_path, "[precision]\nshot=5\n[ceval]\nshot=3\n"), env={})


@pytest.mark.parametrize("key", ["device_id", "device"])
def test_guide_device_spellings_are_device_ids(tmp_path, key):
    cfg = vendor.read_sdk_config(write_ini(tmp_path, f"[model]\n{key}=4,5\n"), env={})
    assert cfg.model.device_ids == (4, 5)
    assert cfg.warnings == (f"{tmp_path / 'sdk_config.ini'}: [model] {key} is read as device_ids (the key the vendor's loader uses)",)


def test_two_spellings_of_device_ids_is_an_error(tmp_path):
    with pytest.raises(UserError, match="sets device_ids twice"):
        vendor.read_sdk_config(write_ini(tmp_path, "[model]\ndevice_ids=0,1\ndevice_id=2,3\n"), env={})


def test_timeit_means_detail():
    cfg = vendor.read_sdk_config(GUIDE, env={"TIMEIT": "1"})
    assert cfg.performance.perf_mode == "detail"
    assert "perf_mode" in cfg.performance.explicit
    assert vendor.read_sdk_config(GUIDE, env={"TIMEIT": "0"}).performance.perf_mode == "normal"


@pytest.mark.parametrize(
    "section, line, expected",
    [
        ("performance", "batch_size=0", "[performance] batch_size='0' is not valid (an integer >= 1)"),
        ("performance", "batch_size=one", "[performance] batch_size='one' is not valid (an integer >= 1)"),
        ("performance", "perf_mode=fast", "[performance] perf_mode='fast' is not valid (detail | normal)"),
        ("performance", "skip_decode=2", "[performance] skip_decode='2' is not valid (1 | true | yes | on | 0 | false | no | off)"),
        ("precision", "mode=gsm8k", "[precision] mode='gsm8k' is not valid (mmlu | ceval)"),
        ("precision", "seq_len_out=0", "[precision] seq_len_out='0' is not valid (an integer >= 1)"),
        ("model", "device_ids=0,0", "[model] device_ids='0,0' is not valid"),
        ("model", "device_ids=a,b", "[model] device_ids='a,b' is not valid"),
        ("model", "bind_cpu=maybe", "[model] bind_cpu='maybe' is not valid (1 | true | yes | on | 0 | false | no | off)"),
    ],
)
def test_bad_values_name_section_key_and_value(tmp_path, section, line, expected):
    with pytest.raises(UserError) as err:
        vendor.read_sdk_config(write_ini(tmp_path, f"[{section}]\n{line}\n"), env={})
    assert expected in str(err.value)


def test_exponents_out_of_order_fail_unless_case_pair_overrides(tmp_path):
    with pytest.raises(UserError, match="max_len_exp=4 is below min_len_exp=5"):
        vendor.read_sdk_config(write_ini(tmp_path, "[performance]\nmax_len_exp=4\n"), env={})
    cfg = vendor.read_sdk_config(write_ini(tmp_path, "[performance]\nmax_len_exp=4\ncase_pair=[[8,8]]\n"), env={})
    assert cfg.performance.case_pair == ((8, 8),)


def test_quotes_stripped_matched_or_not(tmp_path):
    cfg = vendor.read_sdk_config(write_ini(tmp_path, "[model]\nmodel_path='/a b'\nlog_dir=logs\"\n[performance]\nbatch_size=\"4\"\n"), env={})
    assert (cfg.model.model_path, cfg.model.log_dir, cfg.performance.batch_size) == ("/a b", "logs", 4)


def test_percent_in_a_value_is_literal(tmp_path):
    cfg = vendor.read_sdk_config(write_ini(tmp_path, "[model]\nmodel_path=/data/100%/m\n"), env={})
    assert cfg.model.model_path == "/data/100%/m"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("batch_size=1\n[performance]\n", "comes before any [section]"),
        ("[model]\nmodel_path=/a\nmodel_path=/b\n", "[model] model_path is set twice"),
        ("[model]\n[model]\n", "section [model] appears twice"),
        ("[model]\njust words\n", "is not 'key = value'"),
    ],
)
def test_malformed_files_are_one_line_errors(tmp_path, text, expected):
    with pytest.raises(UserError) as err:
        vendor.read_sdk_config(write_ini(tmp_path, text), env={})
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        vendor.read_sdk_config(tmp_path / "sdk_config.ini", env={})


# ------------------------------------------------------------------ the guide's [precision] keys

GUIDE_PRECISION = """[model]
model_path=./vicuna-13b-v1.5-16k_parallel_8
device_ids=0,1,2,3,4,5,6,7
[precision]
model_path=./vicuna-13b-v1.5-16k_parallel_4
work_dir=./ceval
device=4,5,6,7
batch=1
"""


def test_precision_lists_model_path_and_device_as_the_guide_does(tmp_path):
    cfg = vendor.read_sdk_config(write_ini(tmp_path, GUIDE_PRECISION), env={})
    q = cfg.precision
    assert (q.model_path, q.device_ids, q.work_dir) == ("./vicuna-13b-v1.5-16k_parallel_4", (4, 5, 6, 7), "./ceval")
    assert q.mode is None  # left out: chosen from the data when the run starts
    assert cfg.warnings == (f"{tmp_path / 'sdk_config.ini'}: [precision] device is read as device_ids "
                            "(the key the vendor's loader uses)",)
    # For the precision task [precision]'s values win; for the others [model]'s stay.
    assert cfg.explicit_settings("precision")["model_path"] == "./vicuna-13b-v1.5-16k_parallel_4"
    assert cfg.explicit_settings("precision")["device_ids"] == (4, 5, 6, 7)
    for task in (None, "run", "performance"):
        assert cfg.explicit_settings(task)["model_path"] == "./vicuna-13b-v1.5-16k_parallel_8"
        assert cfg.explicit_settings(task)["device_ids"] == tuple(range(8))
    assert cfg.model_key_source("precision", "device_ids") == "[precision]"
    assert cfg.model_key_source("run", "device_ids") == "[model]"
    # The disagreement is said, once per key.
    assert cfg.model_conflicts() == [
        f"{tmp_path / 'sdk_config.ini'}: [precision] model_path=./vicuna-13b-v1.5-16k_parallel_4 differs from "
        "[model] model_path=./vicuna-13b-v1.5-16k_parallel_8: the precision task uses [precision]'s",
        f"{tmp_path / 'sdk_config.ini'}: [precision] device_ids=4,5,6,7 differs from [model] "
        "device_ids=0,1,2,3,4,5,6,7: the precision task uses [precision]'s",
    ]


def test_precision_model_path_alone_and_agreeing_values_are_no_conflict(tmp_path):
    alone = vendor.read_sdk_config(write_ini(tmp_path, "[precision]\nmodel_path=/m\nwork_dir=/w\n"), env={})
    assert alone.explicit_settings("precision")["model_path"] == "/m"
    assert "model_path" not in alone.explicit_settings("run")
    assert alone.model_conflicts() == []
    same = vendor.read_sdk_config(write_ini(tmp_path, "[model]\nmodel_path=/m\n[precision]\nmodel_path=\"/m\"\n"),
                                  env={})
    assert same.model_conflicts() == []


def test_precision_mode_is_still_checked_when_given(tmp_path):
    with pytest.raises(UserError, match=r"\[precision\] mode='mlu' is not valid \(mmlu \| ceval\)"):
        vendor.read_sdk_config(write_ini(tmp_path, "[precision]\nmode=mlu\n"), env={})
