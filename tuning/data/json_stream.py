"""JSON read as a stream: the UTF-8 text of a binary file in a buffer refilled a chunk at a time, values decoded
from it one at a time, errors placed by line and column of the file (tuning.data.files reads JSON lists with it)."""

from __future__ import annotations

import codecs
import json
import re

CHUNK = 1024 * 1024  # text read at a time


class NotUTF8(Exception):
    def __init__(self, reason: str, offset: int):
        super().__init__(f"{reason} at byte {offset}")
        self.reason, self.offset = reason, offset


class BadJSON(Exception):
    def __init__(self, msg: str, line: int, column: int):
        super().__init__(f"{msg}: line {line} column {column}")
        self.msg, self.line, self.column = msg, line, column


_DECODER = json.JSONDecoder()
_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's own whitespace
# A decoding error this close to the end of the buffer may only mean the value goes on in the next chunk.
_TRUNCATION_MARGIN = 16


class TextStream:
    """The UTF-8 text of a binary file in a buffer refilled a chunk at a time; `pos` is the reading position in
    `buffer`, and `line`, `column` place the buffer's start in the file, for error messages."""

    def __init__(self, f, chunk: int | None = None):
        self.f, self.chunk = f, chunk or CHUNK
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buffer, self.pos, self.eof = "", 0, False
        self.line, self.column, self.bytes_read = 1, 0, 0

    def fill(self, size: int) -> bool:
        """Drop the text already read and append the next `size` bytes' worth; False at the end of the file."""
        if self.eof:
            return False
        self._drop_consumed()
        data = self.f.read(size)
        pending = len(self.decoder.getstate()[0])  # bytes of a character cut by the previous read
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as e:
            raise NotUTF8(e.reason, self.bytes_read - pending + e.start) from None
        self.bytes_read += len(data)
        self.eof = not data
        del data  # before the text is joined to the buffer: memory holds two chunks at most, not three
        self.buffer += text
        return not self.eof

    def _drop_consumed(self) -> None:
        newlines = self.buffer.count("\n", 0, self.pos)
        if newlines:
            self.line += newlines
            self.column = self.pos - self.buffer.rfind("\n", 0, self.pos) - 1
        else:
            self.column += self.pos
        self.buffer, self.pos = self.buffer[self.pos :], 0

    def skip_whitespace(self) -> str | None:
        """Move to the next non-whitespace character and return it; None at the end of the file."""
        while True:
            self.pos = _WHITESPACE.match(self.buffer, self.pos).end()
            if self.pos < len(self.buffer):
                return self.buffer[self.pos]
            if not self.fill(self.chunk):
                return None

    def expect(self, char: str) -> None:
        if self.skip_whitespace() != char:
            raise self.bad(f"Expecting {char!r}")
        self.pos += 1

    def value(self):
        """Decode the JSON value at `pos`, reading on while it may continue past the buffer's end."""
        size = self.chunk
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buffer, self.pos)
                if end < len(self.buffer) or self.eof:  # a number at the buffer's end may go on
                    self.pos = end
                    return value
            except json.JSONDecodeError as e:
                if self.eof or not self._maybe_cut(e):
                    raise self.bad(e.msg, e.pos) from None
            self.fill(size)
            size *= 2  # a value longer than a chunk is read in O(its length), not O(length^2 / chunk)

    def _maybe_cut(self, e: json.JSONDecodeError) -> bool:
        # a string cannot hold an unescaped newline, so an unterminated one reaching the buffer's end is cut
        return e.msg.startswith("Unterminated string") or e.pos >= len(self.buffer) - _TRUNCATION_MARGIN

    def bad(self, msg: str, pos: int | None = None) -> BadJSON:
        pos = self.pos if pos is None else pos
        newlines = self.buffer.count("\n", 0, pos)
        if newlines:
            return BadJSON(msg, self.line + newlines, pos - self.buffer.rfind("\n", 0, pos))
        return BadJSON(msg, self.line, self.column + pos + 1)
