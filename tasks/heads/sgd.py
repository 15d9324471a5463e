"""sgd: a logistic-loss linear head trained out of core, the store read in blocks, never all at once."""
from __future__ import annotations

import numpy as np

from transfer_flow.tasks.heads.inputs import HeadInputs
from transfer_flow.tasks.heads.standardise import floored_std

# Passes when none is asked for: enough for ~SGD_ROW_UPDATES row updates, between the two bounds. Averaged SGD's
# test accuracy stops moving past ~200k updates (bench/sgd_epochs.py, BENCHMARKS.md): 16,456 rows lose 0.2 points
# at 5 passes and none at 10; 82,304 rows lose 0.06 at 3 passes, for a third of 10 passes' time. Small sets need the
# upper bound (450 Lite0 digits lose 2 points at 5 passes).
SGD_ROW_UPDATES = 200_000
SGD_MOST_EPOCHS = 10
SGD_FEWEST_EPOCHS = 2


def sgd_passes(rows: int) -> int:
    """How many passes over `rows` training rows the sgd head makes when no count is set."""
    return int(np.clip(-(-SGD_ROW_UPDATES // max(rows, 1)), SGD_FEWEST_EPOCHS, SGD_MOST_EPOCHS))


def fit_sgd(data: HeadInputs, settings) -> tuple[object, dict]:
    """One pass fits a StandardScaler incrementally (its deviations then floored: see standardise.py), then
    `sgd_epochs` passes of averaged SGDClassifier.partial_fit (logistic loss, one-vs-rest; its scores are a
    softmax over decision_function, see class_probabilities) over the blocks in a seeded, shuffled order.
    The val/ rows, when there are any, are held out and scored; otherwise the score is the accuracy on the train rows.
    """
    from sklearn.linear_model import SGDClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    rows, labels, is_val, block_rows = data.rows, data.labels, data.is_val, data.block_rows
    rng = np.random.default_rng(settings.seed)
    fit_rows, fit_labels = (rows[~is_val], labels[~is_val]) if is_val.any() else (rows, labels)
    epochs = settings.sgd_epochs or sgd_passes(len(fit_rows))
    blocks = [np.arange(start, min(start + block_rows, len(fit_rows))) for start in range(0, len(fit_rows), block_rows)]
    scaler = StandardScaler()
    for block in blocks:
        scaler.partial_fit(data.read(fit_rows[block]))
    scaler.scale_ = floored_std(np.sqrt(scaler.var_))
    # average=True: the averaged iterate (ASGD) is steadier than the last one (+3 points on 600 Lite0 digits);
    # n_jobs=-1: the one-vs-rest binary problems train on threads in parallel.
    sgd = SGDClassifier(loss="log_loss", alpha=settings.sgd_alpha, average=True, n_jobs=-1, random_state=settings.seed)
    classes = np.arange(data.n_classes)
    for _ in range(epochs):
        for b in rng.permutation(len(blocks)):
            block = blocks[b][rng.permutation(len(blocks[b]))]
            sgd.partial_fit(scaler.transform(data.read(fit_rows[block])), fit_labels[block], classes=classes)
    head = Pipeline([("scale", scaler), ("sgd", sgd)])
    score_rows, score_labels = (rows[is_val], labels[is_val]) if is_val.any() else (rows, labels)
    correct = sum(int((head.predict(data.read(score_rows[s:s + block_rows])) == score_labels[s:s + block_rows]).sum())
                  for s in range(0, len(score_rows), block_rows))
    return head, {"best_params": {"alpha": settings.sgd_alpha, "epochs": epochs},
                  "cv_score": correct / max(1, len(score_rows)),
                  "score_name": "val accuracy" if is_val.any() else "train accuracy"}
