"""psft_plugin.window: the old-policy schedule both backends use, on its own (no framework)."""

import pytest

from psft_plugin.window import (
    FIRST,
    SFT,
    STAMPED,
    group_kinds,
    open_window,
    starts_window,
    take_groups,
    window_length,
)


@pytest.mark.parametrize("step, expected", [(0, 4), (1, 3), (3, 1), (4, 4), (9, 1)])
def test_window_length_is_aligned_to_the_step_counter(step, expected):
    assert window_length(step, max_steps=10, refresh_steps=4, warmup_steps=0) == expected


def test_window_length_during_warmup_and_near_max_steps():
    assert [window_length(s, 100, 4, 2) for s in range(7)] == [1, 1, 4, 3, 2, 1, 4]
    assert window_length(8, 10, 8, 0) == 2
    assert window_length(5, 0, 4, 0) == 3  # max_steps unknown: only the alignment cuts


def test_take_groups_stops_at_the_end_of_the_iterator():
    assert take_groups(iter(range(7)), 2, 3, 4) == [[0, 1], [2, 3, 4], [5, 6]]
    assert take_groups(iter(range(6)), 3, 3, 4) == [[0, 1, 2], [3, 4, 5]]
    assert take_groups(iter([]), 2, 2, 3) == [[]]


def test_group_kinds():
    assert group_kinds(1, 1, warmup_steps=2) == [SFT]
    assert group_kinds(2, 3, warmup_steps=2) == [FIRST, STAMPED, STAMPED]


def _open(source, step, stamped, **schedule):
    schedule = {"max_steps": 100, "refresh_steps": 3, "warmup_steps": 0, "first_size": 2, "group_size": 2, **schedule}
    return open_window(source, step, stamp=stamped.append, **schedule)


def test_a_window_stamps_all_but_its_first_group_and_serves_its_source_only():
    source, stamped = iter(range(100)), []
    window = _open(source, 0, stamped)
    assert stamped == [[2, 3, 4, 5]]  # one call, the later groups' micro-batches in order
    assert window.serves(source) and not window.serves(iter(range(3)))
    assert [window.pop() for _ in range(3)] == [([0, 1], FIRST), ([2, 3], STAMPED), ([4, 5], STAMPED)]
    assert not window.serves(source)


def test_a_resume_mid_window_opens_a_shortened_window_up_to_the_next_boundary():
    stamped = []
    window = _open(iter(range(100)), 4, stamped)  # K = 3: boundaries 0, 3, 6
    assert [kind for _, kind in window.groups] == [FIRST, STAMPED]
    assert stamped == [[2, 3]]


def test_a_restored_window_is_stamped_from_the_checkpoint_or_else_as_usual():
    """`restore` gets the groups up to the next boundary: True trains them all as stamped, False stamps anew."""
    stamped, seen = [], []
    window = _open(iter(range(100)), 4, stamped, restore=lambda groups: seen.append(groups) or True)
    assert seen == [[[0, 1], [2, 3]]] and stamped == []
    assert list(window.groups) == [([0, 1], STAMPED), ([2, 3], STAMPED)]
    refused = _open(iter(range(100)), 4, stamped, restore=lambda groups: False)
    assert [kind for _, kind in refused.groups] == [FIRST, STAMPED] and stamped == [[2, 3]]


def test_window_starts():
    assert [step for step in range(8) if starts_window(step, refresh_steps=3, warmup_steps=2)] == [0, 1, 2, 5]


def test_warmup_and_k1_windows_stamp_nothing():
    stamped = []
    assert list(_open(iter(range(9)), 1, stamped, warmup_steps=2).groups) == [([0, 1], SFT)]
    assert list(_open(iter(range(9)), 5, stamped, refresh_steps=1).groups) == [([0, 1], FIRST)]
    assert stamped == []


def test_a_short_last_group_is_kept_or_dropped_before_stamping():
    stamped = []
    kept = _open(iter(range(5)), 0, stamped)
    assert [group for group, _ in kept.groups] == [[0, 1], [2, 3], [4]] and stamped == [[2, 3, 4]]
    stamped.clear()
    whole = _open(iter(range(5)), 0, stamped, whole_groups_only=True)
    assert [group for group, _ in whole.groups] == [[0, 1], [2, 3]] and stamped == [[2, 3]]
    assert not _open(iter(range(1)), 0, stamped, whole_groups_only=True).groups  # no whole step left
