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
