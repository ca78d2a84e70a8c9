"""Cut a source's block stream into fixed windows for one module (size, hop, channel subset)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hal.source import Block


@dataclass(frozen=True)
class Window:
    seq: int               # counts every window cut for this module, delivered or not
    start_ns: int          # Unix time of the first sample
    sample_rate: float
    data: np.ndarray       # planar (channels, frames), C-contiguous: float32 samples or uint8 pixels
    image: tuple[int, int] | None = None   # (height, width) for a camera frame

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


class Windower:
    def __init__(self, size: int, hop: int, sample_rate: float, channels: list[int] | None = None) -> None:
        self.size, self.hop, self.sample_rate = size, hop, sample_rate
        self.channels = channels           # indices into the source's channels; None = all
        self._buf: np.ndarray | None = None
        self._capacity = 0                 # _buf's frames in the steady state (it grows for a burst)
        self._fill = 0                     # frames held in _buf
        self._buf_index = 0                # absolute index of _buf[:, 0]
        self._skip = 0                     # frames still to discard when hop > size
        self._ref = (0, 0)                 # (index, ns) of the latest block, for timestamps
        self._next_seq = 0

    @property
    def windows_cut(self) -> int:
        return self._next_seq

    @property
    def buffer_frames(self) -> int:
        """Frames the buffer has room for now."""
        return 0 if self._buf is None else self._buf.shape[1]

    def push(self, block: Block) -> list[Window]:
        if block.gap:
            self.reset()   # a window across the gap would mix unrelated samples
        data = block.data if self.channels is None else block.data[self.channels]
        self._ref = (block.index, block.start_ns)
        if self._buf is None:
            self._capacity = self.size + max(self.hop, block.frames)
            self._buf = np.empty((data.shape[0], self._capacity), dtype=np.float32)
            self._buf_index = block.index
        start = 0
        if self._skip:
            start = min(self._skip, data.shape[1])
            self._skip -= start
            self._buf_index += start
        incoming = data.shape[1] - start
        if self._fill + incoming > self._buf.shape[1]:
            grown = np.empty((self._buf.shape[0], self._fill + incoming + self.size), dtype=np.float32)
            grown[:, :self._fill] = self._buf[:, :self._fill]
            self._buf = grown
        self._buf[:, self._fill:self._fill + incoming] = data[:, start:]
        self._fill += incoming

        windows = []
        offset = 0
        while self._fill - offset >= self.size:
            frames = self._buf[:, offset:offset + self.size].copy()
            index = self._buf_index + offset
            ns = self._ref[1] + round((index - self._ref[0]) * 1e9 / self.sample_rate)
            windows.append(Window(self._next_seq, ns, self.sample_rate, frames))
            self._next_seq += 1
            offset += self.hop
        if offset:
            consumed = min(offset, self._fill)
            self._skip += offset - consumed
            remaining = self._fill - consumed
            self._buf[:, :remaining] = self._buf[:, consumed:self._fill]
            self._fill = remaining
            self._buf_index += consumed
        if self._buf.shape[1] > self._capacity and self._fill <= self.size:
            # A late source's burst grew the buffer; once it is cut, the memory goes back. Kept,
            # every hiccup's high-water mark would stay for months (the real-time soak saw the
            # supervisor step up by a buffer and stay there).
            self._buf = self._buf[:, :self._capacity].copy()
        return windows

    def reset(self) -> None:
        """Forget buffered frames (the source reopened: its sample index starts again).
        Sequence numbers continue, so modules still see one increasing sequence."""
        self._buf = None
        self._fill = 0
        self._skip = 0


class FrameWindower:
    """Camera frames: every `hop`-th frame is one window (no copy: a frame is already whole)."""

    def __init__(self, hop: int, sample_rate: float, channels: list[int] | None = None) -> None:
        self.hop, self.sample_rate, self.channels = hop, sample_rate, channels
        self._next_seq = 0
        self._frames = 0

    @property
    def windows_cut(self) -> int:
        return self._next_seq

    def push(self, block: Block) -> list[Window]:
        take = self._frames % self.hop == 0
        self._frames += 1
        if not take:
            return []
        data = block.data if self.channels is None else np.ascontiguousarray(block.data[self.channels])
        window = Window(self._next_seq, block.start_ns, self.sample_rate, data, block.image)
        self._next_seq += 1
        return [window]

    def reset(self) -> None:
        self._frames = 0
