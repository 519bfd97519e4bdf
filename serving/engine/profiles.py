"""TensorRT optimisation profiles over the graph's three symbolic sizes (batch rows, new tokens,
cached tokens): the defaults, the check that they cover a KV pool, and past-length bucketing.
Plain numpy: the engine builder (export/tensorrt) and the TensorRT runtime both use them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from serving import tensors


@dataclass(frozen=True)
class AxisRange:
    """min / opt / max of one symbolic axis in an optimisation profile."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        for field in ("min", "opt", "max"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"AxisRange.{field} must be an int >= 0, got {value!r}")
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"AxisRange needs min <= opt <= max, got {self.min} / {self.opt} / {self.max}")

    def __contains__(self, value: int) -> bool:
        return self.min <= value <= self.max


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimisation profile over the graph's three symbolic sizes: batch rows,
    new tokens (sequence_length) and cached tokens (past_sequence_length)."""

    name: str
    batch: AxisRange
    seq: AxisRange
    past: AxisRange

    def __post_init__(self) -> None:
        if self.batch.min < 1 or self.seq.min < 1:
            raise ValueError(f"profile {self.name!r}: batch and seq minima must be >= 1, got "
                             f"batch {self.batch.min}, seq {self.seq.min}")

    def accepts(self, batch: int, seq: int, past: int) -> bool:
        return batch in self.batch and seq in self.seq and past in self.past

    def shapes(self, n_layer: int, n_head: int, head_dim: int) -> dict[str, tuple[tuple[int, ...], ...]]:
        """(min, opt, max) shape of every graph input, by the tensor table's names."""
        def at(k: str) -> tuple[tuple[int, ...], ...]:
            out = []
            for b, t, p in ((self.batch.min, self.seq.min, self.past.min),
                            (self.batch.opt, self.seq.opt, self.past.opt),
                            (self.batch.max, self.seq.max, self.past.max)):
                out.append({"ids": (b, t), "mask": (b, p + t), "kv": (b, n_head, p, head_dim)}[k])
            return tuple(out)

        shapes = {tensors.INPUT_IDS: at("ids"), tensors.POSITION_IDS: at("ids"),
                  tensors.ATTENTION_MASK: at("mask")}
        for i in range(n_layer):
            shapes[tensors.past_key(i)] = at("kv")
            shapes[tensors.past_value(i)] = at("kv")
        return shapes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Profile:
        return cls(name=str(data["name"]), batch=AxisRange(**data["batch"]), seq=AxisRange(**data["seq"]),
                   past=AxisRange(**data["past"]))


def default_profiles(*, n_positions: int, max_batch: int) -> tuple[Profile, ...]:
    """Two profiles: `decode` (T == 1, up to max_batch rows, any past) and `prefill` (prompts of
    2..n_positions tokens, also after a past). TensorRT picks kernels for each profile's opt
    shape: full decode batches at half the context, one 128-token prompt."""
    if n_positions < 2:
        raise ValueError(f"n_positions must be >= 2 for a decode and a prefill profile, got {n_positions}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    decode = Profile("decode", batch=AxisRange(1, max_batch, max_batch), seq=AxisRange(1, 1, 1),
                     past=AxisRange(0, n_positions // 2, n_positions - 1))
    prefill = Profile("prefill", batch=AxisRange(1, 1, max_batch),
                      seq=AxisRange(2, min(128, n_positions), n_positions),
                      past=AxisRange(0, 0, n_positions - 2))
    return decode, prefill


def check_profiles(profiles: Sequence[Profile], *, n_positions: int, max_sequences: int,
                   max_length: int) -> None:
    """The profiles cover every call the scheduler makes for a pool of `max_sequences` slots x
    `max_length` positions (config.pbtxt's max_batch_size, the model's n_positions); ValueError
    naming the field and the limit otherwise."""
    if not profiles:
        raise ValueError("at least one optimisation profile is needed")
    if max_length > n_positions:
        raise ValueError(f"KV pool max_length {max_length} exceeds the model's n_positions {n_positions}")
    # decode: a batch of up to max_sequences rows, one token, past up to max_length - 1
    if not any(1 in p.seq and p.batch.min <= 1 and p.batch.max >= max_sequences and p.past.min == 0
               and p.past.max >= max_length - 1 for p in profiles):
        best = max((p.batch.max for p in profiles if 1 in p.seq), default=0)
        raise ValueError(
            f"no optimisation profile takes decode steps of up to max_sequences={max_sequences} rows "
            f"(config.pbtxt max_batch_size) x 1 token with past 0..{max_length - 1}; the largest decode "
            f"batch of the profiles is {best}: rebuild the engine with --max-batch {max_sequences}")
    # prompts: one row of up to max_length tokens on an empty past, 2+ tokens after a past
    if not any(p.batch.min <= 1 and p.seq.max >= max_length and p.past.min == 0 for p in profiles):
        raise ValueError(f"no optimisation profile takes a prompt of max_length={max_length} tokens "
                         f"(seq max >= {max_length} with past 0)")
    if not any(p.batch.min <= 1 and p.seq.min <= 2 <= p.seq.max and p.past.max >= max_length - 2
               for p in profiles):
        raise ValueError(f"no optimisation profile takes a 2-token step after a past of "
                         f"{max_length - 2} (past max >= {max_length - 2})")


def bucket_past(columns: int, *, profile: Profile, limit: int, bucket: int) -> int:
    """The engine past length for `columns` used pool columns: rounded up to a multiple of
    `bucket`, within the profile and at most `limit` (max_length - T)."""
    want = -(-columns // bucket) * bucket if bucket > 1 else columns
    P = max(columns, min(want, limit, profile.past.max), profile.past.min)
    if P not in profile.past or P > limit:
        raise ValueError(f"past length {columns} does not fit profile {profile.name!r} "
                         f"(past {profile.past.min}..{profile.past.max}, at most {limit} here)")
    return P
