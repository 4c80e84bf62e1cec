"""Cost as the work grows: time and peak memory of both converters and one loader epoch.

ffcv's users report memory that grows with the dataset (ffcv issues #120 and #146). For each
size N the same photo-like JPEGs (a few hundred painted ones, repeated as links: decode cost
does not depend on having seen an image) are converted by ``to_ffcv.py`` (``--write-mode jpg
--max-resolution 256``) and ``to_dali.py``, and the .beton is read for one epoch by fastsiam's
ffcv loader (two 224 px views, batch 64, drop_last). Each job runs as its own process, the
command a user runs, and a sampler reads ``/proc`` every 50 ms for the whole process tree
(converters' pools, ffcv's writer process, loader threads):

- ``peak_private_mb``: the largest sum of ``Pss_Anon + Pss_Shmem`` over the tree (shared
  pages counted once), the memory the job holds: what runs a machine out of RAM;
- ``peak_file_mb``: the largest sum of ``Pss_File``, file pages mapped (a memory-mapped .beton
  read once): page cache the kernel reclaims under pressure, reported apart.

Goals: seconds per image flat in N (time linear) and ``peak_private_mb`` at the largest N
within 10% of the smallest's (``private_vs_smallest``). The load average is recorded.

    python benchmarks/scaling.py                              # 2k, 20k, 50k images, 2 workers
    python benchmarks/scaling.py --sizes 2000 20000 --workers 8 --cache /data/bench
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import _data  # noqa: E402
from benchmarks._harness import BenchmarkReport, Measurement  # noqa: E402

SAMPLE_S = 0.05
JOBS = ("to_ffcv", "to_dali", "ffcv_epoch")


def _tree(root: int) -> list[int]:
    """``root`` and its live descendants (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _memory_kb(pid: int) -> tuple[int, int]:
    """(Pss_Anon + Pss_Shmem, Pss_File) of ``pid`` in kB, zeros once it has exited.

    Proportional set sizes: a page shared by k processes (a forked pool's copy-on-write
    pages, shared memory) counts 1/k in each, so sums over the tree count it once.
    """
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Pss_Anon:", "Pss_File:", "Pss_Shmem:")):
                    key, value = line.split(":")
                    fields[key] = int(value.split()[0])
    except OSError:
        return 0, 0
    return fields.get("Pss_Anon", 0) + fields.get("Pss_Shmem", 0), fields.get("Pss_File", 0)


def run_sampled(cmd: list[str]) -> dict[str, float]:
    """Run ``cmd``; its wall seconds and the peak private and file-mapped MB of its tree."""
    peak = [0, 0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    done = threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_S):
            totals = [sum(x) for x in zip(*(_memory_kb(p) for p in _tree(proc.pid)))] or [0, 0]
            peak[0], peak[1] = max(peak[0], totals[0]), max(peak[1], totals[1])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({proc.returncode}): {err.strip()[-500:]}")
    return {"seconds": seconds, "peak_private_mb": peak[0] / 1024, "peak_file_mb": peak[1] / 1024}


def epoch(beton: str, workers: int, batch_size: int, image_size: int) -> int:
    """One epoch of fastsiam's ffcv loader over ``beton`` (the ``ffcv_epoch`` job's process)."""
    from fastsiam.data import build_loader

    loader = build_loader("ffcv", Path(beton), batch_size=batch_size, image_size=image_size,
                          workers=workers, device="cpu", seed=0)
    images = sum(len(batch.label) for batch in loader)
    print(images)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 50000])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--distinct", type=int, default=400, help="distinct painted images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--cache", type=Path, help="keep the painted images here (default: a temp dir)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 64 px views")
    p.add_argument("--out", help="folder for the JSON (default: $OUT, else benchmarks/results)")
    p.add_argument("--note", help="free text stored with the result (how loaded the machine was)")
    p.add_argument("--epoch-of", help=argparse.SUPPRESS)  # internal: the ffcv_epoch job
    args = p.parse_args(argv)
    if args.epoch_of:
        return epoch(args.epoch_of, args.workers, args.batch_size, args.image_size)
    if args.smoke:
        args.sizes, args.distinct, args.batch_size, args.image_size = [32, 64], 8, 8, 64
    with tempfile.TemporaryDirectory(prefix="scaling-bench-") as tmp:
        work = Path(tmp)
        cache = args.cache or work
        low, high = _data.STYLE_SIDES["photo"]
        painted = _data.make_toy(cache, classes=10, distinct=args.distinct, min_side=low,
                                 max_side=high, workers=args.workers, style="photo")
        distinct = len(_data.list_images(painted))
        load_before = os.getloadavg()[0]
        report = BenchmarkReport("scaling", "cpu", {
            "data": f"{_data.STYLE_NAMES['photo']}, {distinct} distinct images, {low}-{high} px, "
                    "repeated as links",
            "sizes": args.sizes, "workers": args.workers,
            "to_ffcv": "--write-mode jpg --max-resolution 256",
            "to_dali": "defaults (original JPEG bytes)",
            "ffcv_epoch": f"fastsiam's ffcv loader, two {args.image_size} px views, batch "
                          f"{args.batch_size}, one epoch",
            "sample_interval_s": SAMPLE_S, **({"note": args.note} if args.note else {})})
        smallest: dict[str, float] = {}
        py = sys.executable
        for n in sorted(args.sizes):
            copies = -(-n // distinct)
            folder = _data.repeat_folder(painted, work / f"x{copies}", copies)
            limit = ["--limit", str(-(-n // 10))]  # per class: N images over the 10 classes
            beton, shards = work / f"n{n}.beton", work / f"n{n}_shards"
            w = ["--workers", str(args.workers)]
            cmds = {
                "to_ffcv": [py, "data_prep/to_ffcv.py", "--src", str(folder), "--out", str(beton),
                            *limit, "--write-mode", "jpg", "--max-resolution", "256", *w, "--quiet"],
                "to_dali": [py, "data_prep/to_dali.py", "--src", str(folder), "--out", str(shards),
                            *limit, *w, "--quiet"],
                "ffcv_epoch": [py, str(Path(__file__).resolve()), "--epoch-of", str(beton), *w,
                               "--batch-size", str(args.batch_size), "--image-size",
                               str(args.image_size)],
            }
            images = -(-n // 10) * 10
            for job in JOBS:
                r = run_sampled(cmds[job])
                rate = images / r["seconds"]
                print(f"{job} {images}: {r['seconds']:.1f} s, {rate:.0f} images/s, private "
                      f"{r['peak_private_mb']:.0f} MB, file {r['peak_file_mb']:.0f} MB", file=sys.stderr)
                smallest.setdefault(job, r["peak_private_mb"])
                m = Measurement(rate, rate, rate, r["seconds"], 1, 1, 0, [rate])
                extra: dict[str, Any] = {
                    "images": images, "seconds": round(r["seconds"], 2),
                    "ms_per_image": round(1000 * r["seconds"] / images, 3),
                    "peak_private_mb": round(r["peak_private_mb"], 1),
                    "peak_file_mb": round(r["peak_file_mb"], 1),
                    "private_vs_smallest": round(r["peak_private_mb"] / smallest[job], 3)}
                report.add(f"{job} {images}", m, **extra)
            beton.unlink()
            shutil.rmtree(shards)
        report.settings["load_average_before_after"] = [round(load_before, 2),
                                                        round(os.getloadavg()[0], 2)]
        print(report.table())
        print(f"wrote {report.write(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
