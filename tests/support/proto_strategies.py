"""Hypothesis strategies for any protobuf message, built from its descriptor
(what hypothesis-protobuf did, for today's protobuf): every field gets values
from a hostile default strategy, mixed with the plausible values a test gives
as hints (`{"account_no": st.sampled_from(real_accounts)}`), so the fuzz
reaches past validation into the money paths as well as hitting its edges."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
REPEATED_MAX = 4
DEPTH_MAX = 3
HINT_WEIGHT = 7  # a hinted field takes a plausible value 7 times in 8

HOSTILE_STRINGS = ["", " ", "x" * 33, "x" * 300, "\x00", "流水1", "０１２３", "a;b", "-", "BRV-1", "0" * 10,
                   "2026-11-28", "2026-13-45", "99999999", "'; DROP TABLE payments; --"]
SERIAL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-"
HOSTILE_INTS = [0, 1, -1, 999_999_999, 1_000_000_000, 1_000_000_001, INT64_MAX, INT64_MIN, 2**53 + 1]


def _string() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(HOSTILE_STRINGS), st.text(max_size=40),
                     st.text(SERIAL_ALPHABET, min_size=1, max_size=32), st.text("0123456789", max_size=12))


def _scalar(field: FieldDescriptor, hints: Mapping[str, st.SearchStrategy[Any]], depth: int
            ) -> st.SearchStrategy[Any]:
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return _string()
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_ENUM:
        return st.integers(-3, len(field.enum_type.values) + 3)  # open enums: unknown numbers too
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return st.one_of(st.sampled_from(HOSTILE_INTS), st.integers(-10, 2_000_000), st.integers(INT64_MIN, INT64_MAX))
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return st.integers(INT32_MIN, INT32_MAX)
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, width=32 if t == FieldDescriptor.TYPE_FLOAT else 64)
    if t == FieldDescriptor.TYPE_MESSAGE:
        return _message(field.message_type, hints, depth + 1)
    raise TypeError(f"field type {t} of {field.full_name}")


def _message(desc: Descriptor, hints: Mapping[str, st.SearchStrategy[Any]], depth: int
             ) -> st.SearchStrategy[Message]:
    from google.protobuf import message_factory
    cls = message_factory.GetMessageClass(desc)
    if depth > DEPTH_MAX:
        return st.just(cls())
    plausible: dict[str, st.SearchStrategy[Any]] = {}
    hostile: dict[str, st.SearchStrategy[Any]] = {}
    for f in desc.fields:
        base = _scalar(f, hints, depth)
        hint = hints.get(f.name)
        hostile[f.name] = st.lists(base, max_size=REPEATED_MAX) if f.is_repeated else base
        if hint is not None:
            plausible[f.name] = st.lists(hint, max_size=REPEATED_MAX) if f.is_repeated else hint
    # proto3 `optional` fields live in a synthetic one-field oneof: presence, not a choice
    real_oneofs = [o for o in desc.oneofs if len(o.fields) > 1 or not o.name.startswith("_")]

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        msg = cls()
        chosen: set[str] = set()
        for o in real_oneofs:
            pick = draw(st.sampled_from([None, *[f.name for f in o.fields]]))
            if pick is not None:
                chosen.add(pick)
        in_oneof = {f.name for o in real_oneofs for f in o.fields}
        for f in desc.fields:
            if f.name in in_oneof and f.name not in chosen:
                continue
            if f.name not in in_oneof and f.has_presence and draw(st.integers(0, 4)) == 0:
                continue  # leave an optional field unset now and then
            # a hinted field is plausible HINT_WEIGHT times in HINT_WEIGHT + 1, hostile otherwise
            use_hint = f.name in plausible and draw(st.integers(0, HINT_WEIGHT)) > 0
            value = draw(plausible[f.name] if use_hint else hostile[f.name])
            if f.is_repeated:
                container = getattr(msg, f.name)
                if f.type == FieldDescriptor.TYPE_MESSAGE:
                    for v in value:
                        container.add().CopyFrom(v)
                else:
                    container.extend(value)
            elif f.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(msg, f.name).CopyFrom(value)
            else:
                setattr(msg, f.name, value)
        return msg

    return build()


def messages(cls: type[Message], hints: Mapping[str, st.SearchStrategy[Any]] | None = None
             ) -> st.SearchStrategy[Message]:
    """Messages of `cls`; `hints` maps a field name (at any depth) to plausible values.
    Built once per (message type, hints object): building is slow, drawing is not."""
    hints = hints or {}
    key = (cls.DESCRIPTOR.full_name, id(hints))
    if key not in _BUILT or _BUILT[key][0] is not hints:
        _BUILT[key] = (hints, _message(cls.DESCRIPTOR, hints, 0))
    return _BUILT[key][1]


_BUILT: dict[tuple[str, int], tuple[Mapping[str, Any], st.SearchStrategy[Message]]] = {}
