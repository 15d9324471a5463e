"""Extraction as Prefect tasks on a real local Dask cluster gives the same rows as the in-process path."""
import numpy as np

from tests.support import FAST as FAST_ALL
from transfer_flow.flows.pipeline import transfer_learning
from transfer_flow.flows.settings import PipelineSettings
from transfer_flow.storage.feature_store import open_store, read_contents, read_features

FAST = {**FAST_ALL, "batch_size": 4}  # several batches per shard


def rows_by_path(store_path):
    store = open_store(store_path)
    contents = read_contents(store)
    features = read_features(store, np.arange(store.n_rows))
    return {p: (h, label, f) for p, h, label, f in zip(contents.paths, contents.hashes, contents.labels, features)}


def test_two_dask_workers_make_the_rows_one_process_makes(prefect_api, messy_dataset, tmp_path):
    local = transfer_learning(PipelineSettings(dataset=str(messy_dataset), output=str(tmp_path / "local"), **FAST))
    spread = transfer_learning(PipelineSettings(dataset=str(messy_dataset), output=str(tmp_path / "dask"), workers=2,
                                                shard_images=5, **FAST))
    assert spread.images_extracted == local.images_extracted == 28
    assert [s.path for s in spread.images_skipped] == [s.path for s in local.images_skipped]
    a, b = rows_by_path(tmp_path / "local" / "features.h5"), rows_by_path(tmp_path / "dask" / "features.h5")
    assert a.keys() == b.keys()
    for path, (digest, label, features) in a.items():
        assert b[path][:2] == (digest, label)
        np.testing.assert_allclose(b[path][2], features, rtol=1e-4, atol=1e-5)
    assert not list((tmp_path / "dask").glob("*.parts"))  # shards are gone once the store is complete
