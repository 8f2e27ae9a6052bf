"""What a sparse file can do to the reader (be refused, nothing else), and atomic saves."""

from __future__ import annotations

import copy
import json
import os
import re
import struct
import tempfile
import threading

import pytest
import torch
from torch import nn

from lightning_lobs.export import load_sparse, read_sparse, save_sparse
from sparse_fuzz import craft, join, rebuild, reseal, split

INVALID = "is not a valid lightning-lobs sparse file"


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return copy.deepcopy(model.state_dict())


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 100), nn.ReLU(), nn.Linear(100, 4))
    with torch.no_grad():
        model[0].weight[torch.rand(100, 8) < 0.5] = 0  # bitmask
        model[2].weight.zero_()
        model[2].weight[1, 3] = 1.5  # CSR
    return model


def saved(tmp_path, model: nn.Module | None = None, name: str = "m.lobs") -> tuple[nn.Module, bytes]:
    model = model or small_model()
    save_sparse(model, tmp_path / name)
    return model, (tmp_path / name).read_bytes()


def write(tmp_path, blob: bytes, name: str = "x.lobs"):
    path = tmp_path / name
    path.write_bytes(blob)
    return path


# --------------------------------------------------------------------------- the container


def test_file_is_a_standard_safetensors_file(tmp_path):
    """Any safetensors reader opens it: dense entries under their own key, sparse ones as plain parts."""
    safetensors = pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    model, _ = saved(tmp_path)
    with safetensors.safe_open(str(tmp_path / "m.lobs"), framework="pt") as f:
        meta = f.metadata()
        names = set(f.keys())
    assert meta["format"] == "lightning-lobs-sparse" and meta["format_version"] == "2"
    entries = {e["key"]: e for e in json.loads(meta["entries"])}
    assert entries["0.weight"]["encoding"] == "bitmask" and entries["2.weight"]["encoding"] == "csr"
    assert names == {
        "0.weight:bits",
        "0.weight:values",
        "0.bias",
        "2.weight:crow",
        "2.weight:col",
        "2.weight:values",
        "2.bias",
    }
    plain = load_file(str(tmp_path / "m.lobs"))
    assert torch.equal(plain["0.bias"], model[0].bias.detach())
    assert torch.equal(plain["2.weight:values"], torch.tensor([1.5]))
    assert plain["2.weight:col"].dtype == torch.int16 and plain["2.weight:col"].tolist() == [3]


def test_tied_weights_are_saved(tmp_path):
    """Two state_dict keys sharing one tensor (tied weights): safetensors refuses shared memory, we copy."""
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight
    save_sparse(model, tmp_path / "t.lobs")
    other = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    load_sparse(other, tmp_path / "t.lobs")
    assert torch.equal(other[0].weight, model[0].weight) and torch.equal(other[1].weight, model[0].weight)


def test_header_length_beyond_the_file_is_refused_before_reading_it(tmp_path):
    """The old format inflated a zlib header (199 KiB -> 402 MiB) before any check. Now a header length
    larger than the file is refused before the header is read, and a header that is not JSON (or nests
    deeper than the parser goes) is one ValueError."""
    _, blob = saved(tmp_path)
    liar = struct.pack("<Q", 400 << 20) + blob[8:] + b" " * (199 << 10)
    with pytest.raises(ValueError, match=rf"{INVALID}: its header claims 419,430,400 bytes"):
        read_sparse(write(tmp_path, liar))
    nested = b"[" * (100 << 10) + b"]" * (100 << 10)
    with pytest.raises(ValueError, match=rf"{INVALID}: its header is not JSON"):
        read_sparse(write(tmp_path, struct.pack("<Q", len(nested)) + nested))
    with pytest.raises(ValueError, match=rf"{INVALID}: 3 bytes, too short"):
        read_sparse(write(tmp_path, b"abc"))


