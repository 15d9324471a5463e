"""The inbox watcher: ready rules, debounce, exactly one announcement per dataset version across restarts."""
import json
import os
import threading
import time

import pytest

from transfer_flow.storage.errors import SettingsError
from transfer_flow.tasks.inbox import MARKER, STATE_FILE, InboxWatcher, snapshot


class Recorder:
    """Stands in for the event sender (the real one is exercised in test_trigger.py)."""

    def __init__(self, fail_times: int = 0):
        self.sent, self.fail_times = [], fail_times

    def __call__(self, announcement):
        if self.fail_times:
            self.fail_times -= 1
            raise ConnectionError("server restarting")
        self.sent.append(announcement.model_copy())


def add_dataset(inbox, name, files=("a/1.png", "b/2.png"), marker=True):
    folder = inbox / name
    for relative in files:
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(relative.encode())
    if marker:
        (folder / MARKER).touch()
    return folder


def test_a_dataset_is_announced_once_after_its_marker_and_a_stable_scan(tmp_path):
    add_dataset(tmp_path, "cats")
    add_dataset(tmp_path, "dogs", marker=False)
    emit = Recorder()
    watcher = InboxWatcher(tmp_path, emit=emit)
    assert watcher.scan() == []  # first sight: wait one scan in case it is still being copied
    announced = watcher.scan()
    assert [a.name for a in announced] == ["cats"]
    assert [a.event_id for a in emit.sent] == [a.event_id for a in announced]
    assert emit.sent[0].path == str(tmp_path / "cats") and emit.sent[0].files == 2 and announced[0].sent
    assert watcher.scan() == [] and watcher.scan() == []
    assert len(emit.sent) == 1  # dogs has no marker


def test_a_restarted_watcher_announces_nothing_twice(tmp_path):
    add_dataset(tmp_path, "cats")
    first = Recorder()
    InboxWatcher(tmp_path, emit=first).run(interval=0, max_scans=3)
    assert len(first.sent) == 1
    again = Recorder()
    InboxWatcher(tmp_path, emit=again).run(interval=0, max_scans=3)
    assert again.sent == []
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert list(state["announced"]) == [str(tmp_path / "cats")]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave nothing behind


def test_a_dataset_changed_after_its_announcement_is_announced_again_as_a_new_version(tmp_path):
    folder = add_dataset(tmp_path, "cats")
    emit = Recorder()
    InboxWatcher(tmp_path, emit=emit).run(interval=0, max_scans=2)
    (folder / "a" / "3.png").write_bytes(b"new image")
    restarted = InboxWatcher(tmp_path, emit=emit)
    restarted.run(interval=0, max_scans=3)
    assert [a.files for a in emit.sent] == [2, 3]
    assert emit.sent[0].version != emit.sent[1].version and emit.sent[0].event_id != emit.sent[1].event_id


def test_a_folder_still_changing_is_not_announced_until_a_scan_finds_it_unchanged(tmp_path):
    folder = add_dataset(tmp_path, "cats")  # marker copied early, images still arriving
    emit = Recorder()
    watcher = InboxWatcher(tmp_path, emit=emit)
    for i in range(3):
        watcher.scan()
        (folder / "a" / f"late_{i}.png").write_bytes(b"x" * (i + 1))
    assert emit.sent == []
    watcher.scan()
    watcher.scan()
    assert len(emit.sent) == 1 and emit.sent[0].files == 5


def test_quiet_mode_waits_until_nothing_changed_for_the_quiet_period(tmp_path):
    folder = add_dataset(tmp_path, "cats", marker=False)
    now = max(p.stat().st_mtime for p in folder.rglob("*") if p.is_file())
    clock = {"t": now + 5}
    emit = Recorder()
    watcher = InboxWatcher(tmp_path, ready="quiet", quiet_seconds=30, emit=emit, clock=lambda: clock["t"])
    watcher.scan()
    clock["t"] += 10
    watcher.scan()
    assert emit.sent == []  # stable, but only 15 s of quiet
    clock["t"] += 30
    watcher.scan()
    assert len(emit.sent) == 1


def test_quiet_mode_counts_from_first_sight_when_copies_keep_old_mtimes(tmp_path):
    folder = add_dataset(tmp_path, "cats", marker=False)
    for path in folder.rglob("*"):
        os.utime(path, (1_000_000, 1_000_000))  # `cp -p` of an old dataset: mtimes say "quiet for years"
    clock = {"t": 2_000_000.0}
    emit = Recorder()
    watcher = InboxWatcher(tmp_path, ready="quiet", quiet_seconds=30, emit=emit, clock=lambda: clock["t"])
    watcher.scan()
    clock["t"] += 5
    watcher.scan()
    assert emit.sent == []
    clock["t"] += 30
    watcher.scan()
    assert len(emit.sent) == 1


def test_an_announcement_interrupted_before_delivery_is_sent_again_with_the_same_event_id(tmp_path):
    add_dataset(tmp_path, "cats")
    failing = Recorder(fail_times=1)
    watcher = InboxWatcher(tmp_path, emit=failing)
    watcher.scan()
    with pytest.raises(ConnectionError):
        watcher.scan()
    pending = json.loads((tmp_path / STATE_FILE).read_text())["announced"][str(tmp_path / "cats")]
    assert pending["sent"] is False
    working = Recorder()
    InboxWatcher(tmp_path, emit=working).run(interval=0, max_scans=2)
    assert [a.event_id for a in working.sent] == [pending["event_id"]]  # the server drops the duplicate, if any


def test_hidden_folders_empty_folders_and_hidden_files_are_not_datasets(tmp_path):
    add_dataset(tmp_path, ".partial-upload")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / MARKER).touch()
    folder = add_dataset(tmp_path, "cats")
    before = snapshot(folder).version
    (folder / ".DS_Store").write_bytes(b"finder")
    (folder / MARKER).write_text("touched again")
    assert snapshot(folder).version == before
    emit = Recorder()
    InboxWatcher(tmp_path, emit=emit).run(interval=0, max_scans=2)
    assert [a.name for a in emit.sent] == ["cats"]


def test_the_run_loop_survives_a_failed_scan(tmp_path):
    add_dataset(tmp_path, "cats")
    emit = Recorder(fail_times=1)
    InboxWatcher(tmp_path, emit=emit).run(interval=0, max_scans=3)
    assert len(emit.sent) == 1


def test_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        InboxWatcher(tmp_path / "nope")
    with pytest.raises(SettingsError, match="quiet"):
        InboxWatcher(tmp_path, ready="soon")


def test_a_marker_wakes_the_watcher_without_waiting_for_the_next_scan(tmp_path):
    """Filesystem events, not the interval, start the scan that announces: with scans an hour apart,
    the marker alone gets the dataset announced."""
    folder = add_dataset(tmp_path, "cats", marker=False)
    emit, stop = Recorder(), threading.Event()
    watcher = threading.Thread(target=InboxWatcher(tmp_path, emit=emit).run, kwargs={"interval": 3600, "stop": stop})
    watcher.start()
    try:
        for _ in range(120):  # the marker is written (again) until the watcher, once started, sees it
            (folder / MARKER).write_text("done")
            time.sleep(0.5)
            if emit.sent:
                break
    finally:
        stop.set()
        watcher.join(timeout=30)
    assert not watcher.is_alive()  # stopping is prompt too: the stop event ends the wait
    assert [a.name for a in emit.sent] == ["cats"]
