"""Market-1501 evaluation speed: ``twinview.retrieval.market1501_scores`` (vectorised) against the per-query
reference loop ``twinview.retrieval._reference_scores``.

A seeded synthetic float32 distance matrix of the full Market-1501 test size (3,368 queries x 15,913
gallery images; 751 identities, 6 cameras, with junk (pid -1) and distractor (pid 0) gallery images;
true matches drawn closer on average). ``market1501_scores`` is timed as the median of ``--runs`` runs; the
reference loop runs once on the whole matrix when its estimate (from the first 100 queries) is under
``--ref-budget`` seconds, otherwise on a fixed prefix of the queries, scaled to the full size. Both must
give the same CMC and mAP (on the queries the reference saw).

    python benchmarks/reid_eval_speed.py

Writes ``benchmarks/results/reid_eval_speed.md`` and ``.json``. Target: ``market1501_scores`` within 2 s on
2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from twinview.provenance import cpu_cores, cpu_name
from twinview.retrieval import _reference_scores, market1501_scores

REPO = Path(__file__).resolve().parents[1]
N_QUERY, N_GALLERY, N_IDS, N_CAMS = 3368, 15913, 751, 6
N_DISTRACTOR, N_JUNK = 2500, 500
TARGET_S = 2.0


def machine() -> dict[str, object]:
    return {"cpu": cpu_name(), "cores": cpu_cores(), "numpy": np.__version__,
            "python": platform.python_version()}


def synthetic_market(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(distmat, q_pids, g_pids, q_camids, g_camids)`` of the full Market-1501 test size."""
    rng = np.random.default_rng(seed)
    ids = np.arange(1, N_IDS + 1)
    q_pids = np.concatenate([ids, rng.choice(ids, N_QUERY - N_IDS)])  # every identity queried
    n_real = N_GALLERY - N_DISTRACTOR - N_JUNK
    g_pids = np.concatenate([ids, rng.choice(ids, n_real - N_IDS), np.zeros(N_DISTRACTOR, np.int64),
                             np.full(N_JUNK, -1)])
    g_pids = g_pids[rng.permutation(N_GALLERY)]
    q_cams, g_cams = rng.integers(1, N_CAMS + 1, N_QUERY), rng.integers(1, N_CAMS + 1, N_GALLERY)
    distmat = rng.random((N_QUERY, N_GALLERY), dtype=np.float32)
    for start in range(0, N_QUERY, 256):  # true matches closer by U(0, 0.6)
        rows = slice(start, start + 256)
        same = q_pids[rows, None] == g_pids[None, :]
        distmat[rows] -= same * rng.random(same.shape, dtype=np.float32) * np.float32(0.6)
    return distmat, q_pids, g_pids, q_cams, g_cams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of market1501_scores (median)")
    parser.add_argument("--ref-budget", type=float, default=180.0,
                        help="seconds the reference loop may take on the full matrix, else a query subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="a sentence added to the table's description (load etc.)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "reid_eval_speed")
    args = parser.parse_args()

    data = synthetic_market(args.seed)
    distmat, q_pids, g_pids, q_cams, g_cams = data
    times = []
    for _ in range(args.runs):
        tick = time.perf_counter()
        full = market1501_scores(*data)
        times.append(time.perf_counter() - tick)
    fast_s = statistics.median(times)
    cmc, m_ap, m_inp = full.cmc, full.mAP, full.mINP

    tick = time.perf_counter()
    _reference_scores(distmat[:100], q_pids[:100], g_pids, q_cams[:100], g_cams)
    estimate = (time.perf_counter() - tick) * N_QUERY / 100
    n_ref = N_QUERY if estimate < args.ref_budget else max(100, int(N_QUERY * args.ref_budget / estimate))
    subset = (distmat[:n_ref], q_pids[:n_ref], g_pids, q_cams[:n_ref], g_cams)
    tick = time.perf_counter()
    ref = _reference_scores(*subset)
    ref_s = (time.perf_counter() - tick) * N_QUERY / n_ref
    fast = market1501_scores(*subset)
    np.testing.assert_allclose(fast.cmc, ref.cmc, rtol=0, atol=1e-6)
    assert abs(fast.mAP - ref.mAP) < 1e-9 and abs(fast.mINP - ref.mINP) < 1e-9, (fast, ref)

    info = machine()
    ref_note = ("whole matrix, once" if n_ref == N_QUERY
                else f"first {n_ref} queries once, scaled x{N_QUERY / n_ref:.2f} to {N_QUERY}")
    lines = [f"# Re-ID evaluation speed ({info['cpu']}, {info['cores']} cores)", "",
             f"Synthetic float32 distance matrix {N_QUERY:,} x {N_GALLERY:,} (Market-1501 test size: "
             f"{N_IDS} ids, {N_CAMS} cameras, {N_DISTRACTOR:,} distractors, {N_JUNK} junk; "
             f"seed {args.seed}); numpy {info['numpy']}, Python {info['python']}. Full-matrix result: "
             f"rank-1 {cmc[0]:.4f}, mAP {m_ap:.4f}, mINP {m_inp:.4f}; the reference loop gives the same "
             f"CMC, mAP and mINP on the queries it ran.{' ' + args.note if args.note else ''}", "",
             "| implementation | time (s) | how | speed-up |", "| --- | ---: | --- | ---: |",
             f"| `twinview.retrieval.market1501_scores` | {fast_s:.3f} | median of {args.runs} runs | "
             f"{ref_s / fast_s:.1f}x |",
             f"| `_reference_scores` (per-query loop) | {ref_s:.2f} | {ref_note} | 1.0x |", "",
             f"Target: market1501_scores within {TARGET_S:.0f} s: "
             f"{'met' if fast_s <= TARGET_S else 'NOT met'}."]
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table)
    args.out.with_suffix(".json").write_text(json.dumps({
        "machine": info, "shape": [N_QUERY, N_GALLERY], "seed": args.seed,
        "evaluate_s": {"median": fast_s, "runs": times},
        "reference_s": ref_s, "reference_queries": n_ref, "speedup": ref_s / fast_s,
        "rank1": float(cmc[0]), "mAP": m_ap, "mINP": m_inp, "target_s": TARGET_S,
        "target_met": fast_s <= TARGET_S}, indent=2) + "\n")


if __name__ == "__main__":
    main()