def test_header_length_is_checked_exactly_against_the_file_and_the_cap(tmp_path):
    """One byte past the file, a length with the top bit set, one byte past safetensors' 100 MB cap: each
    refused by its length, naming both sizes. A header of exactly the cap is read (and refused as not JSON)."""
    _, blob = saved(tmp_path)
    rest = len(blob) - 8
    header_len = struct.unpack("<Q", blob[:8])[0]
    one_past = struct.pack("<Q", rest + 1) + blob[8:]
    with pytest.raises(
        ValueError, match=rf"{INVALID}: its header claims {rest + 1:,} bytes, the file has {rest:,} after"
    ):
        read_sparse(write(tmp_path, one_past))
    assert header_len < rest  # the saved file: header, then data
    top_bit = struct.pack("<Q", (1 << 64) - 1) + blob[8:]
    with pytest.raises(ValueError, match=rf"its header claims {(1 << 64) - 1:,} bytes"):
        read_sparse(write(tmp_path, top_bit))
    cap = 100_000_000
    for claimed, why in ((cap + 1, f"its header claims {cap + 1:,} bytes"), (cap, "its header is not JSON")):
        path = tmp_path / "big.lobs"
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", claimed))
            f.truncate(8 + cap + 8)  # sparse on disk: zeros
        with pytest.raises(ValueError, match=rf"{INVALID}: {why}"):
            read_sparse(path)
        path.unlink()


