"""Batch-scoring benchmark: in-process vs Spark local[1] vs local[2], side by side in one run.

The image set is the bottle + Magnetic-Tile test images repeated (symlinks in a temporary folder, nothing
copied) up to ``--images``. Each engine runs in its own child process, one after the other, on the
same registered model version (``models:/adreg-<category>/<version>``):

- throughput: images / s of the whole job (model loading, reading, scoring, writing parquet; the Spark
  JVM start-up is timed separately and not included),
- peak memory: VmHWM (peak RSS) of the in-process job, and of every Spark Python worker (the processes
  forked by ``pyspark.daemon`` that run the UDF),
- scaling efficiency: local[2] / (2 x local[1]),
- memory vs job size: local[2] again on ``--big-images`` images (peak per worker must not grow).

    python -m benchmarks batch --images 2000 --big-images 10000          # the full run
    python -m benchmarks batch --images 120 --big-images 360 --label "reduced (shared cores)"

--update-docs writes the page docs/benchmarks/batch.md whole.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.harness import (child_result, command_line, machine_line, peak_rss_mib, proc_status, quiet,
                                run_child, status_bytes, write_page)

quiet()

GiB = 1024 ** 3
ABOUT = (
    "Batch scoring (`adreg score`) in-process vs Spark local[1] vs local[2], on one registered model version "
    "(`models:/adreg-<category>/<version>`). The image set is the bottle + Magnetic-Tile test images repeated "
    "through symlinks in a temporary folder up to the job size; each engine runs in its own child process, one "
    "after the other. `seconds` / `images/s` = the whole job (model loading, reading, scoring, writing parquet; "
    "the Spark JVM start-up is timed separately and not included); `peak memory per worker` = VmHWM (peak RSS) "
    "of the in-process job, and of the largest Spark Python worker (the processes forked by `pyspark.daemon` "
    "that run the UDF); `Spark JVM peak` = the driver + local executor JVM's peak RSS; `tasks` = Spark "
    "partitions. Targets: local[2] >= 0.8x in-process throughput; <= 1.5 GiB per worker, independent of the job "
    "size (local[2] again on the larger memory-run image set). Scaling efficiency = local[2] / (2 x local[1])."
)


def source_images() -> list[Path]:
    from adreg.data import default_data_root

    root = default_data_root()
    bottle = sorted((root / "mvtec_ad" / "bottle" / "test").rglob("*.png"))
    mtd = sorted(p for p in (root / "mtd").rglob("*.jpg"))
    if not bottle or not mtd:
        raise SystemExit(f"bottle / MTD test images not found under {root}")
    return bottle + mtd


def make_image_set(n: int, folder: Path) -> Path:
    """``n`` symlinks (cycling through the bottle + MTD test images) in sub-folders of 500."""
    sources = source_images()
    for i in range(n):
        src = sources[i % len(sources)]
        target = folder / f"part{i // 500:03d}" / f"img{i:06d}{src.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(src)
    return folder


class WorkerWatcher(threading.Thread):
    """Polls /proc for Spark Python workers (children of ``pyspark.daemon``) and keeps each one's peak RSS."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval, self.peaks, self.stop_event = interval, {}, threading.Event()
        self.jvm_peak = 0

    def sample(self) -> None:
        daemons, procs = set(), {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "pyspark.daemon" in cmd or "pyspark/daemon.py" in cmd:
                procs[int(entry)] = proc_status(int(entry))
            elif "org.apache.spark.deploy.SparkSubmit" in cmd:
                st = proc_status(int(entry))  # this job's JVM (driver + local executors)
                self.jvm_peak = max(self.jvm_peak, status_bytes(st, "VmHWM"), status_bytes(st, "VmRSS"))
        daemons = {pid for pid, st in procs.items() if int(st.get("PPid", 0)) not in procs}
        for pid, st in procs.items():
            if pid not in daemons:  # a forked worker
                self.peaks[pid] = max(self.peaks.get(pid, 0), status_bytes(st, "VmHWM"), status_bytes(st, "VmRSS"))

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            time.sleep(self.interval)


def run_one(args) -> dict:
    """One engine in this (child) process; its row."""
    from adreg.batch.score import ModelRef
    from adreg.names import category_of
    from adreg.registry import tracking

    tracking.configure(args.tracking_uri)
    ref = ModelRef(category_of(args.model_name), args.model_name, args.model_version, None)
    out = str(Path(args.workdir) / f"out-{args.one}-{re.sub(r'[^a-z0-9]', '', args.master or '')}-"
                                        f"{args.images_dir.name}-{time.time_ns()}")
    if args.one == "inprocess":
        from adreg.batch import score_images

        res = score_images("", [str(args.images_dir)], out, batch_size=args.batch_size, device="cpu", model=ref,
                           show_progress=False)
        import torch

        return {"engine": "in-process", "threads": torch.get_num_threads(), "images": res.scored,
                "failed": res.failed, "seconds": res.seconds, "images_per_s": res.images_per_s,
                "peak_rss_gib": peak_rss_mib() / 1024}
    from adreg.batch.spark import get_spark, score_with_spark

    t0 = time.perf_counter()
    spark = get_spark(args.master, batch_size=args.batch_size, task_cpus=1, app_name="adreg-batch-bench",
                      conf={"spark.driver.memory": "2g"})
    startup = time.perf_counter() - t0
    watcher = WorkerWatcher()
    watcher.start()
    try:
        res = score_with_spark("", [str(args.images_dir)], out, spark=spark, batch_size=args.batch_size,
                               device="cpu", model=ref)
        watcher.sample()
    finally:
        watcher.stop_event.set()
        spark.stop()
    peaks = sorted(watcher.peaks.values(), reverse=True)
    return {"engine": f"Spark {args.master}", "threads": 1, "images": res.scored, "failed": res.failed,
            "seconds": res.seconds, "images_per_s": res.images_per_s, "spark_startup_s": startup,
            "workers": len(peaks), "peak_rss_gib": (peaks[0] / GiB) if peaks else float("nan"),
            "jvm_peak_gib": watcher.jvm_peak / GiB,
            "worker_peaks_gib": [round(p / GiB, 3) for p in peaks], "partitions": res.extra.get("partitions")}


def child(engine: str, images_dir: Path, args, master: str | None = None) -> dict:
    """One engine's row, run in a child process (``run_one``)."""
    cmd = ["-m", "benchmarks.batch", "--one", engine, "--images-dir", str(images_dir), "--workdir", args.workdir,
           "--batch-size", str(args.batch_size), "--model-name", args.model_name,
           "--model-version", args.model_version, "--tracking-uri", args.tracking_uri]
    if master:
        cmd += ["--master", master]
    row = run_child(cmd)
    row.pop("peak_rss_mib")  # the child's own; a Spark row's peak is its largest worker's (peak_rss_gib)
    print(f"  {row['engine']:<16} {row['images']:>6} img  {row['seconds']:7.1f} s  "
          f"{row['images_per_s']:6.2f} img/s  peak {row['peak_rss_gib']:.2f} GiB"
          + (f"  JVM {row['jvm_peak_gib']:.2f} GiB, {row['partitions']} tasks" if 'jvm_peak_gib' in row else ""),
          flush=True)
    return row


def markdown(summary: dict, args) -> str:
    """The table and the targets of one run."""
    rows, big_row = summary["rows"], summary["big"]
    lines = ["| engine | threads per worker | images | tasks | seconds | images/s | peak memory per worker (GiB) "
             "| Spark JVM peak (GiB) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows + ([big_row] if big_row else []):
        name = r["engine"] + (" (memory run)" if r is big_row else "")
        lines.append(f"| {name} | {r['threads']} | {r['images']} | {r.get('partitions') or '-'} | {r['seconds']:.1f} "
                     f"| {r['images_per_s']:.2f} | {r['peak_rss_gib']:.2f} "
                     f"| {format(r['jvm_peak_gib'], '.2f') if 'jvm_peak_gib' in r else '-'} |")
    lines += ["", f"Spark local[2] / in-process throughput: {summary['spark2_vs_inprocess']:.2f}x (target >= 0.8)",
              f"scaling efficiency local[1] -> local[2]: {summary['scaling_efficiency']:.2f}"]
    if big_row:
        two = rows[2]
        lines.append(f"peak worker memory, {args.images} vs {args.big_images} images: {two['peak_rss_gib']:.2f} vs "
                     f"{big_row['peak_rss_gib']:.2f} GiB (target <= 1.5 GiB, independent of the image count)")
    head = f"{summary['model']}, batch {args.batch_size}" + (f", {args.label}" if args.label else "")
    return head + ":\n\n" + "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--category", default="bottle")
    p.add_argument("--alias", default="production")
    p.add_argument("--version")
    p.add_argument("--images", type=int, default=2000, help="images per throughput run (default 2000)")
    p.add_argument("--big-images", type=int, default=10000, help="images of the memory run (default 10000)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--label", default="", help="printed with the table (e.g. 'reduced, shared cores')")
    p.add_argument("--tracking-uri")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--update-docs", action="store_true", help="write docs/benchmarks/batch.md")
    # child-process arguments
    p.add_argument("--one", choices=["inprocess", "spark"], help=argparse.SUPPRESS)
    p.add_argument("--master", help=argparse.SUPPRESS)
    p.add_argument("--images-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--model-name", help=argparse.SUPPRESS)
    p.add_argument("--model-version", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.one:
        child_result(run_one(args))
        return 0

    from adreg.registry.resolve import resolve
    from adreg.registry import tracking

    args.tracking_uri = tracking.configure(args.tracking_uri)
    ref = resolve(args.category, args.version, args.alias)
    args.model_name, args.model_version = ref.name, ref.version
    with tempfile.TemporaryDirectory(prefix="adreg-batch-bench-") as tmp:
        args.workdir = tmp
        small = make_image_set(args.images, Path(tmp) / "small")
        print(f"{ref.uri}: {args.images} images (bottle + MTD test sets repeated), batch {args.batch_size}, "
              f"{os.cpu_count()} cores {args.label}", flush=True)
        rows = [child("inprocess", small, args), child("spark", small, args, "local[1]"),
                child("spark", small, args, "local[2]")]
        big_row = None
        if args.big_images:
            big = make_image_set(args.big_images, Path(tmp) / "big")
            big_row = child("spark", big, args, "local[2]")
    inproc, one, two = rows
    summary = {
        "label": args.label, "model": ref.uri, "images": args.images, "big_images": args.big_images,
        "rows": rows, "big": big_row,
        "spark2_vs_inprocess": two["images_per_s"] / inproc["images_per_s"],
        "scaling_efficiency": two["images_per_s"] / (2 * one["images_per_s"]),
    }
    table = markdown(summary, args)
    print("\n" + table)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    if args.update_docs:
        path = write_page("batch", "Batch scoring: throughput and memory", ABOUT, table,
                          command_line("batch", argv), machine=machine_line("cpu"))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
