"""A chunked request body located in the reads it came in (sans-IO).

`ChunkedBody.scan` walks a read's chunk framing (size lines, data, the CRLF
after each chunk's data, the last chunk and the trailer section) and hands
out body pieces: the framing as it came, to be forwarded as it is, instead
of each chunk's data decoded by llhttp (a copy), joined and framed again (two
more). `balancer.http11` runs it over each read before llhttp, which then
parses the same bytes up to the end it found and must end the message
exactly there (one byte before, none): a read llhttp refuses hands out
nothing, and any disagreement is a 400. The relay sends the pieces as they
are (`balancer.relay`), then `forwarding.last_chunk` when the body had
trailer fields.

Invariants:
* A piece is the read itself, a span ``(read, start)`` reaching its end
  (`balancer.spans`), or bytes: a slice only where the read goes on past
  what may be forwarded as it came (the next request, a size line rewritten,
  the last chunk), a size line rewritten, or `LAST_CHUNK`.
* Only canonical size lines go as they came: hex digits without a leading
  zero, then CRLF, whole in one read. Any other that llhttp accepts (chunk
  extensions, leading zeros, a line split across reads) goes as its size
  alone (``%x\\r\\n``): a backend that reads extensions or long sizes otherwise
  than llhttp never sees them (smuggling, "funky chunks").
* The last chunk goes as it came only as exactly ``0\\r\\n\\r\\n`` in one read;
  otherwise the pieces stop before it: `LAST_CHUNK` follows when there were
  no trailer fields (added by the parser, which knows), `last_chunk(head)`
  when there were (the relay: the fields it keeps).
* `declared` is the sum of the sizes of the chunks whose size line was read
  (the current one's included, before its data came); `decoded` the data
  bytes read. Memory: nothing is kept across reads but a few integers and
  the trailer section's last 3 bytes. A size past 64 bits, which llhttp
  refuses, is `TOO_LARGE`: a line of digits costs no more than its length.
* A size line (its extensions included, which llhttp takes at any length) is
  at most `line_max` bytes, however it was split: `scan` returns `LONG_LINE`
  for a longer one, as soon as that many of it came (the parser answers 400).
"""

from __future__ import annotations

from typing import Final

LAST_CHUNK: Final = b"0\r\n\r\n"
# Each byte's hex digit value, 16 for any other byte.
HEX_VALUE: Final = bytes(int(chr(b), 16) if chr(b) in "0123456789abcdefABCDEF" else 16
                         for b in range(256))
ZERO: Final = 48
# The largest size another hex digit may follow and still fit in the 64 bits
# llhttp takes; past it a size is `TOO_LARGE` (llhttp refuses its line).
BEFORE_DIGIT: Final = (1 << 60) - 1
TOO_LARGE: Final = 1 << 64
CR: Final = 13
LF: Final = 10
# where the scan is (`ChunkedBody.state`)
LINE: Final = 0  # in a size line
DATA: Final = 1  # in a chunk's data (`left` bytes of it)
AFTER: Final = 2  # in the CRLF after a chunk's data (`left` bytes of it)
TRAILERS: Final = 3  # after the last chunk's line, up to the empty line
DONE: Final = 4
LONG_LINE: Final = -2  # what `scan` returns for a size line over `line_max`