def test_small_file_declaring_a_huge_tensor_is_refused_by_read_sparse(tmp_path):
    """A few hundred bytes declaring an all-zero 1 GiB CSR tensor (and 4 TiB): refused before allocating."""
    for cols, col_dtype in ((1 << 28, torch.int32), (1 << 40, torch.int64)):
        entries = [{"key": "w", "dtype": "torch.float32", "shape": [1, cols], "encoding": "csr", "masked": False}]
        blob = craft(
            entries,
            {
                "w:crow": torch.zeros(2, dtype=torch.int32),
                "w:col": torch.zeros(0, dtype=col_dtype),
                "w:values": torch.zeros(0),
            },
        )
        assert len(blob) < 600
        path = write(tmp_path, blob)
        with pytest.raises(ValueError, match=rf"decodes to {4 * cols:,} bytes, more than read_sparse's limit"):
            read_sparse(path)
        with pytest.raises(ValueError, match=r"limit of 1,000 bytes \(max_bytes\)"):
            read_sparse(path, max_bytes=1000)
    # the limit is the documented one: 100x the file, at least 1 MiB; max_bytes raises it
    entries[0]["shape"] = [1, (1 << 20) // 4 + 1]  # 4 bytes over 1 MiB
    blob = craft(
        entries,
        {
            "w:crow": torch.zeros(2, dtype=torch.int32),
            "w:col": torch.zeros(0, dtype=torch.int32),
            "w:values": torch.zeros(0),
        },
    )
    with pytest.raises(ValueError, match="more than read_sparse's limit of 1,048,576 bytes"):
        read_sparse(write(tmp_path, blob))
    assert read_sparse(write(tmp_path, blob), max_bytes=1 << 21)["w"].count_nonzero() == 0
    with pytest.raises(ValueError, match="max_bytes must be"):
        read_sparse(write(tmp_path, blob), max_bytes=True)


# --------------------------------------------------------------------------- sparse structures against the model


def csr_file(crow: list[int], col: list[int], values: list[float], shape=(4, 8)) -> bytes:
    """A file for ``nn.Linear(8, 4, bias=False)`` whose weight is the given CSR parts (CRC valid)."""
    entries = [{"key": "weight", "dtype": "torch.float32", "shape": list(shape), "encoding": "csr", "masked": False}]
    return craft(
        entries,
        {
            "weight:crow": torch.tensor(crow, dtype=torch.int32),
            "weight:col": torch.tensor(col, dtype=torch.int16),
            "weight:values": torch.tensor(values),
        },
    )


@pytest.mark.parametrize(
    ("crow", "col", "why"),
    [
        ([0, 0, 0, 0, 1 << 27], [3], "row pointers run from 0 to 134217728"),  # the old +3 GiB file
        ([0, 1, 1, 1, 0], [3], "row pointers run from 0 to 0"),
        ([1, 1, 1, 1, 1], [3], "row pointers run from 1 to 1"),
        ([0, 1, 0, 1, 1], [3], "must rise from 0"),
        ([0, 1, 1, 1, 1], [9], "column index out of range 0..7"),  # used to land in the next row
        ([0, 1, 1, 1, 1], [-1], "column index out of range 0..7"),
    ],
)
def test_csr_structure_that_does_not_add_up_is_refused_and_the_model_kept(crow, col, why, tmp_path):
    model = nn.Linear(8, 4, bias=False)
    before = state_copy(model)
    path = write(tmp_path, csr_file(crow, col, [2.0]))
    with pytest.raises(ValueError, match=rf"^{re.escape(repr(str(path)))} {INVALID}: 'weight': .*{why}"):
        load_sparse(model, path)  # the message names the file
    assert unchanged(model, before)
    with pytest.raises(ValueError, match=why):
        read_sparse(path)


def test_csr_column_past_the_row_is_not_moved_to_the_next_row(tmp_path):
    """Row 0 holds column 9 of an 8-wide row: row-major that is (1, 1), before row 1's (1, 5). Refused."""
    path = write(tmp_path, csr_file([0, 1, 2, 2, 2], [9, 5], [2.0, 3.0]))
    with pytest.raises(ValueError, match="column index out of range 0..7"):
        load_sparse(nn.Linear(8, 4, bias=False), path)


def test_csr_columns_repeated_or_out_of_order_in_a_row_are_refused(tmp_path):
    for cols in ([3, 3], [5, 2]):
        with pytest.raises(ValueError, match="CSR column indices not increasing along a row"):
            read_sparse(write(tmp_path, csr_file([0, 2, 2, 2, 2], cols, [1.0, 2.0])))
    assert read_sparse(write(tmp_path, csr_file([0, 2, 2, 2, 2], [2, 5], [1.0, 2.0])))["weight"][0, 5] == 2.0


def test_bitmask_population_must_equal_the_value_count(tmp_path):
    entries = [{"key": "weight", "dtype": "torch.float32", "shape": [2, 6], "encoding": "bitmask", "masked": False}]

    def blob(bits: list[int], n_values: int) -> bytes:
        return craft(
            entries,
            {"weight:bits": torch.tensor(bits, dtype=torch.uint8), "weight:values": torch.arange(1.0, n_values + 1)},
        )

    model = nn.Linear(6, 2, bias=False)
    before = state_copy(model)
    for bits, n, why in (
        ([0b111, 0], 2, "3 bits set, the file holds 2 values"),
        ([0b1, 0], 2, "1 bits set, the file holds 2 values"),
        ([0b1, 0b10000], 1, "bits set beyond its entries"),
    ):  # bit 12 of 12 entries: padding
        with pytest.raises(ValueError, match=why):
            load_sparse(model, write(tmp_path, blob(bits, n)))
        assert unchanged(model, before)
    load_sparse(model, write(tmp_path, blob([0b101, 0b1000], 3)))
    assert model.weight.flatten().nonzero().flatten().tolist() == [0, 2, 11]


def test_bool_bytes_other_than_0_or_1_are_refused(tmp_path):
    entries = [{"key": "flags", "dtype": "torch.bool", "shape": [3], "encoding": "dense", "masked": False}]
    with pytest.raises(ValueError, match="a bool byte other than 0 or 1"):
        read_sparse(
            write(tmp_path, craft(entries, {"flags": torch.tensor([0, 7, 1], dtype=torch.uint8).view(torch.bool)}))
        )


# --------------------------------------------------------------------------- crafted headers with a valid CRC


def _records(tmp_path):
    _, blob = saved(tmp_path)
    return split(blob)


def _offsets_past_the_data(h, d):
    h["0.bias"]["data_offsets"] = [len(d) - 4, len(d) + 20]
    return h, d


def _negative_offset(h, d):
    h["0.bias"]["data_offsets"][0] = -24
    return h, d


def _short_nbytes(h, d):  # the record's bytes are fewer than its shape needs
    h["0.bias"]["shape"] = [7]
    return h, d


def _no_entries(h, d):
    del h["__metadata__"]["entries"]
    return h, d


def _gap(h, d):
    return rebuild(h, d, {"zz:pad": ("U8", [3], b"abc")})


def _overlap(h, d):
    begin = h["0.bias"]["data_offsets"][0]
    h["2.bias"]["data_offsets"] = [begin, begin + 16]  # the right size, over 0.bias's bytes
    return h, d


def _record_without_offsets(h, d):
    del h["0.bias"]["data_offsets"]
    return h, d


def _record_with_an_extra_field(h, d):
    h["0.bias"]["offsets"] = [0, 0]
    return h, d


def _record_not_a_mapping(h, d):
    h["0.bias"] = ["dtype", "shape", "data_offsets"]
    return h, d


def _dtype_not_a_string(h, d):  # a list cannot even be looked up in a dict
    h["0.bias"]["dtype"] = ["F32"]
    return h, d


def _bytes_after_the_last_tensor(h, d):
    return h, d + b"\0" * 8


def _unknown_dtype(h, d):
    h["0.bias"]["dtype"] = "F128"
    return h, d


def _bool_in_shape(h, d):
    h["0.bias"]["shape"] = [True] * 6
    return h, d


def _too_many_dims(h, d):  # a million huge dimensions would cost minutes of big-integer products
    h["0.bias"]["shape"] = [1 << 62] * 100_000
    return h, d


def _dim_of_2_63(h, d):
    h["0.bias"]["shape"] = [1 << 63]
    return h, d


def _missing_part(h, d):
    del h["2.weight:col"]
    return rebuild(h, d, {})  # the others packed again, without a gap


def _part_of_another_dtype(h, d):
    h["0.weight:bits"]["dtype"] = "I8"
    return h, d


def _entry_not_a_record(h, d):
    h["__metadata__"]["entries"] = json.dumps([["0.weight"]])
    return h, d


def _metadata_not_strings(h, d):
    h["__metadata__"]["kept_weights"] = 3
    return h, d


@pytest.mark.parametrize(
    ("craft_header", "why"),
    [
        (_offsets_past_the_data, "truncated: tensor '0.bias' ends at byte"),
        (_negative_offset, "data_offsets .* are not two counts"),
        (_short_nbytes, "do not hold its 28 bytes"),
        (_no_entries, "'entries' metadata is not JSON"),
        (_gap, "belongs to no entry"),
        (_overlap, "starts at byte"),
        (_record_without_offsets, "tensor '0.bias': not a safetensors tensor record"),
        (_record_with_an_extra_field, "tensor '0.bias': not a safetensors tensor record"),
        (_record_not_a_mapping, "tensor '0.bias': not a safetensors tensor record"),
        (_bytes_after_the_last_tensor, r"its tensors end at byte (\d+) of (?!\1)\d+ bytes of data"),
        (_dtype_not_a_string, r"unknown dtype \['F32'\]"),
        (_unknown_dtype, "unknown dtype 'F128'"),
        (_bool_in_shape, r"tensor '0.bias': shape \[True, True, True, True, True, True\] is not a list of counts"),
        (_too_many_dims, r"is not a list of counts \(at most 1024 dimensions"),
        (_dim_of_2_63, "each below 2"),
        (_missing_part, r"the csr part '2.weight:col' is missing"),
        (_part_of_another_dtype, "part '0.weight:bits' is torch.int8"),
        (_entry_not_a_record, "entry 0 is not a record"),
        (_metadata_not_strings, "metadata values are not all strings"),
    ],
)
def test_crafted_header_with_valid_crc_is_not_a_valid_file(craft_header, why, tmp_path):
    """Bad offsets, negative offsets, short byte counts, no entries...: one ValueError, never KeyError or a
    torch RuntimeError, and the model is untouched."""
    header, data = craft_header(*_records(tmp_path))
    path = write(tmp_path, join(reseal(header, data), data))
    model = small_model()
    before = state_copy(model)
    with pytest.raises(ValueError, match=rf"{INVALID}: .*{why}"):
        load_sparse(model, path)
    assert unchanged(model, before)
    with pytest.raises(ValueError, match=why):
        read_sparse(path)


def test_crc_mismatch_is_refused(tmp_path):
    header, data = _records(tmp_path)
    data = bytearray(data)
    data[-1] ^= 1
    with pytest.raises(ValueError, match=rf"{INVALID}: corrupted \(its CRC-32 does not match\)"):
        read_sparse(write(tmp_path, join(header, bytes(data))))


# --------------------------------------------------------------------------- formats and versions


def test_old_format_is_refused_with_how_to_convert(tmp_path):
    old = b"LOBSSPRS" + struct.pack("<II", 1, 12) + b"x\x9c" + b"\0" * 30
    with pytest.raises(ValueError, match=r"old sparse format \(version 1, 'LOBSSPRS'\).*lightning-lobs 0\.1\.0.*again"):
        load_sparse(small_model(), write(tmp_path, old))


def test_other_format_version_is_refused(tmp_path):
    header, data = _records(tmp_path)
    header["__metadata__"]["format_version"] = "3"
    model = small_model()
    before = state_copy(model)
    with pytest.raises(ValueError, match="has sparse format version 3; this lightning-lobs reads version 2"):
        load_sparse(model, write(tmp_path, join(reseal(header, data), data)))
    assert unchanged(model, before)


def test_safetensors_file_of_another_program_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a lightning-lobs sparse file .*without lightning-lobs metadata"):
        read_sparse(tmp_path / "plain.safetensors")


def test_same_element_count_other_shape_is_refused_before_anything_is_written(tmp_path):
    """The file's second layer is (4, 6), the model's (6, 4): same 24 elements. ValueError, and not even the
    first layer (which matches) is loaded."""
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(3, 3), nn.Linear(6, 4, bias=False))
    save_sparse(source, tmp_path / "m.lobs")
    target = nn.Sequential(nn.Linear(3, 3), nn.Linear(4, 6, bias=False))
    before = state_copy(target)
    with pytest.raises(
        ValueError,
        match=r"\(saved from a Sequential\) does not match this Sequential: "
        r"'1.weight' has shape \(4, 6\) in the file, \(6, 4\) in the model",
    ):
        load_sparse(target, tmp_path / "m.lobs")
    assert unchanged(target, before)


