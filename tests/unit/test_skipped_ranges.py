"""Whatever a consumer skips is found: the delivered offsets plus the skipped ranges cover
every offset from where a partition was counted to its last delivered event, once."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from app.budgets.counter import skipped_ranges


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[dict[int, int], list[tuple[int, int]]]:
    processed: dict[int, int] = {}
    per_partition: dict[int, list[int]] = {}
    for partition in range(draw(st.integers(1, 3))):
        start = draw(st.integers(0, 50))
        if draw(st.booleans()):
            processed[partition] = start
        # ascending offsets with holes anywhere, and re-deliveries below the start
        offsets = sorted(draw(st.sets(st.integers(max(0, start - 5), start + 60), max_size=40)))
        per_partition[partition] = offsets
    # interleave partitions, keeping each partition's own order
    order = draw(st.permutations([p for p, offs in per_partition.items() for _ in offs]))
    cursor = dict.fromkeys(per_partition, 0)
    delivered = []
    for partition in order:
        delivered.append((partition, per_partition[partition][cursor[partition]]))
        cursor[partition] += 1
    return processed, delivered


@given(deliveries())
def test_delivered_and_skipped_cover_every_offset_once(
    case: tuple[dict[int, int], list[tuple[int, int]]],
) -> None:
    processed, delivered = case
    gaps = skipped_ranges(delivered, processed)
    for partition in {p for p, _ in delivered}:
        offsets = [o for p, o in delivered if p == partition]
        start = processed.get(partition, offsets[0])
        fresh = {o for o in offsets if o >= start}
        skipped = [o for p, a, b in gaps if p == partition for o in range(a, b)]
        assert len(skipped) == len(set(skipped)), "a range reported twice"
        assert not fresh & set(skipped), "a delivered offset reported as skipped"
        if fresh:
            assert fresh | set(skipped) == set(range(start, max(fresh) + 1))
        else:
            assert not skipped


def test_a_rebalance_that_resumes_past_the_counted_offset_is_a_gap() -> None:
    # counted below 100; Faust resumes partition 1 at 140 and later jumps from 150 to 160
    delivered = [(1, 140), (1, 141), (0, 7), (1, 150), (1, 160)]
    assert skipped_ranges(delivered, {1: 100, 0: 7}) == [
        (1, 100, 140),
        (1, 142, 150),
        (1, 151, 160),
    ]
