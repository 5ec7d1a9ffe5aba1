from __future__ import annotations

import pytest

from worker.protocol import (
    Layout,
    Manifest,
    RunOptions,
    Shard,
    WorkMessage,
    is_valid_run_id,
    new_run_id,
    shard_id_for_index,
    shard_id_for_input,
)


@pytest.mark.parametrize(
    "uri",
    [
        "/data/a b.csv",
        "/data/ünï cödé.csv",
        "/d/x;$(rm -rf ~)|&.csv",
        "gs://b/日本.csv",
        "/d/.hidden",
        "/d/" + "long" * 50 + ".csv",
    ],
)
def test_shard_ids_are_safe_path_components(uri: str) -> None:
    shard_id = shard_id_for_input(uri)
    assert shard_id == shard_id_for_input(uri)  # stable
    assert all(c.isascii() and (c.isalnum() or c in "-_.") for c in shard_id)
    assert not shard_id.startswith((".", "-")) and len(shard_id) <= 50


def test_same_name_in_different_folders_gets_different_ids() -> None:
    assert shard_id_for_input("/a/x.csv") != shard_id_for_input("/b/x.csv")
    assert shard_id_for_input("/a/x.csv").startswith("x.csv-")


def test_index_ids_sort_in_order() -> None:
    ids = [shard_id_for_index(i, 123_456) for i in range(0, 123_456, 1000)]
    assert ids == sorted(ids) and ids[0] == "000000"


def test_records_roundtrip_and_ignore_unknown_keys() -> None:
    manifest = Manifest(
        run_id="r1-abc",
        bundle="f" * 64,
        entry="python",
        shard_count=3,
        options=RunOptions(max_attempts=5).to_dict(),
    )
    back = Manifest.from_json(manifest.to_json())
    assert back == manifest and back.run_options.max_attempts == 5
    assert Shard.from_dict({"id": "s", "index": 0, "future_field": 1}) == Shard(id="s", index=0)
    message = WorkMessage(run_id="r1-abc", shard=Shard(id="s", index=2, input="/x").to_dict())
    assert message.attributes() == {"run_id": "r1-abc", "shard_id": "s"}
    assert WorkMessage.from_json(message.to_json()).shard_record.input == "/x"


def test_layout_matches_the_bucket_layout() -> None:
    assert Layout.bundle("abc") == "tasks/abc.tar.gz"
    assert Layout.log("r", "s", 2) == "runs/r/shards/s/attempts/2/log.txt"
    assert Layout.result("r", "s") == "runs/r/shards/s/result.json"
    assert Layout.parse_shard_key("runs/r/shards/s/attempts/1/status.json") == (
        "r",
        "s",
        "attempts/1/status.json",
    )
    assert Layout.parse_shard_key("runs/r/run.json") is None


def test_run_ids() -> None:
    run_id = new_run_id(0)
    assert run_id.startswith("r19700101-000000-") and is_valid_run_id(run_id)
    assert not is_valid_run_id("../etc") and not is_valid_run_id("")


def test_a_preempted_message_moves_to_its_fallback_topic_after_k_preemptions() -> None:
    from worker.protocol import WorkMessage

    plain = WorkMessage("r", {"id": "s", "index": 0})
    assert plain.after_preemption() == WorkMessage("r", {"id": "s", "index": 0}, preemptions=1)
    routed = WorkMessage("r", {"id": "s"}, fallback_topic="work-std", fallback_after=2)
    once = routed.after_preemption()
    assert (once.preemptions, once.topic, once.fallback_topic) == (1, None, "work-std")
    twice = once.after_preemption()
    assert (twice.preemptions, twice.topic, twice.fallback_topic) == (2, "work-std", None)
    assert twice.after_preemption().topic == "work-std"  # it stays on the standard VMs
    assert WorkMessage.from_json(twice.to_json()) == twice