def test_a_shape_of_1024_dimensions_is_read_and_one_of_1025_refused(tmp_path):
    """The documented bound on dimensions (at most 1024) is inclusive."""
    entries = [{"key": "x", "dtype": "torch.float32", "shape": [1] * 1024, "encoding": "dense", "masked": False}]
    x = read_sparse(write(tmp_path, craft(entries, {"x": torch.full([1] * 1024, 2.5)})))["x"]
    assert x.dim() == 1024 and x.item() == 2.5
    entries[0]["shape"] = [1] * 1025
    with pytest.raises(ValueError, match=r"'x': shape .* is not a list of counts \(at most 1024 dimensions"):
        read_sparse(write(tmp_path, craft(entries, {"x": torch.full([1] * 1024, 2.5)})))


class ExtraState(nn.Module):
    """A module whose ``state_dict`` holds a non-tensor (``get_extra_state``) beside its weight."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))

    def get_extra_state(self):
        return {"step": 3}

    def set_extra_state(self, state) -> None:
        pass


def test_model_state_that_is_not_a_tensor_is_refused_by_name(tmp_path):
    """A file with an entry for every key of a model whose state holds a non-tensor: refused naming that key."""
    entries = [
        {"key": k, "dtype": "torch.float32", "shape": [2], "encoding": "dense", "masked": False}
        for k in ("weight", "_extra_state")
    ]
    path = write(tmp_path, craft(entries, {"weight": torch.full((2,), 5.0), "_extra_state": torch.zeros(2)}))
    model = ExtraState()
    with pytest.raises(ValueError, match=r"does not match this ExtraState: the model's '_extra_state' is not a tensor"):
        load_sparse(model, path)
    assert torch.equal(model.weight.detach(), torch.ones(2))


# --------------------------------------------------------------------------- atomic saves


def test_planted_symlinks_are_never_followed(tmp_path, monkeypatch):
    """A link at the old temporary name (<path>.tmp-<pid>), at the name mkstemp would draw first, and at the
    target itself: the victim file keeps its bytes; the target becomes a regular file."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    path = tmp_path / "m.lobs"
    os.symlink(victim, f"{path}.tmp-{os.getpid()}")
    names = iter(["planted", "fresh"] + [f"n{i}" for i in range(100)])
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: names)
    os.symlink(victim, tmp_path / ".m.lobs.planted.tmp")
    model = small_model()
    save_sparse(model, path)
    assert victim.read_bytes() == b"precious"
    os.remove(path)
    os.symlink(victim, path)
    save_sparse(model, path)
    assert victim.read_bytes() == b"precious" and not path.is_symlink()
    other = small_model()
    with torch.no_grad():
        other[0].bias.add_(1)
    load_sparse(other, path)
    assert torch.equal(other[0].bias, model[0].bias)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".m.lobs.planted.tmp", "m.lobs", f"m.lobs.tmp-{os.getpid()}", "victim.txt"]
    )


