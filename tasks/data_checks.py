"""Is the data clean? Three looks at the stored features that need no new extraction: a 2-D map of them,
training images whose label the other images contradict (suspect labels), and pairs of images with nearly
identical features (near-duplicates, a leakage warning when they straddle train and test).

Every check runs on one BLAS thread (threadpoolctl): the report stage shares the machine with whatever runs
beside it, and a threaded BLAS under a loaded machine made these small fits many times slower, not faster.
"""
from __future__ import annotations

import warnings

import numpy as np
from pydantic import BaseModel, Field
from threadpoolctl import threadpool_limits

from transfer_flow.storage.feature_store import FeatureStore, StoreContents, read_features
from transfer_flow.storage.report import FeatureMapPoints
from transfer_flow.storage.report_metrics import FeatureMapSummary, NearDuplicate, SuspectLabel
from transfer_flow.tasks.heads.standardise import floored_std

# --- the map of the features ----------------------------------------------------------------------------------

# t-SNE of 1,000 points for 500 iterations: ~2.5 s of CPU on the demo (bench/report_cost.py); 1,797 cost 6.5 s.
FEATURE_MAP_MAX_POINTS = 1000
FEATURE_MAP_ITERATIONS = 500  # half the default: classes have separated by then (1,000 iterations cost 5.5 s)
FEATURE_MAP_PCA_DIMS = 50  # t-SNE on 50 principal components, as its authors recommend: faster and less noisy
FEATURE_MAP_METHOD = f"t-SNE (scikit-learn) of the features' first {FEATURE_MAP_PCA_DIMS} principal components"

# --- suspect labels -------------------------------------------------------------------------------------------

# A training image is a suspect when a logistic regression trained without it (out of fold) gives its own label
# less than this probability and prefers another class. Measured on the demo digits (Lite0, 1,375 clean training
# images): BENCHMARKS.md lists how many clean images each cutoff flags and whether planted errors are found.
SUSPECT_CUTOFF = 0.1
SUSPECT_FOLDS = 3
SUSPECTS_LISTED = 100  # the worst first, in metrics.json; the report's gallery shows the first SUSPECTS_SHOWN
SUSPECTS_SHOWN = 48
# Out-of-fold scores need ranks, not the optimum's last digits: lbfgs stops at 100 iterations or a gradient
# tolerance of 1e-3, a third of the cost of 300 iterations at 1e-4 on the demo (bench/report_cost.py).
SUSPECT_MAX_ITER = 100
SUSPECT_TOL = 1e-3

# --- near-duplicates ------------------------------------------------------------------------------------------

# Cosine similarity of two images' standardised features (see comparable()) at or above which they are
# near-duplicates. Calibrated with bench/near_duplicates.py, Lite0 at 224 px (BENCHMARKS.md):
# - demo digits (1,797): JPEG re-encodes (q70) of 20 digits score 0.994-0.999 with their originals, all found;
#   the most similar pair of two different digits of one class scores 0.927 (99th percentile of each digit's
#   nearest: 0.869), so no pair of different digits is listed. A 1-pixel resize of these blocky 8x8-upscaled
#   digits scores 0.48-0.78 (nearest) or ~0 (bilinear): to Lite0 it is another digit, beyond any threshold.
# - photos (160 crops of scikit-learn's two sample photos): 1-pixel resizes score 0.968-0.998, all 40 found;
#   JPEG q70 re-encodes of the q90 crops 0.916-0.99, 11 of 20 found; 8 pairs of different, overlapping crops
#   of one photo score 0.95-0.974 and are listed (most similar different crops: 0.974).
NEAR_DUPLICATE_SIMILARITY = 0.95
NEAR_DUPLICATE_NEIGHBOURS = 5  # each image's nearest few: pairs, not all n² of them, so it scales
# The search compares every pair on the features' first NEAR_DUPLICATE_PROJECTION principal directions (fitted on a
# sample), where no pair is farther apart than in full: a pair too far apart there cannot reach the threshold, so only
# the pairs close there (all of them: a radius query, no ranking) are scored in full. Same pairs as a full search. At
# 22,000 rows x 1,280: 28.6 s for every pair, 2.9 s this way; 13.6 s at the sample cap's 52,428 rows
# (bench/report_cost.py --store, BENCHMARKS.md).
NEAR_DUPLICATE_PROJECTION = 64
NEAR_DUPLICATE_PCA_SAMPLE = 4000
# Rows whose candidates are gathered at once: as many as keep a worst case (every row a candidate) to this many
# indices (128 MiB), between 64 and 1,024 rows (fewer, larger queries are faster: 1.7 s vs 2.1 s at 22,000 rows).
NEAR_DUPLICATE_QUERY_INDICES = 2**24
# A row with more candidates than this (thousands of copies of one image) is compared with every row in full instead,
# keeping its NEAR_DUPLICATE_NEIGHBOURS + 1 most similar: the report lists no more of a row's pairs.
NEAR_DUPLICATE_CROWDED = 4096
NEAR_DUPLICATES_LISTED = 100  # the pairs crossing train/test first, then the most similar

