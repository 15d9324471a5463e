import json
import subprocess
import sys

import pytest

from transfer_flow.storage.errors import OutputExistsError, OutputLockedError
from transfer_flow.storage.output_layout import LOCK_FILE, OutputLayout

HOLD_LOCK = """
import sys, time
from transfer_flow.storage.output_layout import OutputLayout
with OutputLayout(root=sys.argv[1]).locked():
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_while_the_first_holds_the_output(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError, match=f"pid {holder.pid}"):
            with OutputLayout(root=str(tmp_path)).locked():
                pass
    finally:
        holder.kill()
        holder.wait()
    # The OS drops the lock with its (killed) holder: no stale lock.
    with OutputLayout(root=str(tmp_path)).locked():
        assert (tmp_path / LOCK_FILE).exists()


def test_stale_temporaries_of_a_killed_run_are_removed_under_the_lock(tmp_path):
    (tmp_path / ".features.h5.abc123.tmp").mkdir()
    (tmp_path / ".features.h5.abc123.tmp" / "features.h5").write_bytes(b"half")
    (tmp_path / ".unrelated.tmp").mkdir()
    with OutputLayout(root=str(tmp_path)).locked():
        assert not (tmp_path / ".features.h5.abc123.tmp").exists()
    assert (tmp_path / ".unrelated.tmp").exists()


def test_claim_allows_an_earlier_run_on_the_same_dataset_only(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "features.h5").write_bytes(b"someone's file")
    layout = OutputLayout(root=str(tmp_path / "out"))
    with pytest.raises(OutputExistsError, match="not written by a transfer-flow run"):
        layout.claim(str(tmp_path / "data"), overwrite=False)
    (tmp_path / "out" / "run.json").write_text(json.dumps({"dataset": str(tmp_path / "data")}))
    layout.claim(str(tmp_path / "data"), overwrite=False)
    with pytest.raises(OutputExistsError, match="from a run on"):
        layout.claim(str(tmp_path / "other"), overwrite=False)
    layout.claim(str(tmp_path / "other"), overwrite=True)


def test_outputs_of_a_run_killed_before_run_json_are_its_own(tmp_path):
    """The claim is written before any output: a run killed mid-way left only its own files, and they are reused."""
    layout = OutputLayout(root=str(tmp_path / "out"))
    layout.claim(str(tmp_path / "data"), overwrite=False)  # a fresh folder: nothing to refuse
    (tmp_path / "out" / "features.h5").write_bytes(b"the killed run's store")
    (tmp_path / "out" / "manifest.json").write_text("{}")
    layout.claim(str(tmp_path / "data"), overwrite=False)  # the rerun: no --overwrite needed
    with pytest.raises(OutputExistsError, match=f"from a run on {tmp_path / 'data'}"):
        layout.claim(str(tmp_path / "other"), overwrite=False)
    layout.claim(str(tmp_path / "other"), overwrite=True)  # now the claim is the other dataset's
    with pytest.raises(OutputExistsError, match=f"from a run on {tmp_path / 'other'}"):
        layout.claim(str(tmp_path / "data"), overwrite=False)
