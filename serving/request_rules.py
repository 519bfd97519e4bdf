"""The rules for a generation request's fields, in one place for every front door.

The Python client, the `generate` model (gRPC tensors and Triton's HTTP generate extension),
the `gpt` step model and the OpenAI frontend (its pydantic models are strict in the same way)
all apply them:

* integers are checked in range *before* anything casts them (no wrap-around): a bool is not
  an int, 8.7 is not an int, "8" is not a number;
* unknown fields are refused, naming the closest valid field (``difflib``);
* a prompt whose UTF-8 size cannot fit in the context is refused before it is tokenized: a
  token decodes to at most ``max_token_bytes`` bytes, so a prompt of more than
  ``tokens * max_token_bytes`` bytes has more than ``tokens`` tokens.

Every error is an :class:`~serving.errors.InvalidParameterError` whose message names the field
and its limit. No numpy, no torch: numpy scalars (what a Triton tensor holds) are recognised by
their ``numbers`` ABCs.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Collection, Iterable
from typing import Any, Optional

from serving.errors import InvalidParameterError, PromptTooLongError

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
SEED_LIMIT = 2**63  # seeds are in [0, 2**63)


def _is_bool(value: object) -> bool:
    return type(value).__name__ in ("bool", "bool_")  # bool, numpy.bool_


def _type_name(value: object) -> str:
    return "boolean" if _is_bool(value) else type(value).__name__


def check_int(name: str, value: Any, *, lo: Optional[int] = None, hi: Optional[int] = None,
              why: str = "") -> int:
    """``value`` as an int in [lo, hi] (either end open when None). Refuses bools, floats
    (8.0 too: the type is the promise), strings; the range is checked on the exact value."""
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise InvalidParameterError(f"{name} must be an integer, got {value!r} ({_type_name(value)})")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = (f"in [{lo}, {hi}]" if lo is not None and hi is not None
                else f">= {lo}" if lo is not None else f"<= {hi}")
        raise InvalidParameterError(f"{name} must be {span}{why}, got {value}")
    return value


def check_float(name: str, value: Any) -> float:
    """``value`` as a finite float; ints are numbers too, bools and strings are not."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise InvalidParameterError(f"{name} must be a number, got {value!r} ({_type_name(value)})")
    out = float(value)
    if not math.isfinite(out):
        raise InvalidParameterError(f"{name} must be finite, got {out}")
    return out


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a bool: only true or false ("yes", 1 and None are not)."""
    if not _is_bool(value):
        raise InvalidParameterError(f"{name} must be a boolean (true or false), got {value!r} ({_type_name(value)})")
    return bool(value)


def check_strings(name: str, value: Any) -> tuple[str, ...]:
    """One string or a list/tuple of non-empty strings, as a tuple (None: empty)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    elif not isinstance(value, (list, tuple)):
        raise InvalidParameterError(f"{name} must be a string or a list of strings, got {value!r} "
                                    f"({_type_name(value)})")
    for i, s in enumerate(value):
        if not isinstance(s, str) or not s:
            raise InvalidParameterError(f"{name}[{i}] must be a non-empty string, got {s!r}")
    return tuple(value)


def closest(name: str, known: Iterable[str]) -> Optional[str]:
    """The valid name ``name`` is most likely a misspelling of, or None."""
    matches = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return matches[0] if matches else None


def check_known_fields(given: Iterable[str], known: Collection[str], *, where: str = "") -> None:
    """Refuse the first field of ``given`` that is not in ``known``, naming the closest one."""
    for name in given:
        if name in known:
            continue
        guess = closest(name, known)
        hint = f"did you mean {guess!r}?" if guess else f"valid fields: {', '.join(sorted(known))}"
        raise InvalidParameterError(f"unknown field {name!r}{where}: {hint}")


def max_new_tokens_limit(n_positions: int) -> int:
    """The most new tokens a request may ask for: the context less one prompt token."""
    return n_positions - 1


def check_max_new_tokens(value: Any, *, n_positions: Optional[int] = None,
                         field_name: str = "max_new_tokens") -> int:
    """An int in [1, n_positions - 1] (only >= 1 while the context is not known)."""
    if n_positions is None:
        return check_int(field_name, value, lo=1)
    return check_int(field_name, value, lo=1, hi=max_new_tokens_limit(n_positions),
                     why=f" (n_positions={n_positions} less at least one prompt token)")


def check_prompt_bytes(text: str, *, n_positions: int, max_new_tokens: int, max_token_bytes: int,
                       field_name: str = "prompt", max_new_tokens_field: str = "max_new_tokens") -> None:
    """Refuse, before tokenizing, a text that cannot fit in the context: more UTF-8 bytes
    than (n_positions - max_new_tokens) tokens of at most max_token_bytes bytes can hold."""
    room = max(n_positions - max_new_tokens, 0)
    limit = room * max(max_token_bytes, 1)
    if len(text) <= limit // 4:  # 4 bytes per character at most: no need to encode
        return
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > limit:
        raise PromptTooLongError(
            f"prompt too long: {field_name} has {size} UTF-8 bytes, more than the {limit} that "
            f"n_positions={n_positions} - {max_new_tokens_field}={max_new_tokens} = {room} tokens can hold "
            f"(a token is at most {max_token_bytes} bytes); refused before tokenizing")
