"""One wording for a value outside a fixed set of names, used wherever a field picks one:

    Unknown pool='tokk'. Did you mean: tok? Allowed values: tok, gap.

`check(field, value, allowed)` returns the value or raises that ValueError; `unknown(...)` builds
the error for callers that raise it themselves. `field` is what the user wrote (a config key,
a create_model field, a command-line flag), so the message points at the line to fix.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable


def unknown(field: str, value: Any, allowed: Iterable[Any]) -> ValueError:
  allowed = [str(a) for a in allowed]
  close = difflib.get_close_matches(str(value), allowed, n=5, cutoff=0.5) if isinstance(
      value, str) else []
  hint = f" Did you mean: {', '.join(close)}?" if close else ""
  return ValueError(f"Unknown {field}={value!r}.{hint} Allowed values: {', '.join(allowed)}.")


def check(field: str, value: Any, allowed: Iterable[Any]) -> Any:
  allowed = tuple(allowed)
  if value not in allowed:
    raise unknown(field, value, allowed)
  return value
