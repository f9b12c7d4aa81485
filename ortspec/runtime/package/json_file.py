"""JSON from files a user or a package gives: whatever is wrong with the text (not JSON, not UTF-8, nested
deeper than Python's stack, an integer too long to convert), the error is one line naming the file."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

MAX_JSON_BYTES = 64 << 20  # far above any manifest, config or head.json; a device or a huge file is refused


def parse_json(text: str | bytes, where: str, error: type[Exception] = ValueError) -> Any:
    """`text` decoded; `error` names `where` (a file, `file:line`) when it is not JSON this can read."""
    try:
        return json.loads(text)
    except UnicodeDecodeError as exc:
        raise error(f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise error(f"{where} is not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise error(f"{where} holds JSON nested too deeply to read") from None
    except ValueError:  # the only other: an integer of more digits than Python converts
        raise error(f"{where} holds an integer of more than {sys.get_int_max_str_digits()} digits") from None


def read_json(path: str | Path, error: type[Exception] = ValueError, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in the file `path`, read up to `max_bytes` (so a device or a huge file cannot
    exhaust memory); errors of reading or parsing it are `error`, naming the file."""
    try:
        with open(path, "rb") as file:
            data = file.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{path} cannot be read ({exc.strerror or exc})") from None
    except ValueError:  # open() refuses a NUL byte in a path
        raise error(f"{str(path)!r} is no file name (it holds a NUL byte)") from None
    if len(data) > max_bytes:
        raise error(f"{path} is larger than {max_bytes} bytes; refusing to read it")
    return parse_json(data, str(path), error)