def test_concurrent_saves_to_one_path_all_succeed_and_the_last_wins(tmp_path):
    path = tmp_path / "m.lobs"
    models = []
    for i in range(4):
        torch.manual_seed(i)
        models.append(small_model())
        with torch.no_grad():
            models[-1][0].bias.fill_(i)
    barrier = threading.Barrier(len(models), timeout=60)
    errors: list[BaseException] = []

    def worker(model: nn.Module) -> None:
        try:
            for _ in range(10):
                barrier.wait()
                save_sparse(model, path)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)
            barrier.abort()  # the others stop waiting for this one

    threads = [threading.Thread(target=worker, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    state = read_sparse(path)  # one whole file, of one of the savers
    assert any(all(torch.equal(state[k], v) for k, v in m.state_dict().items()) for m in models)
    assert [p.name for p in tmp_path.iterdir()] == ["m.lobs"]  # no temporary file left
    save_sparse(models[1], path)
    save_sparse(models[2], path)
    assert torch.equal(read_sparse(path)["0.bias"], models[2][0].bias.detach())
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "m.lobs"
    model = small_model()
    save_sparse(model, path)
    old = path.read_bytes()

    def fail(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with torch.no_grad():
        model[0].bias.add_(1)
    with pytest.raises(OSError, match="No space left"):
        save_sparse(model, path)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["m.lobs"]


def test_one_model_always_gives_the_same_bytes(tmp_path):
    """safetensors writes its metadata in hash-map order; save_sparse sorts it, so files are reproducible
    (also with a non-ASCII buffer name, whose escaped form would be longer)."""
    model = small_model()
    model.register_buffer("größe", torch.zeros(3))
    blobs = {save_sparse(model, tmp_path / f"{i}.lobs").file_bytes for i in range(4)}
    assert len(blobs) == 1
    assert len({(tmp_path / f"{i}.lobs").read_bytes() for i in range(4)}) == 1
    assert torch.equal(read_sparse(tmp_path / "0.lobs")["größe"], torch.zeros(3))


def test_sharded_models_are_refused_before_any_work(tmp_path):
    """A fully_shard model holds only this rank's shards: a file or sparse copy of them would be part of the model."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from lightning_lobs import MaskSet, export_sparse, save_sparse, to_sparse_inference
    from ranks import free_port

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already running")
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        fully_shard(model)
        path = tmp_path / "m.lobs"
        with pytest.raises(ValueError, match="save_sparse needs whole weights.*sharded by fully_shard"):
            save_sparse(model, path)
        assert not path.exists()
        with pytest.raises(ValueError, match="export_sparse needs whole weights"):
            export_sparse(model, MaskSet())
        with pytest.raises(ValueError, match="to_sparse_inference needs whole weights"):
            to_sparse_inference(model)
    finally:
        dist.destroy_process_group()


def test_save_sparse_writes_what_the_reader_reads_and_refuses_more_dimensions_before_writing(tmp_path):
    """The reader's bound on dimensions holds for the writer too: 1024 round-trips, 1025 is refused before any file
    exists, with the way out (fewer dimensions, or torch.save)."""
    model = nn.Linear(2, 2)
    model.register_buffer("deep", torch.full([1] * 1024, 2.5))
    save_sparse(model, tmp_path / "ok.lobs")
    other = nn.Linear(2, 2)
    other.register_buffer("deep", torch.zeros([1] * 1024))
    load_sparse(other, tmp_path / "ok.lobs")
    assert other.deep.dim() == 1024 and other.deep.item() == 2.5

    model.register_buffer("deep", torch.full([1] * 1025, 2.5))
    with pytest.raises(ValueError, match=r"'deep' has 1025 dimensions; .*at most 1024 .*fewer dimensions.*torch\.save"):
        save_sparse(model, tmp_path / "deep.lobs")
    assert list(tmp_path.iterdir()) == [tmp_path / "ok.lobs"]
