import os

from tests.support import write_colour_images
from transfer_flow.storage.manifest import Manifest
from transfer_flow.tasks.hashing import hash_manifest
from transfer_flow.tasks.listing import list_dataset


def make(tmp_path):
    for name, colour in {"red": (220, 30, 30), "blue": (30, 40, 220)}.items():
        write_colour_images(tmp_path / "data" / name, colour, 4, seed=1)
    return tmp_path / "data"


def test_unchanged_files_are_not_read_again(tmp_path):
    root = make(tmp_path)
    first, stats = hash_manifest(list_dataset(root))
    assert stats.images_hashed == 8 and stats.bytes_hashed > 0
    assert len({r.content_hash for r in first.records}) == 8
    second, stats = hash_manifest(list_dataset(root), first)
    assert (stats.images_hashed, stats.images_reused) == (0, 8)
    assert second.fingerprint() == first.fingerprint()


def test_changed_bytes_are_seen_even_with_size_and_mtime_set_back(tmp_path):
    root = make(tmp_path)
    first, _ = hash_manifest(list_dataset(root))
    target = root / "red" / "img_001.png"
    before = os.stat(target)
    data = bytearray(target.read_bytes())
    data[-20] ^= 0xFF  # same size, other bytes
    target.write_bytes(bytes(data))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    second, stats = hash_manifest(list_dataset(root), first)
    assert stats.images_hashed == 1
    changed = {r.path for r in second.records} - {r.path for r in second.records
                                                   if r.content_hash in {f.content_hash for f in first.records}}
    assert changed == {"red/img_001.png"}
    assert second.fingerprint() != first.fingerprint()


def test_refresh_and_another_root_rehash_everything(tmp_path):
    root = make(tmp_path)
    first, _ = hash_manifest(list_dataset(root))
    _, stats = hash_manifest(list_dataset(root), first, refresh=True)
    assert stats.images_hashed == 8
    elsewhere = Manifest(**{**first.model_dump(), "root": "/somewhere/else"})
    _, stats = hash_manifest(list_dataset(root), elsewhere)
    assert stats.images_hashed == 8


def test_fingerprint_ignores_mtime_but_not_content(tmp_path):
    root = make(tmp_path)
    first, _ = hash_manifest(list_dataset(root))
    os.utime(root / "red" / "img_000.jpg", ns=(1, 1))
    touched, stats = hash_manifest(list_dataset(root), first)
    assert stats.images_hashed == 1 and touched.fingerprint() == first.fingerprint()
