"""Jobs carry their own work; the driver resolves one spec from it, checks every job, opens one engine, runs them.

References: hand-computed work figures, and the order of events each contract promises (checks before the
engine opens, one engine, results in the jobs' order, the front end's guard around each job).
"""

from __future__ import annotations

import pytest

from tests import tiny
from vicuna_bench import drivers
from vicuna_bench.errors import UserError
from vicuna_bench.jobs import Work
from vicuna_bench.spec import EngineSpec

pytestmark = pytest.mark.unit


def test_combined_work_sums_the_steps_and_takes_the_largest_of_the_rest():
    a = Work(decode_steps=100, longest_prompt=64, new_tokens=8, batch=4)
    b = Work(decode_steps=30, longest_prompt=300, new_tokens=1, batch=1, needs_engine=False)
    assert Work.combined([a, b]) == Work(decode_steps=130, longest_prompt=300, new_tokens=8, batch=4,
                                         needs_engine=True)
    assert Work.combined([b]).needs_engine is False
    assert Work.combined([]) == Work(needs_engine=False)


class FakeJob:
    def __init__(self, name, events, work=Work(), refuse=False, crash=False):
        self.name, self.events, self._work, self.refuse, self.crash = name, events, work, refuse, crash

    def work(self):
        return self._work

    def check(self, spec):
        self.events.append(("check", self.name))
        if self.refuse:
            raise UserError(f"{self.name}: refused")

    def run(self, engine, spec):
        self.events.append(("run", self.name, engine))
        if self.crash:
            raise RuntimeError(f"{self.name} crashed")
        return f"{self.name} result"


class FakeEngine:
    def __init__(self, events):
        self.events = events

    def close(self):
        self.events.append(("close",))


SPEC = EngineSpec("unused-model-dir", 1, "cpu", "fp32", 64)


@pytest.fixture
def events(monkeypatch):
    log = []

    def open_engine(spec, **options):
        log.append(("open", spec))
        return FakeEngine(log)

    monkeypatch.setattr(drivers, "open_engine", open_engine)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    return log


def test_every_job_is_checked_before_one_engine_opens_and_results_come_back_in_order(events):
    jobs = [FakeJob("perf", events), FakeJob("mmlu", events)]
    results = drivers.run_jobs(SPEC, jobs)
    assert results == ["perf result", "mmlu result"]
    engine = events[3][2]
    assert events == [("check", "perf"), ("check", "mmlu"), ("open", SPEC), ("run", "perf", engine),
                      ("run", "mmlu", engine), ("close",)]


def test_a_refused_job_stops_everything_before_the_engine_opens(events):
    jobs = [FakeJob("perf", events), FakeJob("mmlu", events, refuse=True)]
    with pytest.raises(UserError, match="^mmlu: refused$"):
        drivers.run_jobs(SPEC, jobs)
    assert events == [("check", "perf"), ("check", "mmlu")]


def test_no_engine_opens_when_no_job_needs_one(events):
    cached = FakeJob("mmlu", events, work=Work(needs_engine=False))
    assert drivers.run_jobs(SPEC, [cached]) == ["mmlu result"]
    assert events == [("check", "mmlu"), ("run", "mmlu", None)]


def test_a_given_engine_is_used_and_left_open_and_the_guard_wraps_each_job(events):
    given = FakeEngine(events)
    guarded = []

    def guard(name, fn):
        try:
            return fn()
        except RuntimeError as exc:
            guarded.append((name, str(exc)))
            return None

    jobs = [FakeJob("perf", events, crash=True), FakeJob("mmlu", events)]
    assert drivers.run_jobs(SPEC, jobs, engine=given, guard=guard) == [None, "mmlu result"]
    assert guarded == [("perf", "perf crashed")]
    assert ("close",) not in events and not any(e[0] == "open" for e in events)


def test_an_engine_closes_when_a_job_raises(events):
    with pytest.raises(RuntimeError, match="perf crashed"):
        drivers.run_jobs(SPEC, [FakeJob("perf", events, crash=True)])
    assert events[-1] == ("close",)


def test_the_spec_weighs_the_combined_work(tmp_path):
    model = tiny.make_tiny_llama(tmp_path / "m", tiny.GQA, seed=2, tokenizer=False)
    settings = {"model_path": str(model), "device": "cpu", "dtype": "fp32", "max_seq_len": 64, "compile": "auto"}
    big = [FakeJob("a", [], Work(decode_steps=6000, batch=2)), FakeJob("b", [], Work(decode_steps=3600, batch=3))]
    spec = drivers.resolve_spec(settings, big, progress=False)
    assert (spec.fit_batch, spec.compile) == (3, "on")  # 9600 decode steps on CPU repay the compile
    spec = drivers.resolve_spec(settings, [FakeJob("a", [], Work(decode_steps=4))], progress=False)
    assert (spec.fit_batch, spec.compile) == (1, "off")


def test_the_nightly_reads_each_precision_set_once(tmp_path, monkeypatch):
    """plan_run builds the precision job (the data read there) and its check is not repeated by the run."""
    from tests.unit.precision_fixtures import make_synthetic_mmlu
    from vicuna_bench.nightly import runner
    from vicuna_bench.precision import runner as precision_runner

    model = tiny.make_tiny_llama(tmp_path / "talking", tiny.GQA, seed=2)
    work = make_synthetic_mmlu(tmp_path / "mmlu")
    reads = []
    real = precision_runner.load_dataset
    monkeypatch.setattr(precision_runner, "load_dataset", lambda *a, **k: reads.append(a) or real(*a, **k))
    monkeypatch.setenv("MAX_SEQ_LENGTH", "400")
    values = runner.resolve_settings({
        "model_path": str(model), "device": "cpu", "stages": "mmlu", "mmlu_dir": str(work),
        "mmlu_subjects": "alpha_studies,beta_facts", "max_prompt_tokens": 300, "seq_len_out": 4,
        "output_dir": str(tmp_path / "night"), "history": str(tmp_path / "h.sqlite")})
    plan = runner.plan_run(values)
    assert len(reads) == 1
    [job] = plan.jobs
    # alpha_studies and beta_facts: 6 questions, one too long for 300 tokens; 5 asked, 4 tokens each, batch 1.
    assert job.work() == Work(decode_steps=20, longest_prompt=300, new_tokens=4, batch=1)
    with pytest.raises(UserError, match=r"^--mmlu-subjects: 'gamma' has no gamma_val\.csv in "):
        runner.plan_run({**values, "mmlu_subjects": "gamma", "output_dir": str(tmp_path / "night2")})
