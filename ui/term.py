"""Text from outside (a contact's message, a display name) on our terminal.

Anything that could steer the terminal is shown as a visible escape instead:
C0 and C1 control characters (ESC starts colour and cursor sequences), DEL,
Unicode line and paragraph separators, and the bidirectional controls that
can make text read in another order than it is stored.  A message's own
line breaks are kept but each following line is indented, so no line of a
message can pass for a line of Pigeon's own output.
"""

from __future__ import annotations

_BIDI = {0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}
_SEPARATORS = {0x2028, 0x2029}


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x20 or 0x7F <= code < 0xA0 or code in _BIDI or code in _SEPARATORS:
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return char


def safe(text: str, indent: str = "    ") -> str:
    """``text`` made harmless for a terminal, keeping line breaks (indented)."""
    lines = text.split("\n")
    escaped = ["".join(_escape(c) if c != "\t" else c for c in line) for line in lines]
    return ("\n" + indent).join(escaped)


def safe_line(text: str) -> str:
    """``text`` made harmless and kept on one line (for names and labels)."""
    return "".join(_escape(c) for c in text)
