"""Per-case segmentation metrics from MONAI, with empty masks handled explicitly.

For each foreground class c (one-hot masks P and G):

* Dice = 2|P∩G| / (|P| + |G|) (MONAI ``compute_dice``); both empty -> 1.0, exactly one empty -> 0.0.
* HD95: the 95th percentile of the symmetric surface distances in millimetres (MONAI
  ``compute_hausdorff_distance(percentile=95, spacing=...)``, Euclidean, voxel spacing from the affine).
  MONAI gives NaN when a mask is empty; here both empty -> 0.0 and exactly one empty -> the image
  diagonal in mm (the largest distance possible in the image), so means stay finite and such cases
  still count as the worst possible contour.
* Volume in mL = voxel count x voxel volume (mm^3) / 1000, for the prediction and the ground truth.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance


def one_hot(labels: np.ndarray | torch.Tensor, num_classes: int) -> torch.Tensor:
    """(spatial...) integer labels -> (1, num_classes, spatial...) float one-hot."""
    t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return torch.nn.functional.one_hot(t, num_classes).movedim(-1, 0)[None].float()


def case_metrics(pred: np.ndarray, truth: np.ndarray, labels: dict[int, str],
                 spacing: Sequence[float]) -> dict[str, float]:
    """Dice, HD95 (mm) and volumes (mL) per foreground class of one case; keys ``dice_<name>`` etc."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {truth.shape}")
    spacing = [float(s) for s in spacing]
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} values for a {pred.ndim}D mask")
    num_classes = max(labels) + 1
    p, g = one_hot(pred, num_classes), one_hot(truth, num_classes)
    dice = compute_dice(p, g, include_background=False, ignore_empty=False)[0]
    with warnings.catch_warnings():  # MONAI warns about empty masks; they are handled below
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(p, g, include_background=False, percentile=95, spacing=spacing)[0]
    diagonal = float(np.linalg.norm(np.asarray(pred.shape) * np.asarray(spacing)))
    voxel_ml = float(np.prod(spacing)) / 1000.0
    row: dict[str, float] = {}
    for c in range(1, num_classes):
        name = labels.get(c, str(c))
        p_any, g_any = bool(p[0, c].any()), bool(g[0, c].any())
        if not p_any and not g_any:
            d, h = 1.0, 0.0
        elif p_any != g_any:
            d, h = 0.0, diagonal
        else:
            d, h = float(dice[c - 1]), float(hd[c - 1])
        row[f"dice_{name}"] = d
        row[f"hd95_{name}"] = h
        row[f"volume_ml_pred_{name}"] = float(p[0, c].sum()) * voxel_ml
        row[f"volume_ml_true_{name}"] = float(g[0, c].sum()) * voxel_ml
    names = [labels.get(c, str(c)) for c in range(1, num_classes)]
    row["dice_mean"] = float(np.mean([row[f"dice_{n}"] for n in names]))
    row["hd95_mean"] = float(np.mean([row[f"hd95_{n}"] for n in names]))
    return row


def summarize(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean over cases of every numeric metric, plus the standard deviation of the mean Dice."""
    if not rows:
        raise ValueError("no cases to summarise")
    keys = [k for k, v in rows[0].items() if isinstance(v, float)]
    out = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    out["dice_mean_std"] = float(np.std([r["dice_mean"] for r in rows]))
    out["cases"] = float(len(rows))
    return out
