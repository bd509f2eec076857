"""Loader throughput on fashion_mnist: images/s at batch 128, 0/1/2 worker processes, cache off and on.

    python benchmarks/bench_data.py [--data-dir DIR] [--batches 300] [--json]

fashion_mnist is prepared first when needed, from ``../shared/data/fashion_mnist`` (linked into the manual
dir) when those archives exist. "startup" is the time to the first batch (spawning workers; with the
cache, decoding the split into memory); "images/s" is measured over the following batches.
"""

import argparse
import json
import os
import time
from pathlib import Path

from ddpm_eqx.config import DataConfig
from ddpm_eqx.data import make_train_iterator, prepare_dataset, reads_from_memory

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion_mnist"


def prepare(data_dir: Path) -> None:
    manual = data_dir / "downloads" / "manual"
    if SHARED.is_dir():
        manual.mkdir(parents=True, exist_ok=True)
        for archive in SHARED.glob("*.gz"):
            if not (manual / archive.name).exists():
                (manual / archive.name).symlink_to(archive)
    prepare_dataset(DataConfig(dataset="fashion_mnist", data_dir=str(data_dir)))


def measure(cfg: DataConfig, batches: int, *, seed: int = 0, examples: int | None = None) -> dict[str, float | bool]:
    """The loader for ``cfg`` (``examples``: what the run draws in all, which decides the cache when
    ``cfg.cache`` is None): seconds to its first batch, images/s over ``batches`` more, and whether it
    gathers its batches from the decoded split. Also ``bench_train.py``'s loader figures."""
    start = time.perf_counter()
    it = make_train_iterator(cfg, seed=seed, examples=examples)
    next(it)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * cfg.batch_size / (time.perf_counter() - start)
    from_memory = reads_from_memory(it)
    it.close()
    return {"startup_s": startup, "images_per_s": rate, "from_memory": from_memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
    parser.add_argument("--batches", type=int, default=300, help="batches timed per setting (after the first)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()
    data_dir = Path(args.data_dir).expanduser()
    prepare(data_dir)

    results = []
    for cache in (False, True):
        for workers in (int(w) for w in args.workers.split(",")):
            cfg = DataConfig(
                dataset="fashion_mnist", data_dir=str(data_dir), batch_size=args.batch_size, cache=cache,
                num_workers=workers,
            )
            m = measure(cfg, args.batches)
            results.append({"cache": cache, "num_workers": workers, "startup_s": round(m["startup_s"], 2),
                            "images_per_s": round(m["images_per_s"])})
            if not args.json:
                r = results[-1]
                print(f"cache={cache!s:5}  workers={workers}  startup {r['startup_s']:6.2f} s  "
                      f"{r['images_per_s']:8,} images/s", flush=True)
    summary = {
        "dataset": "fashion_mnist", "batch_size": args.batch_size, "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2), "results": results,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"({os.cpu_count()} CPUs, load average {summary['load_average_1min']} at the end)")


if __name__ == "__main__":  # Grain workers are spawned: they re-import this file
    main()
