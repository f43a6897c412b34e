"""statehost.server.persistence.files: state files (round trip, atomic writes, damage),
sharding."""

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from statehost.random import RandomState
from statehost.server.persistence.files import (
    DamagedStateError,
    describe_sharding,
    load_value,
    place,
    save_value,
)
from statehost.transform import pmap
from tests.core.models import PARAM, Affine


def _tree():
    return {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "seq": [
            np.int32(-7),
            np.zeros((0, 4), np.uint32),
            (np.array([True, False, True]), np.array(1.5, np.float16)),
        ],
        "key": jnp.array([0, 42], dtype=jnp.uint32),  # a RandomState-like raw key
        "scalar0d": jnp.float32(3.0),
        "bf16": jnp.arange(4, dtype=jnp.bfloat16),
        "nothing": None,
    }


def _assert_same_tree(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        w = np.asarray(w)
        assert isinstance(g, np.ndarray)
        assert (g.dtype, g.shape) == (w.dtype, w.shape)
        np.testing.assert_array_equal(g, w)


def _good_file(tmp_path, value=None):
    path = tmp_path / "state.safetensors"
    save_value(path, _tree() if value is None else value, meta={"name": "w"})
    return path


def _split(data):
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def _join(header, body):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


# -- round trip ----------------------------------------------------------------------


def test_round_trip_keeps_structure_dtypes_shapes_and_meta(tmp_path):
    path = tmp_path / "deep" / "dir" / "state.safetensors"
    written = save_value(path, _tree(), meta={"name": "weights", "step": "12"})
    assert written == path.stat().st_size
    value, meta = load_value(path)
    _assert_same_tree(value, _tree())
    assert value["scalar0d"].shape == ()
    assert value["seq"][1].shape == (0, 4)
    assert meta == {"name": "weights", "step": "12"}


@pytest.mark.parametrize("value", [[], {}, np.float32(1.0), (np.ones(3, np.int32),)])
def test_round_trip_of_small_and_empty_trees(tmp_path, value):
    path = tmp_path / "s.safetensors"
    save_value(path, value)
    got, meta = load_value(path)
    _assert_same_tree(got, value)
    assert meta == {}


def test_param_state_after_pmap_round_trips_with_its_sharding(tmp_path):
    model = Affine(8)
    f = pmap(model, in_axes=0, state_in_axes={0: PARAM}, state_out_axes={0: PARAM})
    f(jnp.arange(32.0).reshape(8, 4))
    orig = model.weight.value
    desc = describe_sharding(orig)
    # statehost's pmap (jax 0.10) leaves a NamedSharding over a 1-d mesh of all devices.
    assert desc[0]["kind"] == "named"
    assert desc[0]["device_ids"] == [d.id for d in jax.devices()]

    save_value(tmp_path / "w.safetensors", orig)
    json.dumps(desc)  # the description is stored as JSON next to the file
    loaded, _ = load_value(tmp_path / "w.safetensors")
    placed = place(loaded, json.loads(json.dumps(desc)))
    assert placed.sharding.is_equivalent_to(orig.sharding, orig.ndim)
    assert describe_sharding(placed) == desc
    np.testing.assert_array_equal(placed, orig)

    model.weight.value = placed  # the restored value works as the pmap's state again
    out = f(jnp.ones((8, 4)))
    np.testing.assert_array_equal(out, np.asarray(orig) + 1)
    assert model.weight.value.sharding.is_equivalent_to(orig.sharding, 2)


def test_random_state_key_round_trips_and_continues_the_stream(tmp_path):
    rng = RandomState(7)
    rng.split_key()
    save_value(tmp_path / "rng.safetensors", rng.value)
    key, _ = load_value(tmp_path / "rng.safetensors")
    assert (key.dtype, key.shape) == (np.uint32, (2,))
    restored = RandomState(0)
    restored.value = key
    np.testing.assert_array_equal(restored.split_key(), rng.split_key())


def _mesh_2d():
    return Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))


@pytest.mark.parametrize(
    "make_sharding",
    [
        lambda: NamedSharding(_mesh_2d(), PartitionSpec("x", "y")),
        lambda: NamedSharding(_mesh_2d(), PartitionSpec(("x", "y"), None)),
        lambda: NamedSharding(_mesh_2d(), PartitionSpec(None, "y")),
        lambda: SingleDeviceSharding(jax.devices()[3]),
    ],
    ids=["x-y", "xy-none", "none-y", "single-3"],
)
def test_place_restores_described_sharding(make_sharding):
    sharding = make_sharding()
    orig = jax.device_put(jnp.arange(64.0).reshape(8, 8), sharding)
    desc = json.loads(json.dumps(describe_sharding([orig])))
    (placed,) = place([np.asarray(orig)], desc)
    assert placed.sharding.is_equivalent_to(sharding, 2)
    assert describe_sharding([placed]) == desc


def test_describe_numpy_leaves_as_default():
    assert describe_sharding({"a": np.ones(2), "b": [1.0]}) == [{"kind": "default"}] * 2


# -- atomic writes -------------------------------------------------------------------


def test_leftover_tmp_file_from_a_crash_does_not_affect_load(tmp_path):
    path = _good_file(tmp_path)
    new = tmp_path / "new.safetensors"
    save_value(new, {"other": np.ones(100, np.float32)})
    # A crash mid-write leaves a truncated file under the temporary name.
    path.with_name(path.name + ".tmp-1234-deadbeef").write_bytes(new.read_bytes()[:-50])
    value, meta = load_value(path)
    _assert_same_tree(value, _tree())
    assert meta == {"name": "w"}


