"""The benchmark harness on a fake clock, the result schema (failed rows included), every
benchmark script's smoke mode (through the GPU suite's CPU dry run, full and --quick), the
suite's budget, step.py's and loaders.py's per-row failures and writes, end-to-end bounds,
and report.py on fixtures."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import _harness as B
from benchmarks._harness import (
    BenchmarkReport,
    ResultError,
    error_message,
    load_result,
    measure,
    summarize,
)

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
# Scripts the GPU suite runs (its --cpu-smoke covers their smoke modes); the rest run below.
SUITE_SCRIPTS = {"step.py", "augment.py", "loaders.py", "end_to_end.py"}
# Scripts whose flags differ from the --smoke/--out contract (see benchmarks/_harness.py).
SMOKE_ARGS = {
    "convert.py": ["--classes", "2", "--per-class", "4", "--copies", "1", "--workers", "1", "--repeats", "1",
                   "--out-dir", "{out}"],
}


class FakeClock:
    """A clock that only moves when the timed function says so, with an event log."""

    def __init__(self, durations: list[float]):
        self.now = 0.0
        self.durations = list(durations)
        self.events: list[str] = []

    def fn(self) -> None:
        self.events.append("fn")
        self.now += self.durations.pop(0)

    def timer(self) -> float:
        self.events.append("timer")
        return self.now

    def sync(self) -> None:
        self.events.append("sync")


# ------------------------------------------------------------------------------ the harness


def test_measure_statistics_on_a_fake_clock() -> None:
    # Two warm-up calls (slow: must not count), then 3 repeats of 2 calls of 10 items each.
    clock = FakeClock([100, 100, 1, 1, 0.5, 0.5, 2, 2])
    m = measure(clock.fn, items_per_call=10, iters=2, repeats=3, warmup=2, timer=clock.timer,
                sync=clock.sync)
    assert m.samples == [10.0, 20.0, 5.0]  # 20 items in 2 s, 1 s, 4 s
    assert (m.items_per_s, m.items_per_s_min, m.items_per_s_max) == (10.0, 5.0, 20.0)
    assert m.seconds_per_call == pytest.approx((2 + 1 + 4) / 6)
    assert (m.repeats, m.iters, m.warmup) == (3, 2, 2)
    assert clock.durations == []
    # The clock starts after a sync and stops after a sync, around every repeat.
    timed = clock.events[2:]
    assert timed == ["sync", "timer", "fn", "fn", "sync", "timer"] * 3


def test_measure_even_repeats_take_the_middle_mean() -> None:
    clock = FakeClock([1, 0.5, 0.25, 2])
    m = measure(clock.fn, items_per_call=4, iters=1, repeats=4, warmup=0, timer=clock.timer)
    assert m.samples == [4, 8, 16, 2]
    assert m.items_per_s == 6  # median of 2, 4, 8, 16


def test_measure_synchronizes_cuda_only(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(B, "_cuda_sync", lambda: calls.append(1))
    clock = FakeClock([1] * 6)
    measure(clock.fn, items_per_call=1, iters=1, repeats=3, warmup=0, timer=clock.timer)
    assert calls == []
    measure(clock.fn, items_per_call=1, iters=1, repeats=3, warmup=0, timer=clock.timer,
            device="cuda:0")
    assert len(calls) == 6


@pytest.mark.parametrize("kwargs", [dict(iters=0), dict(repeats=0), dict(warmup=-1)])
def test_measure_rejects_bad_counts(kwargs) -> None:
    args = dict(items_per_call=1, iters=1, repeats=1, warmup=0) | kwargs
    with pytest.raises(ValueError, match="measure"):
        measure(lambda: None, **args)


def test_summarize_matches_measure_and_rejects_bad_rates() -> None:
    m = summarize([50.0, 25.0, 100.0], items_per_call=5, iters=4, warmup=1)
    assert (m.items_per_s, m.items_per_s_min, m.items_per_s_max) == (50.0, 25.0, 100.0)
    # 20 items per repeat at 50, 25, 100 items/s: 0.4 + 0.8 + 0.2 s over 12 calls.
    assert m.seconds_per_call == pytest.approx(1.4 / 12)
    for bad in ([], [0.0], [float("nan")], [-1.0]):
        with pytest.raises(ValueError, match="summarize"):
            summarize(bad, items_per_call=1, iters=1, warmup=0)


# ------------------------------------------------------------------------------ the schema


def make_report(benchmark: str = "demo", rates: dict[str, list[float]] | None = None,
                baseline: str | None = "base", extra: dict | None = None) -> BenchmarkReport:
    report = BenchmarkReport(benchmark, "cpu", {"batch_size": 8, "image_size": 64}, baseline=baseline)
    for name, rs in (rates or {"base": [10.0, 12.0, 11.0], "fast": [30.0, 33.0, 27.0]}).items():
        report.add(name, summarize(rs, items_per_call=8, iters=2, warmup=1), **(extra or {}).get(name, {}))
    return report


def test_report_round_trip_is_valid(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("OUT", raising=False)
    report = make_report(extra={"fast": {"peak_memory_mb": None, "workers": 2}})
    data = report.to_dict()
    assert B.validate_result(data) == []
    assert data["peak_host_memory_mb"]["process"] > 0
    assert data["versions"]["torch"] and data["cpu_count"] == os.cpu_count()
    path = report.write(tmp_path)
    assert path == tmp_path / f"demo-cpu{os.cpu_count()}.json"
    loaded = load_result(path)
    assert loaded["rows"][1]["items_per_s"] == 30.0 and loaded["baseline"] == "base"
    assert loaded["rows"][1]["workers"] == 2 and loaded["rows"][1]["peak_memory_mb"] is None
    assert "x baseline" in report.table() and "2.73" in report.table()  # 30 / 11 (medians)


def test_write_defaults_to_out_env(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OUT", str(tmp_path / "from_env"))
    path = make_report().write()
    assert path.parent == tmp_path / "from_env" and path.is_file()


def _set(path: str, value):
    def mutate(d):
        keys = path.split(".")
        node = d
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node[k]
        last = keys[-1]
        if value is KeyError:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value
    return mutate


@pytest.mark.parametrize("mutate, message", [
    (_set("rows.0.variant", "fast"), "appears twice"),
    (_set("baseline", "missing"), "not a row's variant"),
    (_set("rows.0.items_per_s", 10.5), "median, min and max"),
    (_set("rows.0.items_per_s_min", 12.5), "items_per_s_min <= items_per_s"),
    (_set("rows.0.samples", [10.0, 12.0]), "one rate per repeat"),
    (_set("rows.0.repeats", True), "'repeats' must be an integer"),
    (_set("rows.1.peak_memory_mb", float("nan")), "non-finite number at rows[1].peak_memory_mb"),
    (_set("schema", 99), "reads version 1"),
    (_set("date", "yesterday"), "'date' must look like"),
    (_set("settings", KeyError), "missing key 'settings'"),
    (_set("rows.1.items_per_s", KeyError), "rows[1]: missing key 'items_per_s'"),
    (_set("versions.torch", 2), "versions.torch must be a string"),
])
def test_validate_finds_each_break(mutate, message) -> None:
    data = copy.deepcopy(make_report().to_dict())
    mutate(data)
    problems = B.validate_result(data)
    assert any(message in p for p in problems), problems


def test_write_refuses_an_invalid_result(tmp_path) -> None:
    report = make_report(extra={"fast": {"tflops": math.inf}})
    with pytest.raises(ResultError, match=r"non-finite number at rows\[1\]\.tflops"):
        report.write(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_load_result_names_the_file(tmp_path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(ResultError, match=r"x\.json: not JSON"):
        load_result(bad)
    bad.write_text(json.dumps({"schema": 1}))
    with pytest.raises(ResultError, match=r"x\.json: not a benchmark result: missing key"):
        load_result(bad)


def test_failed_rows_in_the_schema_the_table_and_load_result(tmp_path) -> None:
    report = make_report(rates={"fast": [30.0, 33.0, 27.0]})
    report.add_error("base", "out of memory", amp="none")
    data = report.to_dict()
    assert B.validate_result(data) == [] and data["baseline"] is None  # not measured: no ratio
    report.add("base2", summarize([10.0], items_per_call=8, iters=2, warmup=1))
    report.baseline = "base2"
    assert report.to_dict()["baseline"] == "base2"
    lines = report.table().splitlines()
    assert re.search(r"^base +- +- +- .*out of memory", lines[3]), lines  # the error column
    path = report.write(tmp_path)
    raw = load_result(path, keep_errors=True)
    assert [r.get("error") for r in raw["rows"]] == [None, "out of memory", None]
    # Readers of rates (report.py) get the measured rows and the failure as a run error.
    loaded = load_result(path)
    assert [r["variant"] for r in loaded["rows"]] == ["fast", "base2"]
    assert loaded["settings"]["errors"] == ["base: out of memory"]


@pytest.mark.parametrize("mutate, message", [
    (_set("rows.0.items_per_s", 10.0), "a failed row ('error') has no numbers, got items_per_s"),
    (_set("rows.0.error", "two\nlines"), "'error' must be one non-empty line"),
    (_set("rows.0.error", " "), "'error' must be one non-empty line"),
    (_set("rows.0.error", 3), "'error' must be a string"),
    (_set("baseline", "base"), "baseline 'base' is a failed row"),
])
def test_validate_finds_each_break_of_a_failed_row(mutate, message) -> None:
    report = make_report(rates={"fast": [30.0]}, baseline=None)
    report.rows.insert(0, {"variant": "base", "error": "out of memory"})
    data = copy.deepcopy(report.to_dict())
    assert B.validate_result(data) == []
    mutate(data)
    assert any(message in p for p in B.validate_result(data)), B.validate_result(data)


def test_error_message_is_one_line_and_names_out_of_memory() -> None:
    assert error_message(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")) \
        == "out of memory"
    assert error_message(RuntimeError("CUDA error: out of memory\nCUDA kernel errors...")) == "out of memory"
    assert error_message(ValueError("bad shape\n  more")) == "ValueError: bad shape"
    assert error_message(KeyError()) == "KeyError"
    assert not B.is_out_of_memory(MemoryError("host"))  # only the device's


# ------------------------------------------------------------------ step.py and loaders.py rows

STEP_ARGS = ["--smoke", "--device", "cpu", "--image-size", "32", "--dim", "64", "--pred-dim", "16"]


def _fake_measurement(rate: float = 100.0) -> B.Measurement:
    return summarize([rate], items_per_call=2, iters=1, warmup=0)


def _rows_on_disk(path: Path) -> list[tuple[str, str | None]]:
    return [(r["variant"], r.get("error")) for r in load_result(path, keep_errors=True)["rows"]]


def test_step_failed_rows_are_recorded_and_the_json_is_written_after_each(tmp_path, monkeypatch) -> None:
    from benchmarks import step

    path = tmp_path / f"step-cpu{os.cpu_count()}.json"
    seen = []

    def fake_row(v, args, device):
        seen.append(v.name)
        if v.name == "+channels_last":
            raise ValueError("no such layout\nsecond line")
        if v.name == "+bf16":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        if v.name == "+fused_optimizer":  # the rows before are on disk already
            assert _rows_on_disk(path) == [("reference", None), ("+channels_last", "ValueError: no such layout"),
                                          ("+bf16", "out of memory")]
        return {"measurement": _fake_measurement(), "amp": v.amp}

    monkeypatch.setattr(step, "run_variant", fake_row)
    assert step.main([*STEP_ARGS, "--out", str(tmp_path)]) == 1  # some row failed
    assert seen == ["reference", "+channels_last", "+bf16", "+fused_optimizer", "+augmentation", "+online_probe"]
    data = load_result(path, keep_errors=True)
    assert [r["variant"] for r in data["rows"]] == seen and data["baseline"] == "reference"
    assert data["settings"]["skipped"] == {"+cuda_graph": "needs CUDA"}
    assert all("items_per_s" not in r for r in data["rows"] if "error" in r)


def test_step_only_runs_rows_in_its_order_and_an_abort_keeps_the_first(tmp_path, monkeypatch) -> None:
    from benchmarks import step

    seen = []

    def fake_row(v, args, device):
        seen.append(v.name)
        if len(seen) == 2:
            raise KeyboardInterrupt  # not a row's failure: the run stops here
        return {"measurement": _fake_measurement()}

    monkeypatch.setattr(step, "run_variant", fake_row)
    with pytest.raises(KeyboardInterrupt):
        step.main([*STEP_ARGS, "--only", "+augmentation,reference,+cuda_graph", "--name", "head",
                   "--out", str(tmp_path)])
    assert seen == ["+augmentation", "reference"]  # +cuda_graph: not on the CPU
    data = load_result(tmp_path / f"head-cpu{os.cpu_count()}.json")
    assert [r["variant"] for r in data["rows"]] == ["+augmentation"] and data["baseline"] is None
    with pytest.raises(SystemExit) as e:
        step.main([*STEP_ARGS, "--only", "+fp8"])
    assert e.value.code == 2


def test_step_sigterm_records_the_row_and_writes(tmp_path, monkeypatch) -> None:
    from benchmarks import step

    def fake_row(v, args, device):
        if v.name == "+channels_last":
            os.kill(os.getpid(), signal.SIGTERM)  # the suite's stage timeout
        return {"measurement": _fake_measurement()}

    monkeypatch.setattr(step, "run_variant", fake_row)
    before = signal.getsignal(signal.SIGTERM)
    assert step.main([*STEP_ARGS, "--out", str(tmp_path)]) == 3
    assert signal.getsignal(signal.SIGTERM) == before
    data = load_result(tmp_path / f"step-cpu{os.cpu_count()}.json", keep_errors=True)
    assert _rows_on_disk(tmp_path / f"step-cpu{os.cpu_count()}.json") == [
        ("reference", None), ("+channels_last", "interrupted by SIGTERM")]
    assert data["settings"]["interrupted"] == "SIGTERM during +channels_last"


def test_loaders_failed_variant_is_recorded_and_the_rest_measured(tmp_path, monkeypatch) -> None:
    from benchmarks import loaders

    path = tmp_path / f"loaders_photo-cpu{os.cpu_count()}.json"
    fake_paths = {"imagefolder": tmp_path, "none": tmp_path, "shards": tmp_path}
    monkeypatch.setattr(loaders, "prepare", lambda args, names, cache: (fake_paths, {"images_per_epoch": 8}))

    def fake_variant(name, data_path, args, common):
        if name == "pil_full":
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")
        if name == "nvjpeg":
            assert _rows_on_disk(path) == [("synthetic", None), ("pil_full", "out of memory")]
        return _fake_measurement(50.0)

    monkeypatch.setattr(loaders, "measure_variant", fake_variant)
    assert loaders.main(["--smoke", "--backends", "synthetic,pil_full,nvjpeg", "--out", str(tmp_path)]) == 1
    data = load_result(path, keep_errors=True)
    # The ceiling of nvjpeg's kernels runs over the (empty) image folder: its own error row.
    assert _rows_on_disk(path) == [
        ("synthetic", None), ("pil_full", "out of memory"), ("nvjpeg", None),
        ("ceiling: torchvision", "ValueError: torchvision ceiling: no images to measure it on")]
    assert data["baseline"] is None  # pil_full failed: no ratios
    assert data["rows"][1]["data_format"] == "imagefolder"


def test_loaders_shards_need_data(tmp_path) -> None:
    from benchmarks import loaders

    with pytest.raises(SystemExit) as e:
        loaders.main(["--smoke", "--shards", str(tmp_path)])
    assert e.value.code == 2


# ------------------------------------------------------------------ benchmark scripts' smoke


def _env(out: Path) -> dict[str, str]:
    return {**os.environ, "OUT": str(out), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
            "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}


OTHER_SCRIPTS = sorted(p.name for p in BENCH.glob("*.py")
                       if not p.name.startswith("_") and p.name != "report.py"
                       and p.name not in SUITE_SCRIPTS)


@pytest.mark.parametrize("script", OTHER_SCRIPTS or [pytest.param(None, marks=pytest.mark.skip)])
def test_script_smoke_writes_valid_json(script, tmp_path) -> None:
    args = [a.format(out=tmp_path) for a in SMOKE_ARGS.get(script, ["--smoke", "--out", "{out}"])]
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = list(tmp_path.glob("*.json"))
    assert files, f"{script} --smoke wrote no JSON into {tmp_path}"
    for f in files:
        assert load_result(f)["rows"]


FULL_STAGES = ["env", "capture-tests", "step-headline", "data", "end-to-end", "cuda-tests", "step",
               "augment", "loaders"]
QUICK_STAGES = ["env", "capture-tests", "step-headline", "data", "loaders"]


def _run_suite(out: Path, *flags: str) -> subprocess.CompletedProcess:
    # The timeout: the suite's own worst case (450 s) and a little.
    return subprocess.run(["bash", str(BENCH / "gpu_suite.sh"), "--cpu-smoke", *flags], cwd=ROOT,
                          env=_env(out), capture_output=True, text=True, timeout=470)


def _stages_in_summary(stdout: str) -> list[tuple[str, str]]:
    summary = stdout.split("== summary", 1)[1].split("headline images/s", 1)[0]
    return re.findall(r"^(\S+) +(\S+) +\d+ s", summary, re.MULTILINE)


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("suite")
    return _run_suite(out), out


def test_gpu_suite_cpu_smoke_runs_every_stage(suite) -> None:
    proc, out = suite
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert _stages_in_summary(proc.stdout) == [(s, "ok") for s in FULL_STAGES], proc.stdout[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 6 and "gpu_suite.log" in files
    expected = {f"{s[:-3]}-cpu{os.cpu_count()}.json" for s in SUITE_SCRIPTS}
    expected.add(f"step_headline-cpu{os.cpu_count()}.json")
    assert expected <= set(files), files
    for name in expected:
        assert load_result(out / name)["rows"]
    headline = proc.stdout.split("headline images/s", 1)[1]
    assert re.search(r"\+augmentation / reference +\d+\.\d\dx", headline), headline
    assert re.search(r"\+cuda_graph +skipped: needs CUDA", headline), headline
    assert re.search(r"nvjpeg \(loader alone\) +[\d,.]+", headline), headline


def test_gpu_suite_quick_runs_the_headline_stages_only(tmp_path) -> None:
    proc = _run_suite(tmp_path, "--quick")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert _stages_in_summary(proc.stdout) == [(s, "ok") for s in QUICK_STAGES], proc.stdout[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gpu_suite.log", f"loaders-cpu{os.cpu_count()}.json", f"step_headline-cpu{os.cpu_count()}.json"]
    assert "end_to_end: no end_to_end-*.json from this run" in proc.stdout  # the summary copes


@pytest.mark.parametrize("flags, budget, stages", [
    ((), 450, FULL_STAGES), (("--quick",), 180, QUICK_STAGES)])
def test_gpu_suite_plan_fits_its_budget_and_the_help_says_so(flags, budget, stages) -> None:
    proc = subprocess.run(["bash", str(BENCH / "gpu_suite.sh"), "--plan", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == [*stages, "summary", "cleanup"]
    total = sum(int(a) + int(b) for a, b in re.findall(r"^  \S+ +(\d+) \+ (\d+) ", proc.stdout, re.MULTILINE))
    assert lines[-1] == f"worst case {total} s of a {budget} s budget" and total <= budget
    # The help's arithmetic is the script's: each stage's limit + grace, and the sum.
    help_text = subprocess.run(["bash", str(BENCH / "gpu_suite.sh"), "-h"], capture_output=True,
                               text=True, timeout=30).stdout
    rows = dict(re.findall(r"^  (\S+) +(\d+ \+ +\d+) ", help_text, re.MULTILINE))
    for line in lines[:-1]:
        name, limit, _, grace = line.split()[:4]
        assert re.sub(r" +", " ", rows[name]) == f"{limit} + {grace}", name
    mode = "quick" if flags else "full"
    assert re.search(rf"^  {mode}: .*= {total} s <= {budget} s$", help_text, re.MULTILINE), help_text


def test_gpu_suite_refuses_a_plan_over_budget(tmp_path) -> None:
    script = (BENCH / "gpu_suite.sh").read_text().replace(
        "stage loaders 20 5", "stage loaders 200 5")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "gpu_suite.sh").write_text(script)
    proc = subprocess.run(["bash", str(tmp_path / "benchmarks" / "gpu_suite.sh"), "--quick"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "over the 180 s budget" in proc.stderr, proc.stderr
    assert not (tmp_path / "benchmarks" / "results").exists()  # refused before running anything


def test_gpu_suite_refuses_unknown_arguments() -> None:
    proc = subprocess.run(["bash", str(BENCH / "gpu_suite.sh"), "--fast"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unknown argument '--fast'" in proc.stderr


def test_end_to_end_smoke_rows(suite) -> None:
    _, out = suite
    data = load_result(out / f"end_to_end-cpu{os.cpu_count()}.json")
    rows = {r["variant"]: r for r in data["rows"]}
    assert data["baseline"] == "pil_full + reference" and data["rows"][0]["variant"] == data["baseline"]
    assert data["settings"]["arch"] == "resnet18" and data["settings"]["image_size"] == 64
    official = rows["pil_full + reference"]
    # What the trainer built for the official recipe and for the fast variant.
    assert official["optimizer"] == "torch.SGD" and official["amp"] == "none"
    assert official["channels_last"] is False and official["mode"] == "eager"
    fast = rows["synthetic + fast"]
    assert fast["optimizer"] == "fastsiam.SGD(foreach)" and fast["amp"] == "bf16"
    assert {"step alone: reference", "step alone: fast (float32 views)",
            "loader alone: pil_full", "loader alone: synthetic"} <= set(rows)
    for r in data["rows"]:
        assert r["repeats"] == 2 and r["iters"] == 1 and r["warmup"] == 1
        if r["kind"] == "end_to_end":
            assert 0 <= r["data_wait"] <= 1 and r["bound"] in ("loader", "step")
    info = data["settings"]["data"]
    assert info["bytes_per_image"]["jpeg_files"] > 0
    assert info["decode_images_per_s_per_core"]["pil"] > 0


def test_end_to_end_bounds_from_the_ceilings() -> None:
    from benchmarks.end_to_end import add_bounds

    report = make_report("end_to_end", {
        "pil_full + reference": [50.0], "nvjpeg + fast": [90.0], "synthetic + fast": [95.0],
        "step alone: reference (float32 views)": [60.0], "step alone: fast": [100.0],
        "loader alone: pil_full": [200.0], "loader alone: nvjpeg": [150.0],
        "loader alone: synthetic": [20000.0],
    }, baseline="pil_full + reference")
    kinds = ["end_to_end"] * 3 + ["step_alone"] * 2 + ["loader_alone"] * 3
    keys = [{"backend": "pil_full", "step": "reference"}, {"backend": "nvjpeg", "step": "fast"},
            {"backend": "synthetic", "step": "fast"}]
    for row, kind, extra in zip(report.rows, kinds, [*keys, *[{}] * 5]):
        row.update(kind=kind, **extra)
    add_bounds(report)
    ref, fast, synthetic = report.rows[:3]
    # pil_full: step 60 < loader 200 -> step bound; 50/60 of it; per-image times 1/200, 1/60, 1/50.
    assert ref["bound"] == "step" and ref["step_alone"] == 60.0 and ref["loader_alone"] == 200.0
    assert ref["of_ceiling"] == round(50 / 60, 3)
    assert ref["overlap"] == round((1 / 200 + 1 / 60 - 1 / 50) / (1 / 200), 3)
    assert fast["bound"] == "step" and fast["of_ceiling"] == 0.9  # step 100 < loader 150
    # A loader 200x faster than the step: no overlap figure (it would be noise / 1/20000).
    assert synthetic["of_ceiling"] == 0.95 and "overlap" not in synthetic
    assert B.validate_result(report.to_dict()) == []


# ---------------------------------------------------------------------------------- report.py


def _fixture(benchmark: str, device: str, device_name: str, rows: dict[str, tuple[list[float], dict]],
             baseline: str | None) -> dict:
    report = BenchmarkReport(benchmark, "cpu", {"batch_size": 256, "note": "fixture"}, baseline)
    for name, (rates, extra) in rows.items():
        report.add(name, summarize(rates, items_per_call=256, iters=10, warmup=10), **extra)
    data = report.to_dict()
    data.update(device=device, device_name=device_name)
    return data


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))


@pytest.fixture()
def fixture_results(tmp_path) -> Path:
    res = tmp_path / "results"
    res.mkdir()
    e2e = {"kind": "end_to_end"}
    _write(res / "end_to_end-h100.json", _fixture("end_to_end", "cuda", "NVIDIA H100 80GB HBM3", {
        "pil_full + reference": ([400.0, 380.0, 420.0], {**e2e, "backend": "pil_full", "step": "reference"}),
        "nvjpeg + fast": ([3700.0, 3650.0, 3720.0], {**e2e, "backend": "nvjpeg", "step": "fast"}),
        "synthetic + fast": ([3900.0, 3890.0, 3910.0], {**e2e, "backend": "synthetic", "step": "fast"}),
        "step alone: fast": ([3800.0, 3790.0, 3810.0], {"kind": "step_alone", "step": "fast"}),
    }, "pil_full + reference"))
    _write(res / "loaders-cpu2.json", _fixture("loaders", "cpu", "CPU Test x2", {
        "pil_crop w1": ([40.0, 41.0, 39.0], {"workers": 1, "backend": "pil_crop"}),
        "pil_crop w2": ([80.0, 78.0, 82.0], {"workers": 2, "backend": "pil_crop"}),
        "ffcv w1": ([400.0, 410.0, 390.0], {"workers": 1, "backend": "ffcv"}),
        "ffcv w2": ([700.0, 720.0, 690.0], {"workers": 2, "backend": "ffcv"}),
    }, "pil_crop w2"))
    _write(res / "convert-cpu2.json", _fixture("convert", "cpu", "CPU Test x2", {
        "decode w1": ([100.0], {"workers": 1}), "decode w2": ([190.0], {"workers": 2}),
    }, None))
    broken = _fixture("step", "cpu", "CPU Test x2", {"reference": ([10.0], {})}, "reference")
    broken["rows"][0]["items_per_s"] = 11.0
    _write(res / "step-cpu2.json", broken)
    (res / "augment-cpu2.json").write_text("{")
    return res


def test_report_renders_fixture_results(fixture_results, tmp_path) -> None:
    from PIL import Image

    from benchmarks.report import render, series_of

    out = tmp_path / "BENCHMARKS.md"
    text = render(fixture_results, out, tmp_path / "plots")
    assert out.read_text() == text
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections[1].startswith("## end_to_end — NVIDIA H100 80GB HBM3")  # the order: e2e first
    assert any(s.startswith("## loaders — CPU Test x2") for s in sections)
    # Ratios against the run's own baseline (medians 400 and 3700): 9.25; ceilings get none.
    assert "| nvjpeg + fast | 3,700.0 | 3,650.0–3,720.0 | 9.25 |" in text
    assert "| step alone: fast | 3,800.0 | 3,790.0–3,810.0 | – |" in text
    assert "| ffcv w2 | 700.0 | 690.0–720.0 | 8.75 |" in text  # 700 / 80
    # The goals use the best combination that reads data: nvjpeg (not synthetic), 3700/3800.
    assert "best end-to-end `nvjpeg + fast` 3,700 images/s, 97% of its step alone" in text
    assert "≥ 95% goal met; ≥ 3,600 images/s goal met" in text
    # Bad files are listed with the reason, not rendered.
    left_out = text.split("## Result files left out", 1)[1]
    assert "step-cpu2.json: not a benchmark result" in left_out and "augment-cpu2.json: not JSON" in left_out
    # Every embedded image exists and is a PNG; loaders and convert get a workers plot.
    links = [line.split("](", 1)[1].rstrip(")\n") for line in text.splitlines() if line.startswith("![")]
    assert len(links) == 5  # 3 bar charts + 2 workers plots
    for link in links:
        with Image.open(out.parent / link) as im:
            assert im.format == "PNG" and im.width > 100
    assert "plots/loaders-cpu2-workers.png" in links and "plots/convert-cpu2-workers.png" in links
    assert series_of({"variant": "decode w2", "workers": 2}) == "decode"
    assert series_of({"variant": "x", "backend": "ffcv"}) == "ffcv"


def test_report_renders_failed_rows_as_run_errors(tmp_path) -> None:
    from benchmarks.report import render

    results = tmp_path / "results"
    report = BenchmarkReport("step", "cpu", {"batch_size": 256}, baseline="reference")
    report.add("reference", summarize([100.0, 90.0], items_per_call=256, iters=10, warmup=3))
    report.add_error("+cuda_graph", "out of memory")
    report.write(results)
    text = render(results, tmp_path / "B.md", tmp_path / "plots")
    assert "- errors: +cuda_graph: out of memory" in text
    assert "| reference | 95.0 | 90.0–100.0 | 1.00 |" in text and "| +cuda_graph |" not in text


def test_report_without_plots_and_cli_errors(fixture_results, tmp_path) -> None:
    from benchmarks.report import main, render

    text = render(fixture_results, tmp_path / "B.md", None)
    assert "![" not in text and "| nvjpeg + fast |" in text
    assert main(["--results", str(tmp_path / "nowhere"), "--out", str(tmp_path / "C.md")]) == 2


def test_step_count_writes_a_valid_counted_result(tmp_path) -> None:
    """benchmarks/step.py --count on fake CUDA: the captured step split into the model's
    convolutions and GEMMs and the rest, per function; the file passes the schema and
    report.py renders it as a count table."""
    from benchmarks.report import Result, table
    from benchmarks.step import main

    args = ["--count", "--arch", "resnet18", "--image-size", "32", "--batch-size", "2",
            "--dim", "64", "--pred-dim", "16", "--out", str(tmp_path)]
    assert main(args) == 0
    path = tmp_path / "step_count-fakecuda.json"
    data = B.load_result(path)
    rows = {r["variant"]: r for r in data["rows"]}
    whole, heavy, rest = (rows[k] for k in ("captured step", "model convolutions and GEMMs",
                                            "everything else"))
    assert whole["kernels"] == heavy["kernels"] + rest["kernels"] > 100
    assert whole["device_bytes"] == heavy["device_bytes"] + rest["device_bytes"]
    per_function = [r for name, r in rows.items() if name.startswith("else in ")]
    assert sum(r["device_bytes"] for r in per_function) == rest["device_bytes"]
    assert whole["ms_at_bandwidth"] == pytest.approx(whole["device_bytes"] / 3.35e12 * 1e3)
    assert "| captured step |" in table(Result(path, data))
    bad = {**data, "rows": [{**whole, "kernels": -1}]}
    assert B.validate_result(bad) == ["rows[0]: counts must be >= 0"]
