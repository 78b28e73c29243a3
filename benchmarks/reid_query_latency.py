"""Re-ID retrieval latency: single-image top-10 queries against a faiss index of 100,000 embeddings.

The index is built by ``downstream.reid.index.build_index`` (exact ``IndexFlatIP`` on L2-normalised
float32 rows) in a temporary folder and loaded back with ``load_index``; each query is one random
L2-normalised embedding searched alone through ``RetrievalIndex.search`` (so the time includes the
conversion to ``Hit`` records). Reports the median and p99 over ``--queries`` queries after 10 warm-up
queries.

    python benchmarks/reid_query_latency.py              # 512-d (ResNet-18 features)
    python benchmarks/reid_query_latency.py --dim 2048   # ResNet-50 features

Writes ``benchmarks/results/reid_query_latency.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from downstream.reid.index import build_index, load_index
from twinview.provenance import cpu_cores, cpu_name

REPO = Path(__file__).resolve().parents[1]
WARMUP = 10


def machine() -> dict[str, object]:
    return {"cpu": cpu_name(), "cores": cpu_cores(),
            "numpy": np.__version__, "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads()}


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=100_000, help="embeddings in the index")
    parser.add_argument("--dim", type=int, default=512,
                        help="embedding size (512: ResNet-18, 2048: ResNet-50)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="faiss OpenMP threads (0: faiss's default, one per core); 1 avoids spin-waiting "
                        "when the cores are busy with other work")
    parser.add_argument("--note", default="", help="a sentence added to the table's description (load etc.)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "reid_query_latency")
    args = parser.parse_args()

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    feats = unit_rows(rng, args.size, args.dim)
    records = [{"path": f"gallery/{i:06d}.jpg", "pid": i % 751 + 1, "camid": i % 6 + 1}
               for i in range(args.size)]
    queries = unit_rows(rng, WARMUP + args.queries, args.dim)
    with tempfile.TemporaryDirectory() as tmp:
        tick = time.perf_counter()
        path = build_index(feats, records, "bench", Path(tmp) / "index")
        build_s = time.perf_counter() - tick
        tick = time.perf_counter()
        index = load_index(path)
        load_s = time.perf_counter() - tick
        times_ms = []
        for i, q in enumerate(queries):
            tick = time.perf_counter()
            hits = index.search(q[None], args.k)
            if i >= WARMUP:
                times_ms.append(1000 * (time.perf_counter() - tick))
            assert len(hits[0]) == args.k
    median, p99 = float(np.median(times_ms)), float(np.percentile(times_ms, 99))

    info = machine()
    lines = [f"# Re-ID query latency ({info['cpu']}, {info['cores']} cores)", "",
             f"`downstream.reid.index`: exact `IndexFlatIP` over {args.size:,} random L2-normalised "
             f"{args.dim}-d float32 embeddings; {args.queries} single-image top-{args.k} queries after "
             f"{WARMUP} warm-up, each through `RetrievalIndex.search` (including `Hit` records). "
             f"faiss {info['faiss']} ({info['faiss_threads']} threads), numpy {info['numpy']}."
             f"{' ' + args.note if args.note else ''}", "",
             "| index size | dim | k | median ms | p99 ms | build s | load s |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| {args.size:,} | {args.dim} | {args.k} | {median:.2f} | {p99:.2f} | {build_s:.2f} | "
             f"{load_s:.2f} |"]
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table)
    args.out.with_suffix(".json").write_text(json.dumps({
        "machine": info, "size": args.size, "dim": args.dim, "k": args.k, "queries": args.queries,
        "median_ms": median, "p99_ms": p99, "build_s": build_s, "load_s": load_s, "latencies_ms": times_ms},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