def test_overwrite_loads_the_new_value_and_leaves_no_tmp_file(tmp_path):
    path = _good_file(tmp_path)
    save_value(path, {"v": np.full(5, 2, np.int32)}, meta={"gen": "2"})
    value, meta = load_value(path)
    _assert_same_tree(value, {"v": np.full(5, 2, np.int32)})
    assert meta == {"gen": "2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.safetensors"]


def test_failed_replace_removes_its_tmp_file(tmp_path):
    target = tmp_path / "taken"
    (target / "child").mkdir(parents=True)  # os.replace cannot overwrite a non-empty dir
    with pytest.raises(OSError):
        save_value(target, [np.ones(3)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


# -- damaged files -------------------------------------------------------------------


def _garbage(path):
    path.write_bytes(b"this is not a state file, only some garbage bytes")


def _tiny(path):
    path.write_bytes(b"\x01\x02")


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-10])


def _flip_tensor_byte(path):
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x01
    path.write_bytes(bytes(data))


def _wrong_shape(path):
    header, body = _split(path.read_bytes())
    name = next(k for k, v in header.items() if v.get("shape") == [2, 3])
    header[name]["shape"] = [3, 3]
    path.write_bytes(_join(header, body))


def _swapped_shape(path):
    # Same byte size, so the tensor table is consistent; the checksum covers shapes too.
    header, body = _split(path.read_bytes())
    name = next(k for k, v in header.items() if v.get("shape") == [2, 3])
    header[name]["shape"] = [3, 2]
    path.write_bytes(_join(header, body))


def _overlong_offsets(path):
    header, body = _split(path.read_bytes())
    name = next(k for k, v in header.items() if v.get("shape") == [2, 3])
    header[name]["data_offsets"][1] += len(body) + 100
    path.write_bytes(_join(header, body))


def _foreign_safetensors(path):
    from safetensors.numpy import save

    path.write_bytes(save({"w": np.ones(3, np.float32)}))


def _edited_meta(path):
    header, body = _split(path.read_bytes())
    header["__metadata__"]["statehost.meta"] = json.dumps({"name": "evil"})
    path.write_bytes(_join(header, body))


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda p: p.unlink(), "missing: no such file"),
        (_garbage, "unreadable header"),
        (_tiny, "unreadable header: the file has only 2 bytes"),
        (_truncate, "truncated: its tensors need"),
        (_flip_tensor_byte, "checksum mismatch"),
        (_wrong_shape, "inconsistent tensor table"),
        (_swapped_shape, "checksum mismatch"),
        (_overlong_offsets, "truncated"),
        (_foreign_safetensors, "not a statehost-state/1 file"),
        (_edited_meta, "checksum mismatch"),
    ],
    ids=lambda x: getattr(x, "__name__", None) if callable(x) else None,
)
def test_damaged_file_raises_naming_the_file_and_the_damage(tmp_path, damage, match):
    path = _good_file(tmp_path)
    damage(path)
    with pytest.raises(DamagedStateError, match=match) as info:
        load_value(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_directory_in_place_of_file_is_unreadable(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(DamagedStateError, match="unreadable file"):
        load_value(tmp_path / "d")


# -- caller mistakes -----------------------------------------------------------------


@pytest.mark.parametrize("meta", [{"statehost.crc32": "x"}, {"n": 1}, {2: "x"}])
def test_bad_meta_is_rejected(tmp_path, meta):
    with pytest.raises(TypeError, match=r"Meta keys and values must both be str"):
        save_value(tmp_path / "m.safetensors", [np.ones(1)], meta=meta)
    assert list(tmp_path.iterdir()) == []


def test_unstorable_dtype_is_rejected(tmp_path):
    with pytest.raises(TypeError, match=r"leaf 1 has dtype <U3, which a state file cannot"):
        save_value(tmp_path / "s.safetensors", [np.ones(1), np.array(["abc"])])


# -- placement fallback --------------------------------------------------------------


def _named_desc_with(device_ids):
    return {
        "kind": "named",
        "mesh_shape": [len(device_ids)],
        "axis_names": ["i"],
        "axis_types": ["Auto"],
        "device_ids": device_ids,
        "spec": ["i"],
    }


@pytest.mark.parametrize(
    "shardings",
    [
        [{"kind": "single", "device_id": 99}],
        [_named_desc_with([0, 1, 2, 99])],
        [_named_desc_with([0, 1, 2])],  # 8 rows do not split over 3 devices
        [{"kind": "named"}],
        [{"kind": "unknown"}],
        ["not a dict"],
        [{"kind": "default"}, {"kind": "default"}],  # one entry too many
        None,
    ],
)
def test_place_falls_back_to_the_default_device(shardings):
    (placed,) = place([np.arange(8.0).reshape(8, 1)], shardings)
    assert isinstance(placed, jax.Array)
    assert placed.devices() == {jax.devices()[0]}
    np.testing.assert_array_equal(placed, np.arange(8.0).reshape(8, 1))


def test_an_uncommitted_value_comes_back_uncommitted():
    value = jax.device_put(np.ones((8, 4), np.float32))
    assert not value.committed
    assert describe_sharding(value) == [{"kind": "default"}]
    placed = place(np.asarray(value), describe_sharding(value))
    assert not placed.committed
    committed = jax.device_put(np.ones(3), jax.devices()[1])
    assert describe_sharding(committed) == [{"kind": "single", "device_id": 1}]
