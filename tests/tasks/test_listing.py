import os
import re
from pathlib import Path

import pytest

from transfer_flow.storage.errors import DatasetError
from transfer_flow.tasks.listing import IMAGE_EXTENSIONS, list_dataset

running_as_root = hasattr(os, "geteuid") and os.geteuid() == 0


def write_file(path: Path, content: bytes = b"image") -> Path:
    """Listing reads names and stat only, so any bytes stand in for an image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def listed(manifest) -> dict[str, str]:
    return {record.path: record.label for record in manifest.records}


@pytest.fixture
def two_classes(tmp_path: Path) -> Path:
    root = tmp_path / "dataset"
    write_file(root / "cats" / "a.jpg")
    write_file(root / "dogs" / "b.jpg")
    return root


def test_class_is_first_folder_level_and_images_may_sit_deeper(tmp_path: Path) -> None:
    root = tmp_path / "dataset"
    write_file(root / "cats" / "2019" / "summer" / "a.jpg")
    write_file(root / "cats" / "b.png")
    write_file(root / "dogs" / "c.jpeg")

    manifest = list_dataset(root)

    assert manifest.class_names == ["cats", "dogs"]
    assert listed(manifest) == {"cats/2019/summer/a.jpg": "cats", "cats/b.png": "cats", "dogs/c.jpeg": "dogs"}
    assert manifest.root == str(root.resolve())
    assert manifest.ignored == {}
    assert manifest.folder_splits is False
    assert all(record.split is None for record in manifest.records)


def test_extensions_are_case_insensitive(tmp_path: Path) -> None:
    root = tmp_path / "dataset"
    names = ["a.JPG", "b.Jpeg", "c.PNG", "d.bmp", "e.GIF", "f.tif", "g.TIFF", "h.WebP"]
    for name in names:
        write_file(root / "cats" / name)
    write_file(root / "dogs" / "x.jpg")

    manifest = list_dataset(root)

    assert sorted(path for path, label in listed(manifest).items() if label == "cats") == [f"cats/{n}" for n in names]
    assert {os.path.splitext(name)[1].lower() for name in names} == IMAGE_EXTENSIONS


def test_hidden_non_image_and_top_level_files_are_counted_not_listed(two_classes: Path) -> None:
    write_file(two_classes / "cats" / ".thumb.jpg")
    write_file(two_classes / ".cache" / "cats" / "c.jpg")  # a hidden folder counts once
    write_file(two_classes / "dogs" / ".hidden_folder" / "d.jpg")
    write_file(two_classes / "dogs" / "notes.txt")
    write_file(two_classes / "dogs" / "deeper" / "labels.csv")
    write_file(two_classes / "loose.jpg")
    write_file(two_classes / "README.md")

    manifest = list_dataset(two_classes)

    assert listed(manifest) == {"cats/a.jpg": "cats", "dogs/b.jpg": "dogs"}
    assert manifest.ignored == {"hidden": 3, "not_image": 2, "top_level": 2}


def test_record_size_and_mtime_come_from_stat(two_classes: Path) -> None:
    image = write_file(two_classes / "cats" / "sized.png", b"12345")
    os.utime(image, ns=(1_000_000_000, 1_234_567_890_123))

    record = next(r for r in list_dataset(two_classes).records if r.path == "cats/sized.png")

    assert (record.size, record.mtime_ns) == (5, 1_234_567_890_123)


def test_symlink_loops_terminate_and_are_counted(two_classes: Path) -> None:
    (two_classes / "dogs" / "back_to_root").symlink_to("..")
    (two_classes / "cats" / "itself").symlink_to(".")
    (two_classes / "cats" / "ping.jpg").symlink_to("pong.jpg")
    (two_classes / "cats" / "pong.jpg").symlink_to("ping.jpg")

    manifest = list_dataset(two_classes)

    assert listed(manifest) == {"cats/a.jpg": "cats", "dogs/b.jpg": "dogs"}
    assert manifest.ignored == {"symlink_loop": 4}


def test_link_leaving_the_root_is_not_followed(tmp_path: Path, two_classes: Path) -> None:
    write_file(tmp_path / "outside" / "secret.jpg")
    (two_classes / "cats" / "outside_folder").symlink_to(tmp_path / "outside")
    (two_classes / "cats" / "outside_file.jpg").symlink_to(tmp_path / "outside" / "secret.jpg")
    (two_classes / "birds").symlink_to(tmp_path / "outside")
    (two_classes / "dogs" / "gone.jpg").symlink_to("missing.jpg")

    manifest = list_dataset(two_classes)

    assert listed(manifest) == {"cats/a.jpg": "cats", "dogs/b.jpg": "dogs"}
    assert manifest.ignored == {"broken_link": 1, "outside_root_link": 3}


def test_link_inside_the_root_is_followed_with_the_link_path(two_classes: Path) -> None:
    write_file(two_classes / ".store" / "tabby.jpg", b"1234567")
    (two_classes / "cats" / "stored").symlink_to("../.store")
    (two_classes / "dogs" / "pic.jpg").symlink_to("../.store/tabby.jpg")

    manifest = list_dataset(two_classes)

    assert listed(manifest) == {
        "cats/a.jpg": "cats",
        "cats/stored/tabby.jpg": "cats",  # reached through one link, the file link through one too; path order
        "dogs/b.jpg": "dogs",
    }
    assert next(r for r in manifest.records if r.path == "cats/stored/tabby.jpg").size == 7
    assert manifest.ignored == {"duplicate_link": 1, "hidden": 1}


def test_file_reached_twice_is_listed_once_at_its_real_place(two_classes: Path) -> None:
    (two_classes / "cats" / "alias.jpg").symlink_to("../dogs/b.jpg")
    (two_classes / "cats" / "all_dogs").symlink_to("../dogs")

    manifest = list_dataset(two_classes)

    assert listed(manifest) == {"cats/a.jpg": "cats", "dogs/b.jpg": "dogs"}
    assert manifest.ignored == {"duplicate_link": 2}


def test_empty_class_folder_is_dropped_and_named(two_classes: Path) -> None:
    write_file(two_classes / "birds" / "notes.txt")
    (two_classes / "fish" / "nested").mkdir(parents=True)

    manifest = list_dataset(two_classes)

    assert manifest.class_names == ["cats", "dogs"]
    assert manifest.dropped_classes == ["birds", "fish"]
    assert manifest.ignored == {"not_image": 1}


@pytest.mark.skipif(running_as_root, reason="root reads folders whatever their permissions")
def test_unreadable_sub_folder_is_counted_not_fatal(two_classes: Path) -> None:
    locked = two_classes / "dogs" / "locked"
    write_file(locked / "c.jpg")
    locked.chmod(0)
    try:
        manifest = list_dataset(two_classes)
    finally:
        locked.chmod(0o755)

    assert listed(manifest) == {"cats/a.jpg": "cats", "dogs/b.jpg": "dogs"}
    assert manifest.ignored == {"unreadable": 1}


def test_fewer_than_two_classes_is_an_error_saying_what_was_found(tmp_path: Path) -> None:
    root = tmp_path / "dataset"
    write_file(root / "cats" / "a.jpg")
    write_file(root / "dogs" / "readme.txt")

    with pytest.raises(DatasetError, match=r"Found 1 class with images \(cats\).*at least 2.*<class>/<image>"):
        list_dataset(root)


def test_no_class_at_all_is_an_error(tmp_path: Path) -> None:
    write_file(tmp_path / "loose.jpg")

    with pytest.raises(DatasetError, match="Found 0 classes with images"):
        list_dataset(tmp_path)


@pytest.mark.parametrize("make_root", ["missing", "file"])
def test_root_that_is_not_a_folder_is_an_error_naming_it(tmp_path: Path, make_root: str) -> None:
    root = tmp_path / "dataset"
    if make_root == "file":
        write_file(root)

    with pytest.raises(DatasetError, match=re.escape(str(root))) as raised:
        list_dataset(str(root))
    assert "\n" not in str(raised.value)


@pytest.fixture
def split_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "dataset"
    for path in ["train/cats/a.jpg", "train/cats/b.jpg", "train/dogs/c.jpg", "test/cats/d.jpg", "test/dogs/e.jpg",
                 "val/dogs/f.jpg"]:
        write_file(root / path)
    return root


def test_train_test_folders_give_the_split(split_dataset: Path) -> None:
    write_file(split_dataset / "README.md")
    write_file(split_dataset / "extra" / "cats" / "g.jpg")
    write_file(split_dataset / "train" / "loose.jpg")
    (split_dataset / "train" / "birds").mkdir()

    manifest = list_dataset(split_dataset)

    assert manifest.folder_splits is True
    assert manifest.class_names == ["cats", "dogs"]
    assert {r.path: (r.split, r.label) for r in manifest.records} == {
        "train/cats/a.jpg": ("train", "cats"),
        "train/cats/b.jpg": ("train", "cats"),
        "train/dogs/c.jpg": ("train", "dogs"),
        "test/cats/d.jpg": ("test", "cats"),
        "test/dogs/e.jpg": ("test", "dogs"),
        "val/dogs/f.jpg": ("val", "dogs"),
    }
    assert manifest.ignored == {"top_level": 3}
    assert manifest.dropped_classes == ["birds"]


def test_class_evaluated_but_never_trained_is_an_error(split_dataset: Path) -> None:
    write_file(split_dataset / "val" / "birds" / "g.jpg")

    with pytest.raises(DatasetError, match=r"val/ with no image in train/: birds"):
        list_dataset(split_dataset)


def test_train_folder_without_test_folder_is_just_a_class(tmp_path: Path) -> None:
    write_file(tmp_path / "train" / "a.jpg")
    write_file(tmp_path / "val" / "b.jpg")

    manifest = list_dataset(tmp_path)

    assert manifest.folder_splits is False
    assert manifest.class_names == ["train", "val"]


def test_order_is_a_deterministic_function_of_listing_and_seed(tmp_path: Path) -> None:
    root = tmp_path / "dataset"
    for index in range(20):
        write_file(root / ("cats" if index % 2 else "dogs") / f"{index:02d}.jpg")

    def order(seed: int) -> list[str]:
        return [record.path for record in list_dataset(root, seed=seed).records]

    assert order(7) == order(7)
    assert order(7) != order(8)
    assert order(7) != sorted(order(7))
    assert sorted(order(7)) == sorted(order(8))
    assert list_dataset(root).fingerprint() == list_dataset(root, seed=42).fingerprint()
