"""The shared benchmark harness: timing with warm-up and repeats, environment capture, JSON output.

Every script under ``benchmarks/`` measures through :func:`measure` (or summarizes rates it
timed itself with :func:`summarize`) and records through :class:`BenchmarkReport`, so all
results share one schema (``SCHEMA_VERSION``, checked by :func:`validate_result`) that
``benchmarks/report.py`` renders into BENCHMARKS.md.

Timing rule: a *call* processes ``items_per_call`` images; one *repeat* times ``iters`` calls
after ``warmup`` untimed calls (warm-up happens once, before the first repeat). On CUDA the
device is synchronized before starting and before stopping the clock, so asynchronous kernel
launches are not mistaken for finished work. The reported rate is the median over repeats,
with the min-max spread.

Script contract (tested for every ``benchmarks/*.py`` but ``report.py``): ``--smoke`` runs in
seconds on the CPU, ``--out DIR`` writes the JSON there (``$OUT`` is the default destination
when set, else ``benchmarks/results/``).

The result file, ``<benchmark>-<device slug>.json``::

    schema          1
    benchmark       the script's name (step, augment, loaders, convert, end_to_end)
    baseline        the variant the other rows are compared against, or null
    settings        the run's fixed settings; conventional keys: batch_size, image_size,
                    workers, arch, note, skipped ({variant: why}), errors ([...]),
                    interrupted (why the run stopped early, e.g. a SIGTERM)
    command, git_commit, date (UTC, ISO 8601), device, device_name, cpu_count, python,
    torch_threads, versions ({torch, torchvision, numpy, ffcv, dali, pillow, cuda, cudnn})
    peak_host_memory_mb   {"process": peak RSS, "largest_child": peak RSS of a worker}
    rows            one per variant:
        variant                       unique name within the file
        items_per_s                   median over repeats (images/s unless said otherwise)
        items_per_s_min, _max         spread over repeats
        samples                       the rate of each repeat (len == repeats)
        seconds_per_call              mean time of one call over the timed repeats
        repeats, iters, warmup        how it was timed
        ... script-specific extras: peak_memory_mb (device), workers, backend, ...
      or, for a variant that failed, ``variant`` and ``error`` (one line: ``out of memory``,
      else ``<ExceptionType>: <message>``) and none of the numbers above: a script records
      the failure and goes on with the next row (:meth:`BenchmarkReport.add_error`).

The baseline is always a measured row: while it is not (yet) one, the file says null.
Numbers are finite everywhere (the JSON is written with ``allow_nan=False``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Measurement:
    """Throughput of one variant: ``items_per_s`` is the median over repeats."""

    items_per_s: float
    items_per_s_min: float
    items_per_s_max: float
    seconds_per_call: float
    repeats: int
    iters: int
    warmup: int
    samples: list[float] = field(default_factory=list)  # items/s of each repeat


def summarize(rates: Sequence[float], *, items_per_call: int, iters: int, warmup: int) -> Measurement:
    """A :class:`Measurement` from the rates (items/s) of timed repeats of ``iters`` calls.

    For benchmarks that time repeats themselves (the end-to-end benchmark reads the trainer's
    per-window images/s); :func:`measure` summarizes through here too.
    """
    rates = [float(r) for r in rates]
    if not rates or not all(math.isfinite(r) and r > 0 for r in rates):
        raise ValueError(f"summarize: need at least one positive finite rate, got {rates}")
    if items_per_call < 1 or iters < 1:
        raise ValueError(f"summarize: need items_per_call>=1 and iters>=1, got {items_per_call}, {iters}")
    # A repeat of rate r took items_per_call * iters / r seconds for iters calls.
    seconds_per_call = items_per_call * statistics.fmean(1.0 / r for r in rates)
    return Measurement(
        items_per_s=statistics.median(rates),
        items_per_s_min=min(rates),
        items_per_s_max=max(rates),
        seconds_per_call=seconds_per_call,
        repeats=len(rates),
        iters=iters,
        warmup=warmup,
        samples=rates,
    )


def measure(
    fn: Callable[[], Any],
    *,
    items_per_call: int,
    iters: int,
    repeats: int = 3,
    warmup: int = 1,
    device: str = "cpu",
    timer: Callable[[], float] = time.perf_counter,
    sync: Callable[[], None] | None = None,
) -> Measurement:
    """Time ``fn``: ``warmup`` untimed calls, then ``repeats`` timed groups of ``iters`` calls.

    Args:
        fn: one unit of work, processing ``items_per_call`` images.
        items_per_call: images (or samples) processed by one call.
        iters: calls per timed repeat.
        repeats: timed repeats; the median rate is reported.
        warmup: untimed calls before the first repeat (compilation, caches, cudnn autotune).
        device: ``"cuda..."`` synchronizes the GPU around each repeat.
        timer: the clock, replaceable for tests.
        sync: overrides the synchronization function (default: ``torch.cuda.synchronize`` on CUDA).
    """
    if iters < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"measure: need iters>=1, repeats>=1, warmup>=0; got {iters}, {repeats}, {warmup}")
    if sync is None:
        sync = _cuda_sync if str(device).startswith("cuda") else _no_sync
    for _ in range(warmup):
        fn()
    rates = []
    for _ in range(repeats):
        sync()
        start = timer()
        for _ in range(iters):
            fn()
        sync()
        elapsed = max(timer() - start, 1e-12)
        rates.append(items_per_call * iters / elapsed)
    return summarize(rates, items_per_call=items_per_call, iters=iters, warmup=warmup)


def _no_sync() -> None:
    pass


def _cuda_sync() -> None:
    import torch

    torch.cuda.synchronize()


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


#: The "device" of counted results: CUDA code traced on fake tensors (kernels and bytes, no time).
FAKE_CUDA = "fake-cuda"


def device_name(device: str) -> str:
    """A human name for the device: the GPU's name on CUDA, the CPU model otherwise."""
    if str(device) == FAKE_CUDA:
        return "fake CUDA (counted by fastsiam.testing.fake_cuda, no GPU)"
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {name} x{os.cpu_count()}"