class ChunkedBody:
    """The framing state of one chunked request body, across its reads."""

    __slots__ = ("state", "left", "value", "digits", "sized", "plain", "line", "line_max",
                 "declared", "decoded", "tail", "whole_end")

    def __init__(self, line_max: int) -> None:
        self.state = LINE
        self.left = 0
        self.value = 0  # (LINE) the size read so far
        self.digits = 0  # (LINE) its hex digits
        self.sized = False  # (LINE) a byte after its digits was read
        self.plain = True  # (LINE) it may go as it came (module doc): begun in this read
        self.line = 0  # (LINE) its bytes read so far
        self.line_max = line_max
        self.declared = 0
        self.decoded = 0
        self.tail = b""  # (TRAILERS) the last bytes read of the section, up to 3
        self.whole_end = False  # the last chunk went as it came (no `LAST_CHUNK` to add)

    def scan(self, data: bytes, pos: int, pieces: list) -> int:
        """Locate the framing in `data` from `pos`, appending the pieces to forward
        to `pieces`; returns where in `data` the message ends, -1 if it goes on, or
        `LONG_LINE`. Bytes llhttp refuses may give any pieces and end (they are
        dropped)."""
        run = pos  # the start of what goes on as it came
        end = len(data)
        state, left = self.state, self.left
        while pos < end:
            if state == DATA:
                step = min(left, end - pos)
                pos += step
                left -= step
                self.decoded += step
                if not left:
                    state, left = AFTER, 2
            elif state == AFTER:
                step = min(left, end - pos)
                pos += step
                left -= step
                if not left:
                    state = LINE
                    self.value = self.digits = self.line = 0
                    self.sized = False
                    self.plain = True
            elif state == LINE:
                start = pos
                pos = self._size_line(data, pos)
                if self.line > self.line_max:
                    return LONG_LINE
                if pos < 0:  # it goes on in the next read
                    _piece(data, run, start, pieces)
                    run = end
                    break
                value = self.value
                self.declared += value
                if value:
                    if not self.plain:
                        _piece(data, run, start, pieces)
                        pieces.append(b"%x\r\n" % value)
                        run = pos
                    state, left = DATA, value
                    continue
                # the last chunk: as it came only as "0\r\n\r\n" within this read
                if self.plain and pos + 2 <= end and data[pos] == CR and data[pos + 1] == LF:
                    self.state, self.left, self.whole_end = DONE, 0, True
                    _piece(data, run, pos + 2, pieces)
                    return pos + 2
                _piece(data, run, start, pieces)
                state, run = TRAILERS, end
                self.tail = b"\r\n"  # the line's own CRLF begins the section's end
            elif state == TRAILERS:
                found = self._trailers_end(data, pos)
                self.state, self.left = (DONE, 0) if found >= 0 else (TRAILERS, 0)
                return found
            else:  # DONE (never: the parser reads no more of this body): nothing goes on
                return -1
        self.state, self.left = state, left
        _piece(data, run, end, pieces)
        return -1

    def _size_line(self, data: bytes, pos: int) -> int:
        """Read a size line from `pos` into `value`, `digits`, `plain`; returns where
        in `data` it ends (after its LF), or -1 if it goes on in the next read (then
        it is not `plain`). (Native loops: a line is a few bytes.)"""
        end = len(data)
        start = pos
        if not self.sized:
            value, digits = self.value, self.digits
            while pos < end:
                digit = HEX_VALUE[data[pos]]
                if digit == 16:
                    self.sized = True
                    break
                # Bug: a long line of digits grew a bignum, each shifted whole (quadratic:
                # 0.2 s of CPU for a 64 KiB read); past 64 bits it stays at `TOO_LARGE`
                value = value << 4 | digit if value <= BEFORE_DIGIT else TOO_LARGE
                digits += 1
                pos += 1
            self.value, self.digits = value, digits
        while pos < end and data[pos] != LF:
            pos += 1
        if pos == end:
            self.plain = False
            self.line += end - start
            return -1
        pos += 1
        self.line += pos - start
        digits = self.digits
        self.plain = (self.plain and pos - start == digits + 2 and data[pos - 2] == CR
                      and (digits == 1 or data[start] != ZERO))
        return pos

    def _trailers_end(self, data: bytes, pos: int) -> int:
        """Where in `data` (from `pos`) the trailer section ends, after its CRLF CRLF
        (the last chunk's CRLF counts: `tail`), or -1 (then `tail` keeps its last 3
        bytes)."""
        tail = self.tail
        found = (tail + data[pos:pos + 3]).find(b"\r\n\r\n")
        if found >= 0:
            return pos + found + 4 - len(tail)
        found = data.find(b"\r\n\r\n", pos)
        if found >= 0:
            return found + 4
        self.tail = data[-3:] if len(data) - pos >= 3 else (tail + data[pos:])[-3:]
        return -1


def _piece(data: bytes, start: int, end: int, pieces: list) -> None:
    """Append `data[start:end]` to `pieces` as the read, a span or a slice (module doc)."""
    if start >= end:
        return
    if end == len(data):
        pieces.append((data, start) if start else data)
    else:
        pieces.append(data[start:end])
