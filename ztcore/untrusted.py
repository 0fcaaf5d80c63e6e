"""Text a client sent (node ids, type URLs, NACK details, nonces), made safe to log or to echo back.

A client may send megabytes in any string field of an xDS request; logged or stored verbatim, one request can
write megabytes of log or pin them in memory for the stream's life. `clip` keeps such text to one line of
bounded length and says how much it left out.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def clip(value: object, limit: int = 200) -> str:
    """At most `limit` characters of `value`, control characters escaped, and how many more there were."""
    text = str(value)
    extra = len(text) - limit
    if extra > 0:
        text = text[:limit]
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return f"{text}…(+{extra} chars)" if extra > 0 else text
