"""Market-1501 retrieval metrics (CMC, mAP, mINP) for re-ID evaluation, and their Markdown rendering.

The ranking itself is :func:`pretrain.evaluation.retrieval_scores` (vectorised over queries); this
module adds the re-ID checks on the identities and the report table.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pretrain.evaluation import JUNK_PID, RetrievalScores, retrieval_scores

DISTRACTOR_PID = 0
"""Gallery items with this identity are never a true match (Market-1501 "distractors", pid 0000)."""

Ids = Sequence[int] | np.ndarray


def evaluate_scores(distmat: np.ndarray, q_pids: Ids, g_pids: Ids, q_camids: Ids, g_camids: Ids,
                    max_rank: int = 50) -> RetrievalScores:
    """Market-1501 protocol (Zheng et al. 2015, "Scalable Person Re-identification: A Benchmark").

    Per query the gallery is ranked by ascending ``distmat`` (ties in gallery order). Gallery images
    with the query's pid *and* camera and junk images (pid -1) are ignored; distractors (pid 0) and
    every other identity are wrong matches. CMC, AP (mean precision at each true match) and INP
    (``m / r_m``, the precision at the hardest true match) average over the queries with at least one
    true match; the others are skipped and counted in ``num_skipped``.

    A query must be a real identity: query pid 0 (which would make distractors true matches) or -1
    is a ``ValueError``, as is a query set where no query has a true match.
    """
    q_pids = np.asarray(q_pids)
    bad = np.isin(q_pids, (JUNK_PID, DISTRACTOR_PID))
    if bad.any():
        raise ValueError(f"evaluate: queries {np.flatnonzero(bad)[:8].tolist()} have pid {JUNK_PID} (junk) "
                         f"or {DISTRACTOR_PID} (distractor); a query must be a real identity")
    if len(q_pids) == 0:
        raise ValueError("evaluate: no queries")
    return retrieval_scores(np.asarray(distmat), q_pids, np.asarray(g_pids), np.asarray(q_camids),
                            np.asarray(g_camids), max_rank)


def evaluate(distmat: np.ndarray, q_pids: Ids, g_pids: Ids, q_camids: Ids, g_camids: Ids,
             max_rank: int = 50) -> tuple[np.ndarray, float, float]:
    """``(cmc, mAP, mINP)`` under the Market-1501 protocol; see :func:`evaluate_scores`.

    ``cmc[r]`` is the rank-(r+1) accuracy, for ``r < min(max_rank, gallery size)``.
    """
    return evaluate_scores(distmat, q_pids, g_pids, q_camids, g_camids, max_rank).as_tuple()


def rank_table(cmc: np.ndarray, mAP: float, mINP: float, ranks: Sequence[int] = (1, 5, 10)) -> str:
    """A Markdown table (header, alignment row, one value row) of the given CMC ranks, mAP and mINP,
    in percent with one decimal; ends with a newline."""
    cmc = np.asarray(cmc)
    if any(r < 1 or r > len(cmc) for r in ranks):
        raise ValueError(f"rank_table: ranks {list(ranks)} outside the CMC curve's 1..{len(cmc)}")
    names = [f"Rank-{r}" for r in ranks] + ["mAP", "mINP"]
    values = [100 * float(cmc[r - 1]) for r in ranks] + [100 * mAP, 100 * mINP]
    return "\n".join(["| " + " | ".join(names) + " |", "|" + " ---: |" * len(names),
                      "| " + " | ".join(f"{v:.1f}" for v in values) + " |"]) + "\n"
