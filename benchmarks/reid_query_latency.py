"""Re-ID retrieval latency: single-image top-10 queries against a gallery index of 100,000 embeddings.

Every query is one L2-normalised embedding searched alone through ``RetrievalIndex.search`` (the path of
``twinview reid query`` and the retrieval app, so the time includes the ``Hit`` records); the median and
p99 are over ``--queries`` queries after 20 warm-up ones, and recall@k is the share of the exact top-k
(a batch ``IndexFlatIP`` search) that the index returns. Two kinds of gallery:

- ``random``: unit vectors drawn uniformly on the sphere, where every item is nearly as far from a query
  as its nearest neighbours: the worst case for an approximate index.
- ``clustered``: like a re-ID gallery, random identity centres with ``--per-identity`` noisy samples of
  each (a sample is ``centre + noise * unit vector``, normalised); queries are new samples of those
  identities.

For each, the index that ``twinview.index.build_index`` writes for a gallery of that size is measured
beside the exact ``IndexFlatIP`` (build, load, latency, recall); then the exact scan at smaller sizes
(where it stops being fast sets ``APPROX_MIN_ROWS``), and with ``--sweep`` the HNSW and IVF parameters
that were tried, on raw faiss indexes searched on one thread like ``RetrievalIndex.search`` does.

    python benchmarks/reid_query_latency.py                 # 100,000 x 512-d (ResNet-18 features)
    python benchmarks/reid_query_latency.py --size 20000 --sweep
    python benchmarks/reid_query_latency.py --dim 2048      # ResNet-50 features

Writes ``benchmarks/results/reid_query_latency.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

import twinview.index as tv_index
from twinview.index import RetrievalIndex, build_index, faiss_threads, load_index
from twinview.provenance import cpu_cores, cpu_name

REPO = Path(__file__).resolve().parents[1]
WARMUP = 20


def machine() -> dict[str, object]:
    return {"cpu": cpu_name(), "cores": cpu_cores(), "load_average": round(os.getloadavg()[0], 1),
            "numpy": np.__version__, "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads()}


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def datasets(args: argparse.Namespace) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (gallery, queries)}`` for the random and the clustered gallery."""
    rng = np.random.default_rng(args.seed)
    n, q, d = args.size, WARMUP + args.queries, args.dim
    random = unit_rows(rng.standard_normal((n, d), dtype=np.float32)), \
        unit_rows(rng.standard_normal((q, d), dtype=np.float32))
    identities = max(1, n // args.per_identity)
    centres = unit_rows(rng.standard_normal((identities, d), dtype=np.float32))

    def samples(ids: np.ndarray) -> np.ndarray:
        noise = unit_rows(rng.standard_normal((len(ids), d), dtype=np.float32))
        return unit_rows(centres[ids] + args.noise * noise)

    clustered = samples(np.arange(n) % identities), samples(rng.integers(0, identities, q))
    return {name: data for name, data in (("random", random), ("clustered", clustered)) if name in args.data}


def exact_top(gallery: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    return index.search(queries, k)[1]


def recall(found: list[np.ndarray], truth: np.ndarray) -> float:
    """Mean share of each query's exact top-k among its returned ids (warm-up queries left out)."""
    return float(np.mean([len(np.intersect1d(f, t)) / len(t)
                          for f, t in zip(found[WARMUP:], truth[WARMUP:], strict=True)]))


def timed(search: Callable[[np.ndarray], np.ndarray], queries: np.ndarray) -> tuple[list[float], list]:
    """Per-query milliseconds after the warm-up, and every query's returned ids."""
    times_ms, found = [], []
    for i, q in enumerate(queries):
        tick = time.perf_counter()
        ids = search(q[None])
        if i >= WARMUP:
            times_ms.append(1000 * (time.perf_counter() - tick))
        found.append(ids)
    return times_ms, found


def stats(times_ms: list[float]) -> dict[str, float]:
    return {"median_ms": float(np.median(times_ms)), "p99_ms": float(np.percentile(times_ms, 99))}


@contextmanager
def approx_from(rows: int) -> Iterator[None]:
    """``build_index`` switches to the approximate index from ``rows`` on inside the block."""
    before = tv_index.APPROX_MIN_ROWS
    tv_index.APPROX_MIN_ROWS = rows
    try:
        yield
    finally:
        tv_index.APPROX_MIN_ROWS = before


def product(gallery: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int, tmp: Path,
            approx_min: int) -> tuple[dict[str, object], RetrievalIndex]:
    """Build, load and query through ``build_index`` / ``load_index`` / ``RetrievalIndex.search``."""
    records = [{"path": f"{i}", "pid": i % 751 + 1, "camid": i % 6 + 1} for i in range(len(gallery))]
    with approx_from(approx_min):
        tick = time.perf_counter()
        path = build_index(gallery, records, "bench", tmp / "index", overwrite=True)
        build_s = time.perf_counter() - tick
    tick = time.perf_counter()
    index = load_index(path)
    load_s = time.perf_counter() - tick
    times_ms, found = timed(lambda q: hit_ids(index, q, k), queries)
    row = {"index": index.meta["index_type"], "params": index.meta["index_params"], "size": len(gallery),
           **stats(times_ms), "recall": recall(found, truth), "build_s": build_s, "load_s": load_s,
           "latencies_ms": times_ms}
    return row, index


def hit_ids(index: RetrievalIndex, query: np.ndarray, k: int) -> np.ndarray:
    return np.array([int(hit.path) for hit in index.search(query, k)[0]])


def sweep(index: RetrievalIndex, build_s: float, gallery: np.ndarray, queries: np.ndarray, truth: np.ndarray,
          args: argparse.Namespace) -> list[dict[str, object]]:
    """The product's HNSW index at each ``--ef-search`` (through ``RetrievalIndex.search``), then raw faiss
    HNSW (``--hnsw``) and IVF (``--nlist`` x ``--nprobe``) indexes searched on one thread, as
    ``RetrievalIndex.search`` does for a single query."""
    rows, dim = [], gallery.shape[1]

    def measure(search: Callable[[np.ndarray], np.ndarray], name: str, params: dict[str, int],
                build_s: float) -> None:
        with faiss_threads(1):
            times_ms, found = timed(search, queries)
        rows.append({"index": name, "params": dict(params), "build_s": build_s, **stats(times_ms),
                     "recall": recall(found, truth)})
        row = rows[-1]
        print(f"  {name} {params}: {row['median_ms']:.2f} ms, recall {row['recall']:.4f}", flush=True)

    if isinstance(index.index, faiss.IndexHNSWFlat):
        default = index.index.hnsw.efSearch
        for ef_search in args.ef_search:
            index.index.hnsw.efSearch = ef_search
            measure(lambda q: hit_ids(index, q, args.k), "IndexHNSWFlat",
                    {**index.meta["index_params"], "efSearch": ef_search}, build_s)
        index.index.hnsw.efSearch = default
    for m, ef_construction in args.hnsw:
        raw = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        raw.hnsw.efConstruction = ef_construction
        tick = time.perf_counter()
        raw.add(gallery)
        raw_build_s = time.perf_counter() - tick
        for ef_search in args.ef_search:
            raw.hnsw.efSearch = ef_search
            measure(lambda q, raw=raw: raw.search(q, args.k)[1][0], "IndexHNSWFlat",
                    {"M": m, "efConstruction": ef_construction, "efSearch": ef_search}, raw_build_s)
    for nlist in args.nlist:
        raw = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        tick = time.perf_counter()
        raw.train(gallery)
        raw.add(gallery)
        raw_build_s = time.perf_counter() - tick
        for nprobe in args.nprobe:
            raw.nprobe = nprobe
            measure(lambda q, raw=raw: raw.search(q, args.k)[1][0], "IndexIVFFlat",
                    {"nlist": nlist, "nprobe": nprobe}, raw_build_s)
    return rows


def pairs(text: str) -> list[tuple[int, int]]:
    return [(int(m), int(ef)) for m, ef in (pair.split(":") for pair in text.split(",") if pair)]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def params_text(params: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in params.items()) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=100_000, help="embeddings in the index")
    parser.add_argument("--dim", type=int, default=512,
                        help="embedding size (512: ResNet-18, 2048: ResNet-50)")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=lambda text: text.split(","), default=["random", "clustered"],
                        help="galleries to measure, comma-separated: random, clustered")
    parser.add_argument("--per-identity", type=int, default=14,
                        help="gallery samples per identity of the clustered data (Market-1501: about 26)")
    parser.add_argument("--noise", type=float, default=0.75,
                        help="noise norm around a unit centre (0.75: same-identity cosine about 0.64)")
    parser.add_argument("--exact-sizes", type=ints, default=ints("10000,20000,50000"),
                        help="smaller galleries (of the first --data) on which the exact scan is timed")
    parser.add_argument("--ef-search", type=ints, default=ints("16,32,64,128,256"),
                        help="efSearch values tried on the HNSW index (and on those of --hnsw)")
    parser.add_argument("--hnsw", type=pairs, default=[],
                        help="more HNSW graphs to build and try, as M:efConstruction pairs, e.g. 16:40,32:40")
    parser.add_argument("--nlist", type=ints, default=ints("1024"), help="IVF lists to try ('' for none)")
    parser.add_argument("--nprobe", type=ints, default=ints("8,32,128"))
    parser.add_argument("--note", default="", help="a sentence added to the table's description (load etc.)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "reid_query_latency")
    args = parser.parse_args()

    started = time.perf_counter()
    info = machine()
    results: dict[str, object] = {
        "machine": info, "size": args.size, "dim": args.dim, "k": args.k, "queries": args.queries,
        "per_identity": args.per_identity, "noise": args.noise, "approx_min_rows": tv_index.APPROX_MIN_ROWS,
        "hnsw_params": tv_index.HNSW_PARAMS, "product": [], "exact_sizes": [], "sweep": []}
    data = datasets(args)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (gallery, queries) in data.items():
            truth = exact_top(gallery, queries, args.k)
            for approx_min in (args.size + 1, tv_index.APPROX_MIN_ROWS):
                row, index = product(gallery, queries, truth, args.k, Path(tmp), approx_min)
                results["product"].append({"data": name, **row})
                print(f"{name} {row['index']}: {row['median_ms']:.2f} ms, recall {row['recall']:.4f}",
                      flush=True)
            print(f"other parameters, {name}:", flush=True)
            results["sweep"] += [{"data": name, **r}
                                 for r in sweep(index, row["build_s"], gallery, queries, truth, args)]
            del index
        gallery, queries = next(iter(data.values()))
        for size in args.exact_sizes:
            truth = exact_top(gallery[:size], queries, args.k)
            row, _ = product(gallery[:size], queries, truth, args.k, Path(tmp), size + 1)
            results["exact_sizes"].append({k: v for k, v in row.items() if k != "latencies_ms"})

    results["minutes"] = (time.perf_counter() - started) / 60
    description = (
        f"`twinview.index`: {args.size:,} L2-normalised {args.dim}-d float32 embeddings; {args.queries} "
        f"single-image top-{args.k} queries after {WARMUP} warm-up, each through `RetrievalIndex.search` "
        "(one faiss thread, including `Hit` records). `random`: unit vectors uniform on the sphere; "
        f"`clustered`: {args.size // args.per_identity:,} identity centres, samples `centre + {args.noise} * "
        f"unit noise`, queries new samples. Recall@{args.k} against exact search. faiss {info['faiss']}, "
        f"numpy {info['numpy']}; `build_index` switches to the approximate index from "
        f"{tv_index.APPROX_MIN_ROWS:,} rows. Load average at the start: {info['load_average']}; the "
        f"script took {results['minutes']:.1f} min.{' ' + args.note if args.note else ''}")
    lines = [f"# Re-ID query latency ({info['cpu']}, {info['cores']} cores)", "", description, "",
             f"| data | index | parameters | median ms | p99 ms | recall@{args.k} | build s | load s |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['data']} | `{r['index']}` | {params_text(r['params'])} | {r['median_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {r['recall']:.4f} | {r['build_s']:.1f} | {r['load_s']:.2f} |"
              for r in results["product"]]
    lines += ["", f"Exact `IndexFlatIP` by gallery size ({next(iter(data))} data, through "
              "`RetrievalIndex.search`):", "",
              "| size | median ms | p99 ms |", "| ---: | ---: | ---: |"]
    lines += [f"| {r['size']:,} | {r['median_ms']:.2f} | {r['p99_ms']:.2f} |"
              for r in [*results["exact_sizes"], results["product"][0]]]
    if results["sweep"]:
        lines += ["", "Other parameters (one search thread; build on all threads):", "",
                  f"| data | index | parameters | build s | median ms | p99 ms | recall@{args.k} |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['data']} | `{r['index']}` | {params_text(r['params'])} | {r['build_s']:.1f} | "
                  f"{r['median_ms']:.2f} | {r['p99_ms']:.2f} | {r['recall']:.4f} |" for r in results["sweep"]]
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