def device_slug(device: str) -> str:
    """A short file-name-safe tag: e.g. ``h100``, ``a100``, ``cpu2``, ``fakecuda``."""
    if str(device) == FAKE_CUDA:
        return "fakecuda"
    if str(device).startswith("cuda"):
        name = device_name(device).lower()
        for tag in ("h200", "h100", "a100", "l40s", "l4", "v100", "a10", "t4", "rtx"):
            if tag in name:
                return tag
        return "".join(c for c in name if c.isalnum())[:16] or "cuda"
    return f"cpu{os.cpu_count()}"


def environment(device: str) -> dict[str, Any]:
    """What produced a result: versions, machine, command and commit."""
    torch = sys.modules.get("torch")  # read from torch only if the script uses it
    versions = {
        name: _version(*dists)
        for name, dists in [
            ("torch", ("torch",)),
            ("torchvision", ("torchvision",)),
            ("numpy", ("numpy",)),
            ("ffcv", ("ffcv",)),
            ("dali", ("nvidia-dali-cuda120", "nvidia-dali-cuda130", "nvidia-dali-cuda110")),
            ("pillow", ("pillow",)),
        ]
    }
    if torch is not None:
        versions["cuda"] = torch.version.cuda
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        versions["cudnn"] = str(cudnn) if cudnn else None
    from fastsiam.runtime import git_commit

    return {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "git_commit": git_commit(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "versions": versions,
    }


def peak_memory_mb(device: str) -> float | None:
    """Peak allocated device memory since the last reset, in MiB (None off CUDA)."""
    if not str(device).startswith("cuda"):
        return None
    import torch

    return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20


def reset_peak_memory(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats(torch.device(device))


def peak_host_memory_mb() -> dict[str, float | None]:
    """Peak resident memory of this process and of its largest finished child (loader workers)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return {"process": None, "largest_child": None}
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    unit = 1 / 2**20 if sys.platform == "darwin" else 1 / 2**10
    return {
        "process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit, 1),
        "largest_child": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * unit, 1),
    }


class BenchmarkReport:
    """Rows of one benchmark run, printed as a table and written as one JSON file.

    Args:
        benchmark: the script's name (``step``, ``loaders``, ...); part of the file name.
        device: the device measured (``cpu``, ``cuda``, ``cuda:1``).
        settings: the run's fixed settings (batch size, resolution, workers, ...).
        baseline: the variant other rows are compared against (ratios in the table/report).
    """

    def __init__(self, benchmark: str, device: str, settings: dict[str, Any], baseline: str | None = None):
        self.benchmark = benchmark
        self.device = device
        self.settings = dict(settings)
        self.baseline = baseline
        self.rows: list[dict[str, Any]] = []
        self.env = environment(device)

    def add(self, variant: str, m: Measurement, **extra: Any) -> dict[str, Any]:
        row = {"variant": variant, **asdict(m), **extra}
        self.rows.append(row)
        return row

    def add_count(self, variant: str, kernels: int, device_bytes: int, bandwidth: float,
                  **extra: Any) -> dict[str, Any]:
        """A counted row (fake CUDA, :func:`traffic_by_function`): kernels launched, device
        bytes read + written, and the milliseconds they take at ``bandwidth`` bytes/s."""
        row = {"variant": variant, "kernels": kernels, "device_bytes": device_bytes,
               "ms_at_bandwidth": device_bytes / bandwidth * 1e3, **extra}
        self.rows.append(row)
        return row

    def add_error(self, variant: str, error: str, **extra: Any) -> dict[str, Any]:
        """A row for a variant that failed (see :func:`error_message`): no numbers."""
        row = {"variant": variant, "error": error, **extra}
        self.rows.append(row)
        return row

    def to_dict(self) -> dict[str, Any]:
        measured = {r["variant"] for r in self.rows if "error" not in r}
        return {
            "schema": SCHEMA_VERSION,
            "benchmark": self.benchmark,
            # A file written after every row names its baseline once that row is measured.
            "baseline": self.baseline if self.baseline in measured else None,
            "settings": self.settings,
            **self.env,
            "peak_host_memory_mb": peak_host_memory_mb(),
            "rows": self.rows,
        }

    def table(self) -> str:
        base = baseline_row(self.to_dict())
        extra_keys = sorted({k for r in self.rows for k in r} - _ROW_CORE_KEYS)
        head = ["variant", "images/s", "min-max", *(["x baseline"] if base else []), *extra_keys]
        lines = []
        if self.rows and all(is_count_row(r) for r in self.rows):
            head = ["variant", "kernels", "GB", "ms at bandwidth", *extra_keys]
        for r in self.rows:
            if is_count_row(r):
                cells = [r["variant"], str(r["kernels"]), f"{r['device_bytes'] / 1e9:.3f}",
                         f"{r['ms_at_bandwidth']:.2f}"]
            elif "error" in r:  # the error column says why
                cells = [r["variant"], "-", "-", *(["-"] if base else [])]
            else:
                cells = [
                    r["variant"],
                    f"{r['items_per_s']:.1f}",
                    f"{r['items_per_s_min']:.1f}-{r['items_per_s_max']:.1f}",
                ]
                if base:
                    cells.append(f"{r['items_per_s'] / base['items_per_s']:.2f}")
            cells += [_fmt(r.get(k)) for k in extra_keys]
            lines.append(cells)
        widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        title = f"{self.benchmark} on {self.env['device_name']} ({_fmt(self.settings)})"
        return "\n".join([title, fmt.format(*head), *(fmt.format(*c) for c in lines)])

    def write(self, out_dir: str | os.PathLike[str] | None = None, name: str | None = None) -> Path:
        """Write ``<out_dir>/<benchmark>-<device>.json`` atomically; ``$OUT`` wins when set.

        Raises :class:`ResultError` (before writing anything) if the result breaks the schema.
        """
        from fastsiam.files import atomic_open

        data = self.to_dict()
        directory = Path(out_dir or os.environ.get("OUT") or RESULTS_DIR)
        path = directory / f"{name or self.benchmark}-{device_slug(self.device)}.json"
        problems = validate_result(data)
        if problems:
            raise ResultError(f"{path}: not written, the result breaks the schema: {problems[0]}"
                              + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        with atomic_open(path, "w") as f:
            json.dump(data, f, indent=2, allow_nan=False)
            f.write("\n")
        return path


_ROW_CORE_KEYS = {
    "variant", "items_per_s", "items_per_s_min", "items_per_s_max", "seconds_per_call",
    "repeats", "iters", "warmup", "samples", "kernels", "device_bytes", "ms_at_bandwidth",
}


def is_count_row(row: dict[str, Any]) -> bool:
    """A row of counted device traffic (no timing) rather than a measured rate."""
    return "device_bytes" in row


def traffic_by_function(ops: list[Any], package: str = "fastsiam") -> dict[str, tuple[int, int]]:
    """``{function: (kernels, bytes)}`` of traced kernels (``fastsiam.testing.fake_cuda``
    recorded with ``callers=True``), keyed by the innermost function of ``package`` (or the
    caller outside it) that launched them, in order of first launch."""
    out: dict[str, tuple[int, int]] = {}
    for op in ops:
        where = op.where or "?"
        path, _, func = where.partition(" in ")
        key = f"{Path(path.split(':')[0]).name}:{func}" if func else where
        kernels, nbytes = out.get(key, (0, 0))
        out[key] = (kernels + 1, nbytes + op.nbytes)
    return out


def is_out_of_memory(e: BaseException) -> bool:
    """A device allocation failure: ``torch.cuda.OutOfMemoryError`` or a RuntimeError saying so."""
    torch = sys.modules.get("torch")  # nothing to catch from torch if it was never imported
    if torch is not None and isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e)


def error_message(e: BaseException) -> str:
    """The one-line ``error`` of a failed row: ``out of memory``, else ``<Type>: <first line>``."""
    if is_out_of_memory(e):
        return "out of memory"
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return "-" if v is None else str(v)


# --------------------------------------------------------------------------------------------
# the schema


class ResultError(ValueError):
    """A result file that cannot be used: unreadable, not JSON, or not the schema."""


_TOP_TYPES: dict[str, tuple[type, ...]] = {
    "schema": (int,), "benchmark": (str,), "baseline": (str, type(None)), "settings": (dict,),
    "command": (str,), "git_commit": (str, type(None)), "date": (str,), "device": (str,),
    "device_name": (str,), "cpu_count": (int, type(None)), "python": (str,), "versions": (dict,),
    "rows": (list,),
}
_ROW_TYPES: dict[str, tuple[type, ...]] = {
    "variant": (str,), "items_per_s": (int, float), "items_per_s_min": (int, float),
    "items_per_s_max": (int, float), "seconds_per_call": (int, float), "repeats": (int,),
    "iters": (int,), "warmup": (int,), "samples": (list,),
}
_DATE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
_ERROR_ROW_TYPES: dict[str, tuple[type, ...]] = {"variant": (str,), "error": (str,)}


def validate_result(data: Any) -> list[str]:
    """Every way ``data`` (a loaded result) breaks the schema, as one-line messages; [] if valid."""
    if not isinstance(data, dict):
        return [f"top level must be an object, got {type(data).__name__}"]
    problems = [f"non-finite number at {where}" for where in _non_finite(data, "")]
    problems += _type_problems(data, _TOP_TYPES)
    if problems:
        return problems
    if data["schema"] != SCHEMA_VERSION:
        problems.append(f"'schema' is {data['schema']}, this code reads version {SCHEMA_VERSION}")
    if not _DATE.match(data["date"]):
        problems.append(f"'date' must look like 2025-01-31T12:00:00Z, got {data['date']!r}")
    for name, version in data["versions"].items():
        if not isinstance(version, (str, type(None))):
            problems.append(f"versions.{name} must be a string or null, got {version!r}")
    seen: set[str] = set()
    measured: set[str] = set()
    for i, row in enumerate(data["rows"]):
        problems += [f"rows[{i}]: {p}" for p in _row_problems(row)]
        if isinstance(row, dict) and isinstance(row.get("variant"), str):
            if row["variant"] in seen:
                problems.append(f"rows[{i}]: variant {row['variant']!r} appears twice")
            seen.add(row["variant"])
            if "error" not in row:
                measured.add(row["variant"])
    if data["baseline"] is not None and data["baseline"] not in measured:
        what = "a failed row" if data["baseline"] in seen else "not a row's variant"
        problems.append(f"baseline {data['baseline']!r} is {what}")
    return problems


def _type_problems(obj: dict, expected: dict[str, Any]) -> list[str]:
    """A missing key or a value of the wrong type (bool never counts as a number), per key."""
    problems = []
    for key, types in expected.items():
        if key not in obj:
            problems.append(f"missing key '{key}'")
        elif not isinstance(obj[key], types) or isinstance(obj[key], bool):
            problems.append(f"'{key}' must be {_names(types)}, got {obj[key]!r:.60}")
    return problems


_COUNT_ROW_TYPES: dict[str, tuple[type, ...]] = {
    "variant": (str,), "kernels": (int,), "device_bytes": (int,), "ms_at_bandwidth": (int, float),
}


def _row_problems(row: Any) -> list[str]:
    if not isinstance(row, dict):
        return [f"must be an object, got {type(row).__name__}"]
    if is_count_row(row):
        problems = _type_problems(row, _COUNT_ROW_TYPES)
        if not problems and (row["kernels"] < 0 or row["device_bytes"] < 0 or row["ms_at_bandwidth"] < 0):
            problems.append("counts must be >= 0")
        return problems
    if "error" in row:
        problems = _type_problems(row, _ERROR_ROW_TYPES)
        if not problems and (not row["error"].strip() or "\n" in row["error"]):
            problems.append(f"'error' must be one non-empty line, got {row['error']!r:.60}")
        numbers = sorted((set(_ROW_TYPES) - {"variant"}) & set(row))
        if numbers:
            problems.append(f"a failed row ('error') has no numbers, got {', '.join(numbers)}")
        return problems
    problems = _type_problems(row, _ROW_TYPES)
    if problems:
        return problems
    samples = row["samples"]
    rate, lo, hi = row["items_per_s"], row["items_per_s_min"], row["items_per_s_max"]
    if row["repeats"] < 1 or row["iters"] < 1 or row["warmup"] < 0:
        problems.append(f"need repeats>=1, iters>=1, warmup>=0, got {row['repeats']}, {row['iters']}, {row['warmup']}")
    if not (lo > 0 and row["seconds_per_call"] > 0):
        problems.append(f"rates and times must be positive (min {lo}, seconds_per_call {row['seconds_per_call']})")
    if not lo <= rate <= hi:
        problems.append(f"need items_per_s_min <= items_per_s <= items_per_s_max, got {lo} <= {rate} <= {hi}")
    if len(samples) != row["repeats"] or not all(isinstance(s, (int, float)) for s in samples):
        problems.append(f"'samples' must hold one rate per repeat ({row['repeats']}), got {samples!r:.60}")
    elif not (_close(statistics.median(samples), rate) and _close(min(samples), lo)
              and _close(max(samples), hi)):
        problems.append("items_per_s, _min and _max must be the median, min and max of 'samples'")
    return problems


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _names(types: tuple[type, ...]) -> str:
    words = {int: "an integer", float: "a number", str: "a string", dict: "an object",
             list: "a list", type(None): "null"}
    return " or ".join(dict.fromkeys(words[t] for t in types))


def _non_finite(value: Any, where: str) -> list[str]:
    if isinstance(value, float) and not math.isfinite(value):
        return [where or "top level"]
    if isinstance(value, dict):
        return [w for k, v in value.items() for w in _non_finite(v, f"{where}.{k}" if where else str(k))]
    if isinstance(value, list):
        return [w for i, v in enumerate(value) for w in _non_finite(v, f"{where}[{i}]")]
    return []


def load_result(path: str | os.PathLike[str], *, keep_errors: bool = False) -> dict[str, Any]:
    """Read and validate one result file; :class:`ResultError` names the file and the problem.

    Failed rows are moved to ``settings["errors"]`` (as ``"<variant>: <error>"``, after any
    errors already there), so that readers of rates (report.py's tables, plots and goals) see
    measured rows only; ``keep_errors=True`` returns the rows as written.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ResultError(f"{path}: cannot read: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultError(f"{path}: not JSON: {e}") from None
    problems = validate_result(data)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ResultError(f"{path}: not a benchmark result: {problems[0]}{more}")
    failed = [r for r in data["rows"] if "error" in r]
    if failed and not keep_errors:
        data["rows"] = [r for r in data["rows"] if "error" not in r]
        data["settings"]["errors"] = [*data["settings"].get("errors", []),
                                      *(f"{r['variant']}: {r['error']}" for r in failed)]
    return data


def baseline_row(result: dict[str, Any]) -> dict[str, Any] | None:
    """The row named by ``result["baseline"]``, if any."""
    return next((r for r in result["rows"] if r["variant"] == result.get("baseline")), None)
