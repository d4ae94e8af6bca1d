"""The choice among one VM's restore points, without a pool: newest wins, ties by configuration."""

from __future__ import annotations

from datetime import UTC, datetime

from xencr.config import JobConfig, TargetConfig
from xencr.dr.choose import Candidate, Place, choose, newest, source_name
from xencr.replication.ownership import RestorePoint

JOB = JobConfig(
    "web", "id-web", "a", ["web-*"], [], [TargetConfig("b", "sr-b"), TargetConfig("c", "sr-c")], []
)


def cand(rank: int, pool: str, when: datetime, rp: str, vm: str = "u1") -> Candidate:
    point = RestorePoint("ref-" + rp, rp, f"web-1 ({when:%Y%m%dT%H:%M:%SZ})", "", "", {})
    return Candidate(
        vm, "web-1", (), Place(JOB, pool, f"sr-{pool}", rank), f"sr-{pool}", f"SR {pool}", point, when
    )


T1 = datetime(2025, 5, 1, 10, 0, tzinfo=UTC)
T2 = datetime(2025, 5, 1, 10, 15, tzinfo=UTC)


def test_newest_wins_whatever_the_order() -> None:
    old, new = cand(0, "b", T1, "rp-old"), cand(1, "c", T2, "rp-new")
    for given in ([old, new], [new, old]):
        ch = newest(given)
        assert (ch.chosen.point.uuid, ch.others, ch.tie) == ("rp-new", (old,), None)


def test_a_tie_goes_to_the_first_target_in_the_configuration_and_is_said() -> None:
    first, second = cand(0, "b", T2, "rp-z"), cand(1, "c", T2, "rp-a")
    ch = newest([second, first])
    assert ch.chosen is first
    assert ch.tie == "same snapshot time on b/SR b and c/SR c: b/SR b chosen (first in the configuration)"


def test_choose_groups_by_source_vm() -> None:
    found = choose([cand(0, "b", T1, "r1", "u2"), cand(1, "c", T2, "r2", "u1"), cand(0, "b", T1, "r3", "u1")])
    assert {vm: ch.chosen.point.uuid for vm, ch in found.items()} == {"u1": "r2", "u2": "r1"}


def test_source_name_from_a_restore_point_name() -> None:
    assert source_name("db (blue) (20250501T10:00:00Z)") == "db (blue)"
    assert source_name("renamed by hand") == "renamed by hand"
