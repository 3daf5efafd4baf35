"""How much two cores give on this machine right now, for the demo's CPU work.

Runs the demo's MinHash signature over 200 product pages in one process, then
split over as many processes as there are cores, and prints the speed-up. On
a shared VM this is well below the core count and moves with the host's load;
it bounds every speed-up the other benchmarks can show.

    .venv/bin/python benchmarks/machine_scaling.py
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "example_project"))

from parsel import Selector

from demo_catalogue.minhash import signature
from scrapy_speedup.demo.catalogue import product_page


def texts(count: int) -> list[str]:
    pages = (product_page(i, count) or b"" for i in range(count))
    return ["\n".join(Selector(text=p.decode()).css("section.description p::text").getall())
            for p in pages]


def work(chunk: list[str]) -> float:
    started = time.process_time()
    for text in chunk:
        signature(text)
    return time.process_time() - started


def main() -> None:
    cores = os.cpu_count() or 1
    sample = texts(200)
    started = time.perf_counter()
    work(sample)
    one = time.perf_counter() - started
    chunks = [sample[i::cores] for i in range(cores)]
    with ProcessPoolExecutor(cores) as pool:
        pool.submit(work, sample[:1]).result()  # workers started before timing
        started = time.perf_counter()
        list(pool.map(work, chunks))
        many = time.perf_counter() - started
    print(f"{len(sample)} MinHash signatures: 1 process {one:.2f} s, {cores} processes"
          f" {many:.2f} s: {one / many:.2f}x on {cores} cores")


if __name__ == "__main__":
    main()
