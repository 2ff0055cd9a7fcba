"""models/gguf_reader.open_gguf shares one parsed reader per file within a process, and parses a
file again once it changed (its size or modification time)."""
import os

from jaxserve.models import gguf_reader


def _write(path, value):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("test.value", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_one_reader_per_file_until_the_file_changes(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    _write(a, 1)
    _write(b, 2)
    ra = gguf_reader.open_gguf(str(a))
    assert gguf_reader.open_gguf(str(a)) is ra
    assert gguf_reader._field(ra, "test.value") == 1
    rb = gguf_reader.open_gguf(str(b))
    assert rb is not ra and gguf_reader._field(rb, "test.value") == 2
    _write(a, 3)
    st = os.stat(a)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a rewrite within the clock's resolution
    ra2 = gguf_reader.open_gguf(str(a))
    assert ra2 is not ra and gguf_reader._field(ra2, "test.value") == 3


def _embedded_path():
    from jaxserve.config import ModelConfig
    from jaxserve.models import loader

    kind, path = loader.resolve(ModelConfig())
    assert kind == "gguf"
    return path


def test_the_header_reader_equals_the_gguf_packages_on_the_embedded_model():
    """gguf_file.GGUFFile against gguf.GGUFReader (the oracle) on the embedded model's file: every
    metadata value, every tensor's name, type, shape and bytes; dequantize() against
    gguf.quants.dequantize on every tensor, bit for bit."""
    import gguf
    import numpy as np

    from jaxserve.models import gguf_file

    path = _embedded_path()
    ours, theirs = gguf_file.GGUFFile(path), gguf.GGUFReader(path)
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]
    assert list(ours.metadata) == keys
    for k in keys:
        want, got = theirs.fields[k].contents(), ours.metadata[k]
        if isinstance(got, np.ndarray):
            got = got.tolist()
        assert got == want, k
    assert len(ours.tensors) == len(theirs.tensors) > 0
    types = set()
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.name, a.ggml_type, a.shape) == (b.name, int(b.tensor_type), tuple(reversed(b.shape.tolist())))
        assert a.data.shape == b.data.shape and np.array_equal(a.data.view(np.uint8), np.asarray(b.data).view(np.uint8))
        np.testing.assert_array_equal(gguf_file.dequantize(a), gguf.quants.dequantize(b.data, b.tensor_type).reshape(a.shape))
        types.add(b.tensor_type.name)
    assert {"Q4_1", "F32"} <= types  # a block-quantized type and a plain one were compared


def test_every_value_type_and_bad_files_are_explained(tmp_path):
    import gguf
    import numpy as np
    import pytest

    from jaxserve.models import gguf_file

    path = tmp_path / "all.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    values = {"u8": 200, "i8": -3, "u16": 60000, "i16": -300, "u32": 4_000_000_000, "i32": -7, "u64": 2**40,
              "i64": -(2**40), "f32": 0.5, "f64": 0.25, "flag": True, "name": "héllo"}
    for k, v in values.items():
        getattr(w, {"u8": "add_uint8", "i8": "add_int8", "u16": "add_uint16", "i16": "add_int16", "u32": "add_uint32",
                    "i32": "add_int32", "u64": "add_uint64", "i64": "add_int64", "f32": "add_float32",
                    "f64": "add_float64", "flag": "add_bool", "name": "add_string"}[k])(f"t.{k}", v)
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.strs", ["a", "bc", ""])
    x = np.arange(64 * 3, dtype=np.float32).reshape(3, 64) / 7
    w.add_tensor("plain", x)
    w.add_tensor("q8", gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = gguf_file.GGUFFile(str(path))
    assert {k: f.metadata[f"t.{k}"] for k in values} == values
    assert f.metadata["t.ints"].tolist() == [1, 2, 3] and f.metadata["t.strs"] == ["a", "bc", ""]
    plain, q8 = f.tensors
    np.testing.assert_array_equal(gguf_file.dequantize(plain), x)
    assert q8.shape == (3, 64) and q8.data.shape == (3, 2 * 34)  # two Q8_0 blocks of 34 bytes a row
    np.testing.assert_allclose(gguf_file.dequantize(q8), x, atol=np.abs(x).max() / 100)
    for head in (b"PK\x03\x04" + bytes(60), b""):  # another format; an empty file
        (tmp_path / "not.gguf").write_bytes(head)
        with pytest.raises(ValueError, match="not a GGUF file"):
            gguf_file.GGUFFile(str(tmp_path / "not.gguf"))
    data = path.read_bytes()
    for cut in (len(data) - 100, 40):  # in the tensors' data, in the header
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="is truncated"):
            gguf_file.GGUFFile(str(tmp_path / "cut.gguf"))
