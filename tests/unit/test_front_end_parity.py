"""The four front ends resolve the same settings to the same engine spec, and every bool reaches it from every source.

Each front end runs its real adapter code (CLI ``main``, ``sdk-test``'s
``main``, the nightly's flag parsing and plan, the pytest plugin's
``perf_job`` fixture) up to the moment it would open the engine:
``drivers.open_engine`` is replaced by a recorder, so no model is loaded
(the spec resolution reads config.json only).  References: the values given
on each command line / in each file, and spec/CLI.md's flag names.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tests import tiny
from vicuna_bench import drivers, settings
from vicuna_bench.cli import build_parser, main

pytestmark = pytest.mark.unit


class Opened(Exception):
    """Raised by the recorder in place of opening an engine."""


@pytest.fixture
def opened(monkeypatch):
    """The specs each front end would open an engine for (in order); opening stops the front end."""
    specs = []

    def record(spec, **options):
        specs.append(spec)
        raise Opened()

    monkeypatch.setattr(drivers, "open_engine", record)
    return specs


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny.make_tiny_llama(tmp_path_factory.mktemp("parity") / "gqa", tiny.GQA, seed=2, tokenizer=False)


# Many decode steps ahead (16 x 600 repeats), so --compile auto must decide "on" on CPU in every front end.
PERF_FLAGS = ("--case-pair", "[[8,16]]", "--repeat", "600", "--batch-size", "2")


def via_cli(model, tmp_path, bind: bool, opened) -> object:
    with pytest.raises(Opened):
        main(["perf", "--model-path", str(model), "--device", "cpu", "--device-type", "d9", "--compile", "auto",
              "--bind-cpu" if bind else "--no-bind-cpu", "--output-dir", str(tmp_path), *PERF_FLAGS])
    return opened[-1]


def via_nightly(model, tmp_path, bind: bool, opened) -> object:
    from vicuna_bench.nightly import runner

    ns = build_parser().parse_args(["nightly", "--model-path", str(model), "--device", "cpu", "--device-type", "d9",
                                    "--compile", "auto", "--bind-cpu" if bind else "--no-bind-cpu",
                                    "--stages", "perf", "--output-dir", str(tmp_path / "night"),
                                    "--history", str(tmp_path / "h.sqlite"), *PERF_FLAGS])
    flags = {k: v for k, v in vars(ns).items() if k not in ("command", "debug")}
    return runner.plan_run(runner.resolve_settings(flags)).spec


def via_pytest(model, tmp_path, bind: bool, opened) -> object:
    from _pytest.config.argparsing import Parser

    from vicuna_bench import pytest_plugin

    parser = Parser(_ispytest=True)
    settings.add_to_pytest(parser)
    ns = parser.parse_known_args(["--model-path", str(model), "--device", "cpu", "--device-type", "d9",
                                  "--compile", "auto", "--bind-cpu" if bind else "--no-bind-cpu",
                                  "--perf-output-dir", str(tmp_path),
                                  *(w.replace("--", "--perf-") for w in PERF_FLAGS)])  # the perf group's spelling
    config = FakeConfig(ns, tmp_path)
    fixture = pytest_plugin.perf_job.__wrapped__  # the fixture's own code

    def factory(spec, workers=None):
        return drivers.open_engine(spec, workers=workers)

    with pytest.raises(Opened):
        fixture(None, config, factory)
    return opened[-1]


class FakeConfig:
    """The part of pytest's config the plugin's perf fixtures read."""

    def __init__(self, ns: argparse.Namespace, invocation_dir):
        self.ns = ns
        self.stash = {}
        self.invocation_params = argparse.Namespace(dir=invocation_dir)

    def getoption(self, name):
        return getattr(self.ns, name.lstrip("-").replace("-", "_"))


def resolve(front_end, model, tmp_path, bind, opened, monkeypatch):
    if front_end == "sdk-test":
        # The vendor INI has no repeat key: give the same 600 repeats through its layer of the table.
        from vicuna_bench import sdk

        real = sdk.layered_values

        def with_repeat(config, group, flags=None, task=None, env=None):
            values = real(config, group, flags, task, env)
            return {**values, "repeat": 600} if group == "perf" else values

        monkeypatch.setattr(sdk, "layered_values", with_repeat)
        ini = tmp_path / "sdk_config.ini"
        ini.write_text(f"[model]\nmodel_path = {model}\nbind_cpu = {'yes' if bind else 'no'}\n"
                       "[performance]\ncase_pair = [[8,16]]\nbatch_size = 2\nperf_mode = detail\n")
        monkeypatch.chdir(tmp_path)
        with pytest.raises(Opened):
            main(["sdk-test", "1", "d9", "performance", "--config", str(ini), "--device", "cpu", "--compile", "auto",
                  "--no-progress"])
        return opened[-1]
    return {"cli": via_cli, "nightly": via_nightly, "pytest": via_pytest}[front_end](model, tmp_path, bind, opened)


FRONT_ENDS = ("cli", "sdk-test", "nightly", "pytest")


@pytest.fixture
def avx2_host(monkeypatch):
    """--dtype auto as on a captured AVX2-only CPU (fp32, no probe), whatever this host is."""
    from vicuna_bench import cpu_isa

    monkeypatch.setattr(cpu_isa, "CPUINFO", Path(__file__).parent / "data" / "cpu_flags" / "haswell_e5_2680_v3.cpuinfo")
    cpu_isa.forget_host_decision()
    yield
    cpu_isa.forget_host_decision()  # the next test decides for the real host again


@pytest.mark.parametrize("bind", [True, False], ids=["bind", "no-bind"])
@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_the_same_inputs_resolve_to_the_same_spec_in_every_front_end(front_end, bind, model, tmp_path, opened,
                                                                       monkeypatch, avx2_host):
    monkeypatch.setenv("MAX_SEQ_LENGTH", "64")  # the one env-backed setting, the same for all
    spec = resolve(front_end, model, tmp_path, bind, opened, monkeypatch)
    # What the inputs say, by hand: cpu, fp32 (--dtype auto on an AVX2-only CPU), 64 tokens, d9 carried off NPU, batch 2 for the
    # fit check, binding as asked, and 16 x 600 decode steps on CPU repay the compile: on.
    assert (spec.model_path, spec.world_size, spec.device, spec.dtype, spec.max_seq_len) == (str(model), 1, "cpu",
                                                                                             "fp32", 64)
    assert (spec.chip_family, spec.fit_batch, spec.bind_cpu, spec.compile, spec.npu_graph) == ("d9", 2, bind, "on",
                                                                                               "auto")


def test_few_decode_steps_compile_auto_off_in_every_front_end(model, tmp_path, opened, monkeypatch):
    # The same small work (one case of 4 tokens, once): auto decides off, whichever front end asks.
    monkeypatch.setenv("MAX_SEQ_LENGTH", "64")
    monkeypatch.setattr("tests.unit.test_front_end_parity.PERF_FLAGS", ("--case-pair", "[[8,4]]", "--batch-size", "2"))
    for front_end in ("cli", "nightly", "pytest"):
        spec = {"cli": via_cli, "nightly": via_nightly, "pytest": via_pytest}[front_end](model, tmp_path / front_end,
                                                                                      True, opened)
        assert spec.compile == "off", front_end


# ---------------------------------------------------------------- bools: one parser, every source

@pytest.mark.parametrize("text, expected", [
    ("1", True), ("true", True), ("Yes", True), ("ON", True), (" 'true' ", True), (True, True),
    ("0", False), ("false", False), ("No", False), ("off", False), ("FALSE", False), (False, False),
])
def test_one_bool_parser_takes_every_spelling(text, expected):
    assert settings.parse_bool(text, "bind-cpu") is expected


@pytest.mark.parametrize("text", ["maybe", "2", "", 2.0])
def test_one_bool_parser_refuses_the_rest_naming_the_key(text):
    from vicuna_bench.errors import UserError

    with pytest.raises(UserError, match=r"^bind-cpu = .* is not a true or false \(valid: 1, true, yes, on, 0"):
        settings.parse_bool(text, "bind-cpu")


BOOLS = [s for s in settings.SETTINGS if s.type is bool]


def test_every_bool_setting_is_a_flag_pair_on_the_cli():
    assert {s.key for s in BOOLS} >= {"model.bind_cpu", "nightly.quick", "nightly.progress"}
    for s in BOOLS:
        parser = argparse.ArgumentParser()
        settings.add_to_argparse(parser, s.group)
        assert getattr(parser.parse_args([f"--{s.name}"]), s.dest) is True, s.name
        assert getattr(parser.parse_args([f"--no-{s.name}"]), s.dest) is False, s.name


@pytest.mark.parametrize("bind", [True, False])
@pytest.mark.parametrize("source, text", [
    ("flag", None), ("ini", "{ini}"), ("toml", "{toml}"), ("ini-upper", "{INI}"),
])
def test_the_nightly_bind_cpu_from_every_source(tmp_path, source, text, bind):
    # The bug this replaces: `nightly --bind-cpu false` recorded true, --no-bind-cpu was a usage error,
    # TOML `bind-cpu = false` was refused.
    from vicuna_bench.nightly import runner

    args = ["nightly"]
    if source == "flag":
        args.append("--bind-cpu" if bind else "--no-bind-cpu")
    elif source == "toml":
        path = tmp_path / "n.toml"
        path.write_text(f"bind-cpu = {'true' if bind else 'false'}\n")
        args += ["--config", str(path)]
    else:
        path = tmp_path / "n.ini"
        word = ("yes" if bind else "no") if source == "ini" else ("TRUE" if bind else "OFF")
        path.write_text(f"[nightly]\nbind_cpu = {word}\n")
        args += ["--config", str(path)]
    ns = build_parser().parse_args(args)
    values = runner.resolve_settings({k: v for k, v in vars(ns).items() if k not in ("command", "debug")})
    assert values["bind_cpu"] is bind


def test_bind_cpu_with_a_value_is_a_usage_error_not_a_silent_true(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["nightly", "--bind-cpu", "false"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: false" in capsys.readouterr().err


@pytest.mark.parametrize("bind", [True, False])
def test_bind_cpu_reaches_the_spec_from_the_nightly_file(model, tmp_path, bind):
    from vicuna_bench.nightly import runner

    config = tmp_path / "n.toml"
    config.write_text(f'[nightly]\nbind-cpu = {str(bind).lower()}\nmodel-path = "{model}"\ndevice = "cpu"\n'
                      f'stages = "perf"\ncase-pair = [[8, 4]]\nmax-seq-len = 64\n')
    values = runner.resolve_settings({"config": str(config), "output_dir": str(tmp_path / "night"),
                                      "history": str(tmp_path / "h.sqlite")})
    assert runner.plan_run(values).spec.bind_cpu is bind


def test_the_environment_sits_between_the_file_and_the_flags(tmp_path):
    # settings.resolve's documented order: default < file < environment < flags.
    offered = settings.select(("model",))
    file = {"max_seq_len": 512}
    env = settings.from_environment(offered, {"MAX_SEQ_LENGTH": "256"})
    assert settings.resolve(offered, file)["max_seq_len"] == 512
    assert settings.resolve(offered, file, env)["max_seq_len"] == 256
    assert settings.resolve(offered, file, env, {"max_seq_len": 128})["max_seq_len"] == 128
    assert settings.resolve(offered)["max_seq_len"] is None  # none given: resolved at the model (2048 capped)


# ---------------------------------------------------------------- precision: the same work, the same compile decision

SUBJECTS = "alpha_studies,beta_facts,college_physics"  # every subject of the synthetic set: the same 8 questions


@pytest.fixture(scope="module")
def talking_model(tmp_path_factory):
    return tiny.make_tiny_llama(tmp_path_factory.mktemp("parity") / "gqa-tok", tiny.GQA, seed=2)


def precision_spec(front_end, model, work, tmp_path, opened, monkeypatch):
    """The spec each front end opens its engine for, for 8 questions x 300 tokens (--compile auto)."""
    if front_end == "cli":
        with pytest.raises(Opened):
            main(["precision", "--mode", "mmlu", "--work-dir", str(work), "--model-path", str(model), "--device",
                  "cpu", "--device-type", "d9", "--compile", "auto", "--seq-len-out", "300", "--subjects", SUBJECTS,
                  "--output-dir", str(tmp_path / "out"), "--no-progress"])
        return opened[-1]
    if front_end == "sdk-test":
        ini = tmp_path / "sdk_config.ini"
        ini.write_text(f"[model]\nmodel_path = {model}\n[precision]\nmode = mmlu\nwork_dir = {work}\nseq_len_out = 300\n")
        monkeypatch.chdir(tmp_path)
        with pytest.raises(Opened):
            main(["sdk-test", "1", "d9", "precision", "--config", str(ini), "--device", "cpu", "--compile", "auto",
                  "--no-progress"])
        return opened[-1]
    if front_end == "nightly":
        from vicuna_bench.nightly import runner

        ns = build_parser().parse_args([
            "nightly", "--model-path", str(model), "--device", "cpu", "--device-type", "d9", "--compile", "auto",
            "--stages", "mmlu", "--mmlu-dir", str(work), "--mmlu-subjects", SUBJECTS, "--seq-len-out", "300",
            "--output-dir", str(tmp_path / "night"), "--history", str(tmp_path / "h.sqlite")])
        return runner.plan_run(runner.resolve_settings(
            {k: v for k, v in vars(ns).items() if k not in ("command", "debug")})).spec
    from _pytest.config.argparsing import Parser

    from vicuna_bench import pytest_plugin

    parser = Parser(_ispytest=True)
    settings.add_to_pytest(parser)
    ns = parser.parse_known_args(["--model-path", str(model), "--device", "cpu", "--device-type", "d9", "--compile",
                                  "auto", "--accuracy-seq-len-out", "300", "--accuracy-subjects", SUBJECTS,
                                  "--accuracy-output-dir", str(tmp_path / "acc")])
    run = pytest_plugin.release_gate.__wrapped__({"mmlu_dir": work}, lambda spec, workers=None: drivers.open_engine(
        spec, workers=workers), FakeConfig(ns, tmp_path))
    with pytest.raises(Opened):
        run("mmlu")
    return opened[-1]


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_the_same_precision_work_compiles_alike_in_every_front_end(front_end, talking_model, tmp_path, opened,
                                                                     monkeypatch):
    from tests.unit.precision_fixtures import make_synthetic_mmlu

    monkeypatch.setenv("MAX_SEQ_LENGTH", "2400")  # the prompts' 2000 tokens + 300 answer tokens fit
    work = make_synthetic_mmlu(tmp_path / "mmlu")
    spec = precision_spec(front_end, talking_model, work, tmp_path, opened, monkeypatch)
    # 8 questions x 300 tokens = 2400 decode steps ahead: 84 s saved on CPU repays the compile, so "on" in every
    # front end (CLI, sdk-test and pytest used to weigh 0 steps, the nightly 8 x 300).
    assert (spec.compile, spec.max_seq_len, spec.device, spec.chip_family, spec.fit_batch) == ("on", 2400, "cpu",
                                                                                              "d9", 1)


# ---------------------------------------------------------------- run / perf / precision take a --config file too

@pytest.mark.parametrize("kind", ["toml", "ini"])
def test_cli_commands_layer_default_file_environment_flags(tmp_path, kind):
    """table default < --config file < environment < flags, for the CLI's own commands (spelt as each source is)."""
    from vicuna_bench.cli import parse_args

    if kind == "toml":
        path = tmp_path / "perf.toml"
        path.write_text('world-size = 2\nbind-cpu = false\nmax-seq-len = 512\nrepeat = 3\ncase-pair = [[16, 4]]\n')
    else:
        path = tmp_path / "perf.ini"
        path.write_text("[perf]\nworld_size = 2\nbind_cpu = no\nmax_seq_len = 512\nrepeat = 3\ncase_pair = [[16,4]]\n")
    ns = parse_args(["perf", "--config", str(path)], env={})
    assert (ns.world_size, ns.bind_cpu, ns.max_seq_len, ns.repeat, ns.dtype) == (2, False, 512, 3, "auto")
    assert ns.case_pair.replace(" ", "") == "[[16,4]]"
    ns = parse_args(["perf", "--config", str(path)], env={"MAX_SEQ_LENGTH": "1024"})
    assert ns.max_seq_len == 1024  # the environment over the file
    ns = parse_args(["perf", "--config", str(path), "--max-seq-len", "256", "--bind-cpu", "--repeat", "1"],
                    env={"MAX_SEQ_LENGTH": "1024"})
    assert (ns.max_seq_len, ns.bind_cpu, ns.repeat, ns.world_size) == (256, True, 1, 2)  # flags over everything
    ns = parse_args(["perf"], env={})
    assert (ns.world_size, ns.bind_cpu, ns.repeat, ns.max_seq_len) == (1, True, 1, None)  # the table's defaults


def test_a_cli_config_file_with_an_unknown_key_is_one_line_exit_2(tmp_path, capsys):
    from vicuna_bench.cli import main

    path = tmp_path / "p.toml"
    path.write_text("wold-size = 2\n")
    assert main(["precision", "--work-dir", str(tmp_path), "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "'wold-size'" in err[0] and "world-size" in err[0], err
