import pytest

from transfer_flow.storage.atomic import file_lock


def test_file_lock_keeps_a_second_holder_out_until_released(tmp_path):
    lock = tmp_path / "sub" / ".lock"
    with file_lock(lock):
        # flock locks belong to an open file: a second open of the same path is another holder.
        with pytest.raises(BlockingIOError):
            with file_lock(lock, wait=False):
                pass
    with file_lock(lock, wait=False) as handle:
        handle.write("mine")
    assert lock.read_text() == "mine"
