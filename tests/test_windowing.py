"""Windows: size, hop/overlap, sequence numbers, timestamps, channel subsets."""
from __future__ import annotations

import numpy as np
import pytest

from appliance.core.windowing import Windower
from hal.source import Block

FS = 1000.0
T0 = 1_700_000_000_000_000_000


def blocks(total: int, block: int, channels: int = 2):
    """A ramp per channel (value = sample index + 1e5 * channel), cut into blocks."""
    index = 0
    while index < total:
        n = min(block, total - index)
        data = np.vstack([np.arange(index, index + n, dtype=np.float32) + 1e5 * c for c in range(channels)])
        yield Block(data=data, start_ns=T0 + round(index * 1e9 / FS), index=index)
        index += n


def run(windower: Windower, total: int, block: int, channels: int = 2):
    out = []
    for b in blocks(total, block, channels):
        out.extend(windower.push(b))
    return out


@pytest.mark.parametrize("block", [1, 7, 100, 256, 1000])
def test_overlapping_windows_independent_of_block_size(block):
    wins = run(Windower(size=256, hop=128, sample_rate=FS), total=2000, block=block)
    assert [w.seq for w in wins] == list(range(len(wins)))
    assert len(wins) == (2000 - 256) // 128 + 1
    for w in wins:
        first = w.seq * 128
        assert w.data.shape == (2, 256) and w.data.dtype == np.float32 and w.data.flags.c_contiguous
        assert np.array_equal(w.data[0], np.arange(first, first + 256, dtype=np.float32))
        assert np.array_equal(w.data[1], np.arange(first, first + 256, dtype=np.float32) + 1e5)
        assert w.start_ns == T0 + round(first * 1e9 / FS)


@pytest.mark.parametrize("block", [3, 50, 999])
def test_hop_larger_than_size_skips_frames(block):
    wins = run(Windower(size=100, hop=250, sample_rate=FS), total=1000, block=block)
    assert [int(w.data[0, 0]) for w in wins] == [0, 250, 500, 750]
    assert all(w.data.shape[1] == 100 for w in wins)


def test_channel_subset_and_no_partial_window():
    wins = run(Windower(size=300, hop=300, sample_rate=FS, channels=[1]), total=1000, block=64)
    assert len(wins) == 3 and all(w.data.shape == (1, 300) for w in wins)
    assert w_first(wins) == 1e5


def w_first(wins):
    return float(wins[0].data[0, 0])


def test_reset_continues_sequence():
    w = Windower(size=10, hop=10, sample_rate=FS)
    first = run(w, total=25, block=25)
    w.reset()
    again = run(w, total=20, block=20)
    assert [x.seq for x in first + again] == [0, 1, 2, 3]
    assert int(again[0].data[0, 0]) == 0   # fresh stream after the reset, no leftover frames


@pytest.mark.parametrize("hop", [128, 256, 400])
def test_a_burst_grows_the_buffer_only_until_it_is_cut(hop):
    """A source that fell behind delivers one large block; the buffer grows for it and gives the
    memory back once the windows are cut (a kept high-water mark reads as a leak over months),
    and the windows are the same as without the burst."""
    def feed(sizes):
        w, out, index, caps = Windower(size=256, hop=hop, sample_rate=FS), [], 0, []
        for n in sizes:
            data = np.vstack([np.arange(index, index + n, dtype=np.float32) + 1e5 * c for c in range(2)])
            out.extend(w.push(Block(data=data, start_ns=T0 + round(index * 1e9 / FS), index=index)))
            index += n
            caps.append(w.buffer_frames)
        return out, caps
    steady, steady_caps = feed([64] * 100)
    burst, caps = feed([64] * 40 + [5000] + [64] * 100)
    assert caps[40] == caps[-1] == steady_caps[-1] == 256 + max(hop, 64)   # back at once, after the cut
    assert [w.seq for w in burst[:len(steady)]] == [w.seq for w in steady]
    for a, b in zip(steady, burst):
        np.testing.assert_array_equal(a.data, b.data)
