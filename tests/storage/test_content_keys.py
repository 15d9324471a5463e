import hashlib

from transfer_flow.storage.content_keys import content_key


def test_a_key_is_the_hash_of_its_parts_as_json_so_results_of_earlier_runs_keep_their_keys():
    # Stores and bundles already on disk carry keys made this way: another encoding would redo their work.
    assert content_key("mobilenet_v2", 32, {"head": "logreg"}) == hashlib.sha256(
        b'["mobilenet_v2", 32, {"head": "logreg"}]').hexdigest()[:16]


def test_any_part_changes_the_key():
    assert content_key("a", 1) != content_key("a", 2) != content_key("b", 2)
