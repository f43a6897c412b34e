"""The wire format: frames round-trip without copies, malformed bytes fail clearly."""

import struct

import numpy as np
import pytest

import statehost
from statehost.wire import (
    MAGIC,
    PROTOCOL,
    decode,
    encode,
    local_versions,
    pack,
    state_ref,
    unpack,
    version_problems,
)


def test_frame_round_trip_keeps_arrays_out_of_band():
    big = np.arange(300_000, dtype=np.float32)
    section = pack({"x": big, "n": 3})
    assert len(section.buffers) == 1 and section.buffers[0].nbytes == big.nbytes
    assert len(section.payload) < 1000  # the array is not inside the pickle
    encoded = encode({"kind": "test"}, {"args": section})
    frame = decode(encoded.to_bytes())
    assert frame.header["kind"] == "test"
    assert frame.header["versions"] == local_versions()
    out = frame.sections["args"].load()
    np.testing.assert_array_equal(out["x"], big)
    assert out["n"] == 3
    assert frame.section_nbytes("args") == section.nbytes
    assert "missing" not in frame.sections and frame.section_nbytes("missing") == 0


def test_chunks_join_to_the_same_bytes_and_respect_the_size():
    section = pack([np.ones(200_000), np.zeros(5), np.ones((3, 70_000))])
    encoded = encode({}, {"a": section, "b": pack("small")})
    chunks = list(encoded.chunks(64 * 1024))
    assert max(memoryview(c).nbytes for c in chunks) <= 64 * 1024
    assert b"".join(bytes(c) for c in chunks) == encoded.to_bytes()
    assert sum(memoryview(c).nbytes for c in chunks) == encoded.nbytes


def test_states_become_references_and_come_back_as_the_receivers_objects():
    w = statehost.ParamState(np.ones(3), name="w")
    section = pack({"w": w, "again": w})
    assert section.states == [w]
    assert section.buffers == []  # the value does not travel
    resident = statehost.ParamState(np.zeros(3))
    seen = []

    def load(ref):
        seen.append(ref)
        return resident

    out = unpack([memoryview(section.payload), *section.buffers], load)
    assert out["w"] is resident and out["again"] is resident
    assert seen == [state_ref(w)] * 2  # pickle does not memoize persistent ids
    assert seen[0].id == w.id and seen[0].cls is statehost.ParamState and seen[0].name == "w"


def test_states_are_refused_where_none_may_appear():
    section = pack(statehost.ParamState(np.ones(2)))
    with pytest.raises(statehost.WireError, match="refers to a State"):
        unpack([memoryview(section.payload)])


def test_pack_without_refs_keeps_the_whole_state():
    w = statehost.ParamState(np.arange(3.0), name="w")
    section = pack(w, refs=False)
    twin = unpack([memoryview(section.payload), *section.buffers])
    assert twin.id == w.id and twin.name == "w"
    np.testing.assert_array_equal(twin.value, w.value)


def _frame_bytes():
    return encode({"k": 1}, {"a": pack(np.ones(10))}).to_bytes()


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda b: b[:5], "fewer than the 8-byte preamble"),
        (lambda b: b"XXXX" + b[4:], "starts with b'XXXX'"),
        (lambda b: MAGIC + struct.pack("<I", 10**6) + b[8:], "header claims 1000000 bytes"),
        (lambda b: MAGIC + struct.pack("<I", 3) + b"{x}" + b"\0\0\0\0", "not valid JSON"),
        (lambda b: MAGIC + struct.pack("<I", 2) + b"[]" + b"\0\0\0\0", "JSON list"),
        (lambda b: b[:-3], "claims 80 bytes but only 77 remain"),
        (lambda b: b + b"junk", "4 bytes follow the last buffer"),
    ],
)
def test_malformed_frames_say_what_is_wrong(mangle, message):
    with pytest.raises(statehost.WireError, match="not a valid statehost frame") as info:
        decode(mangle(_frame_bytes()))
    assert message in str(info.value)


def test_sections_must_fit_the_buffers():
    body = bytearray(encode({"sections_override": True}).to_bytes())
    body = body.replace(b'"sections":{}', b'"sections":{"a":[0,5]}')
    body[4:8] = struct.pack("<I", len(body) - 12)
    with pytest.raises(statehost.WireError, match="do not fit 0 buffers"):
        decode(bytes(body))


def test_version_problems_name_both_sides():
    mine = local_versions()
    assert version_problems(mine, dict(mine), me="client", them="server") == []
    patch = {**mine, "statehost": "99.0"}  # statehost itself may differ
    assert version_problems(mine, patch, me="client", them="server") == []
    other = {**mine, "jax": "0.4.30", "cloudpickle": "2.2.1", "protocol": PROTOCOL + 1}
    problems = version_problems(mine, other, me="client", them="server")
    assert len(problems) == 3
    assert f"jax: client has {mine['jax']}, server has 0.4.30" in problems
    assert version_problems(mine, {}, me="client", them="server")[0].endswith("server has unknown")


@pytest.mark.parametrize("header, message", [
    (b"[" * 100_000 + b"]" * 100_000, "nests deeper than 8 levels"),
    (b'{"a":' * 9 + b"1" + b"}" * 9, "nests deeper than 8 levels"),
])
def test_deep_headers_are_refused(header, message):
    body = MAGIC + struct.pack("<I", len(header)) + header + b"\0\0\0\0"
    with pytest.raises(statehost.WireError, match=message):
        decode(body)


def test_brackets_inside_strings_do_not_count_as_nesting():
    frame = decode(encode({"note": "[[[[[[[[[[[[[[{{{{{{{{{\\\"[["}).to_bytes())
    assert frame.header["note"].startswith("[[[")


def test_huge_declared_headers_are_refused():
    body = MAGIC + struct.pack("<I", 2**31) + b"{}"
    with pytest.raises(statehost.WireError, match="more than the limit"):
        decode(body)


@pytest.mark.parametrize("layout", ['{"a":["0",1]}', '{"a":[0,1.5]}', '{"a":[true,1]}', '[]'])
def test_section_layouts_must_be_integer_pairs(layout):
    body = bytearray(encode({}).to_bytes())
    body = body.replace(b'"sections":{}', b'"sections":' + layout.encode())
    body[4:8] = struct.pack("<I", len(body) - 12)
    with pytest.raises(statehost.WireError, match="do not fit 0 buffers"):
        decode(bytes(body))