# All three read the stored features of view-0 rows; stores with more rows are sampled to this many bytes.
DATA_CHECK_MAX_BYTES = 256 * 2**20


class DataChecks(BaseModel, arbitrary_types_allowed=True):
    """What the checks found, for metrics.json and the report's pictures."""

    suspect_labels: list[SuspectLabel] = Field(default_factory=list)
    n_suspect_labels: int = 0
    near_duplicates: list[NearDuplicate] = Field(default_factory=list)
    n_near_duplicates: int = 0
    n_near_duplicates_crossing: int = 0
    suspect_cutoff: float = SUSPECT_CUTOFF
    near_duplicate_similarity: float = NEAR_DUPLICATE_SIMILARITY
    feature_map: FeatureMapSummary | None = None
    feature_map_points: FeatureMapPoints | None = None


def stratified_sample(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of `size` rows (all when fewer), each class in proportion to its share (to one row)."""
    labels = np.asarray(labels)
    if size >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    ranks = np.empty(len(labels))
    counts = np.bincount(labels)
    for label in np.unique(labels):
        members = order[labels[order] == label]  # this class in random order
        ranks[members] = (np.arange(len(members)) + 0.5) / counts[label]  # evenly spread over [0, 1)
    return np.sort(np.argsort(ranks, kind="stable")[:size])


def map_rows(labels: np.ndarray, is_test: np.ndarray, seed: int, cap: int = FEATURE_MAP_MAX_POINTS) -> np.ndarray:
    """The rows drawn on the map: every test row if they fit, the rest a stratified sample of the others."""
    test, other = np.flatnonzero(is_test), np.flatnonzero(~is_test)
    if len(test) >= cap:
        return np.sort(test[stratified_sample(labels[test], cap, seed)])
    kept = other[stratified_sample(labels[other], cap - len(test), seed)]
    return np.sort(np.concatenate([test, kept]))


def feature_map(features: np.ndarray, labels: np.ndarray, is_test: np.ndarray, is_wrong: np.ndarray,
                class_names: list[str], seed: int,
                total_rows: int) -> tuple[FeatureMapSummary, FeatureMapPoints] | None:
    """A 2-D t-SNE of the given rows (already sampled by map_rows); None when there are too few to place, or
    fewer than 10 distinct ones."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n = len(features)
    if n < 10:
        return None
    reduced = PCA(n_components=min(FEATURE_MAP_PCA_DIMS, n - 1, features.shape[1]), random_state=seed)
    with threadpool_limits(1):
        components = reduced.fit_transform(np.asarray(features, np.float64))
        # Barnes-Hut t-SNE segfaults (scikit-learn's quadtree) when points coincide: constant features (random
        # weights at tiny sizes, float16 underflow) leave nothing to map. Scale-free test: distinct rows at 1e-4
        # of the spread; the map is then drawn on unit-spread components (t-SNE does not care about scale).
        spread = float(np.std(components)) if components.size else 0.0
        if not np.isfinite(spread) or spread == 0.0:
            return None
        components = components / spread
        if len(np.unique(np.round(components, 4), axis=0)) < 10:
            return None
        xy = TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed,
                  max_iter=FEATURE_MAP_ITERATIONS, n_jobs=1).fit_transform(components)
    points = FeatureMapPoints(x=xy[:, 0].tolist(), y=xy[:, 1].tolist(), labels=np.asarray(labels).tolist(),
                              is_test=np.asarray(is_test, bool).tolist(), is_wrong=np.asarray(is_wrong, bool).tolist(),
                              class_names=class_names)
    return FeatureMapSummary(method=FEATURE_MAP_METHOD, points=n, rows=total_rows), points


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, groups: list[str], c: float,
                              seed: int) -> np.ndarray | None:
    """Each row's class probabilities from a logistic regression that did not train on it, nor on any row of the
    same group (an image's augmented views, or identical files, share a content hash: one fold holds them all).
    None when some class has too few images for two folds."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict

    _, group_ids = np.unique(np.asarray(groups), return_inverse=True)
    images_per_class = [len(np.unique(group_ids[labels == label])) for label in np.unique(labels)]
    folds = min(SUSPECT_FOLDS, min(images_per_class))
    if folds < 2 or len(images_per_class) < 2:
        return None
    model = LogisticRegression(C=c, max_iter=SUSPECT_MAX_ITER, tol=SUSPECT_TOL)
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return cross_val_predict(model, features, labels, groups=group_ids, method="predict_proba",
                                 cv=StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed))


def suspect_labels(probabilities: np.ndarray, labels: np.ndarray, paths: list[str],
                   class_names: list[str]) -> list[SuspectLabel]:
    """Rows whose own label gets less than SUSPECT_CUTOFF out of fold while another class wins, the least
    likely label first. `probabilities` columns follow the classes present in `labels`, sorted."""
    present = np.unique(labels)
    own = probabilities[np.arange(len(labels)), np.searchsorted(present, labels)]
    best = present[np.argmax(probabilities, axis=1)]
    flagged = np.flatnonzero((own < SUSPECT_CUTOFF) & (best != labels))
    flagged = flagged[np.argsort(own[flagged], kind="stable")]
    return [SuspectLabel(path=paths[i], label=class_names[labels[i]], predicted=class_names[best[i]],
                         confidence=float(probabilities[i].max()), label_probability=float(own[i]))
            for i in flagged]


def comparable(features: np.ndarray) -> np.ndarray:
    """Unit-length rows of the features centred and scaled per feature (deviation floored as the heads floor it),
    so that cosine similarity compares what tells images apart. Raw CNN activations are all positive and share a
    large common part: on Lite0 demo digits half the digits had another at a raw cosine of 0.99 or more."""
    from sklearn.preprocessing import normalize

    # float32 rows, float64 sums: 0.08 s instead of 1.8 s at 22,000 x 1,280 for a float64 copy, within 6e-8.
    features = np.asarray(features, np.float32)
    centred = features - features.mean(axis=0, dtype=np.float64).astype(np.float32)
    deviation = np.sqrt(np.einsum("ij,ij->j", centred, centred, dtype=np.float64) / max(len(features), 1))
    centred /= floored_std(deviation).astype(np.float32)
    return normalize(centred, copy=False)


def row_dots(unit: np.ndarray, rows: np.ndarray, others: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """unit[rows[i]] · unit[others[i]] for each i, gathered a chunk at a time (one gather of 270k rows took 7 s)."""
    dots = np.empty(len(rows), np.float32)
    for start in range(0, len(rows), chunk):
        end = start + chunk
        dots[start:end] = np.einsum("ij,ij->i", unit[rows[start:end]], unit[others[start:end]])
    return dots


def most_similar(unit: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, other row, cosine) for every pair of unit rows that reaches NEAR_DUPLICATE_SIMILARITY, except that a row
    with more than NEAR_DUPLICATE_CROWDED candidates gets its NEAR_DUPLICATE_NEIGHBOURS + 1 most similar rows (itself
    among them) instead."""
    from sklearn.neighbors import NearestNeighbors
    from sklearn.utils.extmath import randomized_svd

    n = len(unit)
    # Orthonormal directions: a projected distance is never more than the full one, so |a - b|² <= 2 - 2 cos
    # holds there for every pair that reaches the threshold (slack for float32 rounding).
    bound = 2.0 - 2.0 * NEAR_DUPLICATE_SIMILARITY + 1e-4
    sample = unit[np.sort(np.random.default_rng(seed).permutation(n)[:NEAR_DUPLICATE_PCA_SAMPLE])]
    _, _, directions = randomized_svd(sample - sample.mean(axis=0), min(NEAR_DUPLICATE_PROJECTION, *sample.shape),
                                      random_state=seed)
    projected = unit @ directions.T.astype(np.float32)
    index = NearestNeighbors(radius=float(np.sqrt(bound)), algorithm="brute").fit(projected)
    query_rows = int(np.clip(NEAR_DUPLICATE_QUERY_INDICES // n, 64, 1024))
    rows, others, similarity, crowded = [], [], [], []
    for start in range(0, n, query_rows):
        candidates = index.radius_neighbors(projected[start:start + query_rows], return_distance=False)
        for row, found in enumerate(candidates, start):
            if len(found) > NEAR_DUPLICATE_CROWDED:
                crowded.append(row)
                continue
            # One row against its candidates: a quarter of the time of gathering both sides of every pair.
            dots = unit[found] @ unit[row]
            reach = dots >= NEAR_DUPLICATE_SIMILARITY
            rows.append(np.full(int(reach.sum()), row)), others.append(found[reach]), similarity.append(dots[reach])
    pending = np.array(crowded, int)
    if len(pending):  # crowded rows (many copies of one image): their nearest few in full, as a full search would
        neighbours = NearestNeighbors(n_neighbors=min(NEAR_DUPLICATE_NEIGHBOURS + 1, n),
                                      algorithm="brute").fit(unit).kneighbors(unit[pending], return_distance=False)
        row, other = np.repeat(pending, neighbours.shape[1]), neighbours.ravel()
        # Scored as every other pair: rows at the dataset's mean have no direction (0, not 1 - |0 - 0|² / 2).
        rows.append(row), others.append(other), similarity.append(row_dots(unit, row, other))
    return np.concatenate(rows), np.concatenate(others), np.concatenate(similarity)


def near_duplicates(features: np.ndarray, paths: list[str], splits: list[str], seed: int = 0) -> list[NearDuplicate]:
    """Pairs whose comparable() features have a cosine similarity of at least NEAR_DUPLICATE_SIMILARITY, each row
    paired with at most its NEAR_DUPLICATE_NEIGHBOURS most similar others; pairs across train/test first, then the
    most similar."""
    n = len(features)
    if n < 3:  # two rows centred are opposite: nothing to compare
        return []
    with threadpool_limits(1):
        rows, others, similarity = most_similar(comparable(features), seed)
    keep = (rows != others) & (similarity >= NEAR_DUPLICATE_SIMILARITY)
    rows, others, similarity = rows[keep], others[keep], similarity[keep]
    order = np.lexsort((-similarity, rows))  # by row, the most similar first
    rows, others, similarity = rows[order], others[order], similarity[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows)  # place within its row
    pairs: dict[tuple[int, int], float] = {}
    for i, other, value in zip(*(column[rank < NEAR_DUPLICATE_NEIGHBOURS] for column in (rows, others, similarity))):
        pair = (int(min(i, other)), int(max(i, other)))
        pairs[pair] = max(float(value), pairs.get(pair, -1.0))
    found = [NearDuplicate(paths=[paths[a], paths[b]], similarity=min(value, 1.0),
                           crosses_split=(splits[a] == "test") != (splits[b] == "test"))
             for (a, b), value in pairs.items()]
    return sorted(found, key=lambda pair: (not pair.crosses_split, -pair.similarity, pair.paths))


def check_data(store: FeatureStore, contents: StoreContents, test_rows: np.ndarray, wrong: np.ndarray, *, c: float,
               seed: int) -> DataChecks:
    """Run the three checks on a store. `test_rows` are the evaluated store rows and `wrong` marks those the head
    got wrong; `c` is the out-of-fold logistic regression's inverse regularisation (the head's chosen C)."""
    split = np.asarray(contents.split)
    images = np.flatnonzero(contents.view == 0)  # one row per image, every split
    most = max(2, DATA_CHECK_MAX_BYTES // (4 * store.feature_dim))
    if len(images) > most:  # a store too large to hold: the checks see a sample of it (the map samples anyway)
        images = images[map_rows(contents.labels[images], split[images] == "test", seed, most)]
    features = read_features(store, images)
    is_test = split[images] == "test"
    checks = DataChecks()

    pairs = near_duplicates(features, [contents.paths[i] for i in images], list(split[images]), seed)
    checks.near_duplicates, checks.n_near_duplicates = pairs[:NEAR_DUPLICATES_LISTED], len(pairs)
    checks.n_near_duplicates_crossing = sum(pair.crosses_split for pair in pairs)

    shown = map_rows(contents.labels[images], is_test, seed)
    is_wrong = np.isin(images[shown], np.asarray(test_rows)[np.asarray(wrong, bool)])
    drawn = feature_map(features[shown], contents.labels[images[shown]], is_test[shown], is_wrong,
                        contents.label_names, seed, total_rows=int((contents.view == 0).sum()))
    if drawn is not None:
        checks.feature_map, checks.feature_map_points = drawn

    # Suspects among the training images; their augmented views train the folds too, in their image's fold.
    train = np.flatnonzero(np.isin(split, ["train", "val"]))
    if len(train) > most:
        train = train[stratified_sample(contents.labels[train], most, seed)]
    labels = contents.labels[train]
    probabilities = out_of_fold_probabilities(read_features(store, train), labels,
                                              [contents.hashes[i] or str(i) for i in train], c, seed)
    if probabilities is not None:
        own = contents.view[train] == 0
        found = suspect_labels(probabilities[own], labels[own], [contents.paths[i] for i in train[own]],
                               contents.label_names)
        checks.suspect_labels, checks.n_suspect_labels = found[:SUSPECTS_LISTED], len(found)
    return checks
