"""Sparse-file crafting helpers for the tests, and the reader's fuzz run (run as a script in a subprocess).

    python tests/sparse_fuzz.py --seed 0 --mutants 3000 --ceiling-mib 64

The script saves a few small models, sets an address-space limit of ``--ceiling-mib`` above what the process
has mapped after a warm-up round (so any allocation beyond it fails), checks that the limit bites, then feeds
``read_sparse`` and ``load_sparse`` seeded random mutations of the files. Each must be refused with
``ValueError`` (the model left as it was) or decode to exactly what was saved. It prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import struct
import sys
import tempfile
import time
from typing import Any

import torch
from torch import nn

from lightning_lobs.export import _checksum, load_sparse, read_sparse, save_sparse

# --------------------------------------------------------------------------- file surgery


def split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's header (parsed) and data bytes."""
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def tensor_bytes(header: dict[str, Any], data: bytes, name: str) -> bytes:
    begin, end = header[name]["data_offsets"]
    return data[begin:end]


def rebuild(
    header: dict[str, Any], data: bytes, replace: dict[str, tuple[str, list[int], bytes]]
) -> tuple[dict, bytes]:
    """The file with tensors replaced or added (``{name: (dtype, shape, bytes)}``), offsets recomputed."""
    parts = {
        n: (r["dtype"], r["shape"], tensor_bytes(header, data, n)) for n, r in header.items() if n != "__metadata__"
    }
    parts.update(replace)
    out: dict[str, Any] = {"__metadata__": dict(header.get("__metadata__", {}))}
    chunks, offset = [], 0
    for name, (dtype, shape, raw) in parts.items():
        out[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    return out, b"".join(chunks)


def reseal(header: dict[str, Any], data: bytes) -> dict[str, Any]:
    """Recompute the CRC as an attacker would, so only the structural checks stand in the way."""
    meta = header["__metadata__"]
    try:
        tensors = {n: tensor_bytes(header, data, n) for n in header if n != "__metadata__"}
        meta["crc32"] = str(_checksum(meta["entries"], tensors))
    except (KeyError, TypeError, ValueError):
        pass  # records too broken to say which bytes belong to which tensor: leave the CRC
    return header


def craft(entries: list[dict[str, Any]], tensors: dict[str, torch.Tensor], **metadata: str) -> bytes:
    """A file with a valid CRC holding exactly these entries and tensors (any of them inconsistent)."""
    from safetensors.torch import save

    meta = {
        "format": "lightning-lobs-sparse",
        "format_version": "2",
        "model": "Crafted",
        "entries": json.dumps(entries),
        "kept_weights": "0",
        "total_weights": "0",
        "dense_bytes": "1",
        "raw_bytes": "1",
        "crc32": "0",
    }
    meta.update(metadata)
    header, data = split(save({n: t.contiguous() for n, t in tensors.items()}, metadata=meta))
    if "crc32" not in metadata:
        reseal(header, data)
    return join(header, data)


# --------------------------------------------------------------------------- models saved for the fuzz run


class Buffers(nn.Module):
    """One of every encoding and awkward dtype: bool and int buffers, 0-d, empty, complex (raw bytes for
    complex128), half, and a CSR row wider than 32,767 columns (int16 column indices that wrap)."""

    def __init__(self, gen: torch.Generator) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 6)
        with torch.no_grad():
            self.lin.weight[torch.rand(6, 16, generator=gen) < 0.97] = 0  # CSR
        self.register_buffer("flags", torch.rand(40, generator=gen) < 0.1)
        self.register_buffer(
            "counts", torch.where(torch.rand(5, 7, generator=gen) < 0.5, torch.randint(-9, 9, (5, 7), generator=gen), 0)
        )
        self.register_buffer("step", torch.tensor(7, dtype=torch.int64))
        self.register_buffer("neg_zero", torch.tensor(-0.0))
        self.register_buffer("empty", torch.empty(0, 3))
        self.register_buffer("cplx", torch.randn(3, dtype=torch.complex64, generator=gen))
        self.register_buffer("cplx128", torch.randn(2, dtype=torch.complex128, generator=gen))
        self.register_buffer("halfbuf", torch.randn(9, generator=gen).half())
        self.register_buffer(
            "sparse_w", torch.where(torch.rand(64, 100, generator=gen) < 0.03, torch.randn(64, 100, generator=gen), 0.0)
        )  # CSR, many rows
        wide = torch.zeros(2, 40_000)
        wide[1, torch.tensor([3, 32_768, 39_999])] = torch.tensor([1.0, -2.0, 3.0])
        self.register_buffer("wide", wide)


def base_models(seed: int) -> dict[str, tuple[nn.Module, dict[str, torch.Tensor] | None]]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4))
    masks = {"0": torch.rand(10, 12, generator=gen) < 0.4, "2": torch.rand(4, 10, generator=gen) < 0.1}
    with torch.no_grad():
        for name, mask in masks.items():
            mlp.get_submodule(name).weight.mul_(mask)
    return {"mlp": (mlp, masks), "buffers": (Buffers(gen), None)}


def scrambled(model: nn.Module) -> dict[str, torch.Tensor]:
    """Values unlike the saved ones, so a load that wrote part of the model before refusing is seen."""
    out = {}
    for key, t in model.state_dict().items():
        if t.dtype == torch.bool:
            out[key] = ~t
        elif t.is_floating_point() or t.is_complex():
            out[key] = torch.full_like(t, 5)
        else:
            out[key] = t + 3
    return out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit for bit, but -0.0 equals +0.0 (a sparse encoding stores no zero)."""
    if list(a) != list(b):
        return False
    for key, value in a.items():
        x, y = value.detach().contiguous(), b[key].detach().contiguous()
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if x.is_floating_point():
            x, y = x.masked_fill(x == 0, 0), y.masked_fill(y == 0, 0)
        if not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            return False
    return True


# --------------------------------------------------------------------------- mutations


def _pick_tensor(rng: random.Random, header: dict[str, Any], part: str | None = None) -> str | None:
    """A random tensor; with ``part``, one whose name ends with it."""
    names = [n for n in header if n != "__metadata__" and (part is None or n.endswith(part))]
    return rng.choice(sorted(names)) if names else None


def _inflate(rng: random.Random, value: int) -> Any:
    return rng.choice(
        [
            value * 2 ** rng.randint(1, 30),
            value + rng.randint(1, 9),
            2**40,
            2**62,
            0,
            -1,
            -(2**31),
            True,
            str(value),
            1.5,
            None,
        ]
    )


def mutate(rng: random.Random, blob: bytes, others: list[bytes]) -> tuple[str, bytes]:
    """One random mutation of a valid file: (its kind, the bytes)."""
    kind = rng.choice(
        [
            "flip",
            "flip_header",
            "truncate",
            "extend",
            "splice",
            "record",
            "entry",
            "meta",
            "content",
            "values_count",
            "big_csr",
        ]
    )
    b = bytearray(blob)
    (hlen,) = struct.unpack("<Q", blob[:8])
    if kind in ("flip", "flip_header"):
        hi = 8 + hlen if kind == "flip_header" else len(b)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(hi)
            b[pos] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "truncate":
        return kind, bytes(b[: rng.randrange(len(b))])
    if kind == "extend":
        return kind, bytes(b) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    if kind == "splice":
        other = rng.choice(others)
        if rng.random() < 0.5:  # one file's header, another's data
            (olen,) = struct.unpack("<Q", other[:8])
            return kind, blob[: 8 + hlen] + other[8 + olen :]
        cut_a, cut_b = rng.randrange(len(blob)), rng.randrange(len(other))
        return kind, blob[:cut_a] + other[cut_b:]
    header, data = split(blob)
    meta = header["__metadata__"]
    if kind == "record":  # the safetensors record of one tensor
        name = _pick_tensor(rng, header)
        rec = header[name]
        field = rng.choice(["shape", "offset", "dtype", "drop", "extra_tensor"])
        if field == "shape":
            if rec["shape"]:
                i = rng.randrange(len(rec["shape"]))
                rec["shape"][i] = _inflate(rng, rec["shape"][i])
            else:
                rec["shape"] = [rng.randint(1, 2**40)]
        elif field == "offset":
            i = rng.randrange(2)
            rec["data_offsets"][i] = _inflate(rng, rec["data_offsets"][i])
        elif field == "dtype":
            rec["dtype"] = rng.choice(["F32", "F64", "I16", "I32", "I64", "U8", "BOOL", "F16", "C64", "F128", 7])
        elif field == "drop":
            del header[name]
        else:
            header["x:extra"] = {"dtype": "F32", "shape": [1], "data_offsets": [len(data), len(data) + 4]}
            data += b"\0\0\0\0"
        return f"record/{field}", join(reseal(header, data), data)
    if kind == "entry":  # our metadata's entries, CRC resealed
        entries = json.loads(meta["entries"])
        e = rng.choice(entries)
        field = rng.choice(["shape", "dtype", "encoding", "key", "masked", "drop", "duplicate", "junk"])
        if field == "shape":
            if e["shape"]:
                i = rng.randrange(len(e["shape"]))
                e["shape"][i] = _inflate(rng, e["shape"][i])
            else:
                e["shape"] = [rng.choice([2**20, 2**28, 2**40])]
        elif field == "dtype":
            e["dtype"] = rng.choice(
                [
                    "torch.float32",
                    "torch.int32",
                    "torch.float64",
                    "torch.bool",
                    "torch.uint8",
                    "torch.qint8",
                    "torch.Tensor",
                    "float32",
                ]
            )
        elif field == "encoding":
            e["encoding"] = rng.choice(["dense", "bitmask", "csr", "coo"])
        elif field == "key":
            e["key"] = rng.choice([e["key"] + "x", "", 3, entries[0]["key"]])
        elif field == "masked":
            e["masked"] = rng.choice([not e["masked"], "yes", 1])
        elif field == "drop":
            entries.remove(e)
        elif field == "duplicate":
            entries.append(copy.deepcopy(e))
        else:
            e["extra"] = 1
        meta["entries"] = json.dumps(entries)
        return f"entry/{field}", join(reseal(header, data), data)
    if kind == "meta":
        field = rng.choice(["format_version", "format", "crc32", "kept_weights", "dense_bytes", "drop", "entries"])
        if field == "drop":
            del meta[rng.choice(sorted(meta))]
        elif field == "entries":
            meta["entries"] = rng.choice(["", "{}", "[1]", "[" * 5000 + "]" * 5000, "null"])
        else:
            meta[field] = rng.choice(["1", "3", "-1", "", "abc", "2" * 40, "1e9"])
        if field != "crc32":
            reseal(header, data)
        return f"meta/{field}", join(header, data)
    if kind == "content":  # break one invariant of a sparse part, CRC resealed
        target = rng.choice([":crow", ":col", ":bits", "flags"])  # flags: the bool buffer's values
        name = _pick_tensor(rng, header, target) or _pick_tensor(rng, header, "flags:values")
        if name is None:
            return "content/none", join(reseal(header, data), data)
        rec = header[name]
        begin, end = rec["data_offsets"]
        if target == ":crow":
            fmt = {"I32": "<i", "I64": "<q"}[rec["dtype"]]
            size = struct.calcsize(fmt)
            ptrs = [struct.unpack_from(fmt, data, begin + i * size)[0] for i in range((end - begin) // size)]
            how = rng.choice(["end", "start", "dip"])
            if how == "end":
                ptrs[-1] += rng.choice([1, -1, 2**27, 2**30])
            elif how == "start":
                ptrs[0] = rng.choice([1, -1, 2**27])
            elif len(ptrs) > 2:  # one pointer below its predecessor, the ends kept
                i = rng.randrange(1, len(ptrs) - 1)
                ptrs[i] = ptrs[i - 1] - 1
            else:
                ptrs[-1] += 1
            raw = b"".join(struct.pack(fmt, p) for p in ptrs)
        elif target == ":col":
            if end == begin:
                return "content/none", join(reseal(header, data), data)
            fmt = {"I16": "<h", "I32": "<i", "I64": "<q"}[rec["dtype"]]
            size = struct.calcsize(fmt)
            cols = [struct.unpack_from(fmt, data, begin + i * size)[0] for i in range((end - begin) // size)]
            i = rng.randrange(len(cols))
            key = name.rsplit(":", 1)[0]
            entry = next(e for e in json.loads(meta["entries"]) if e["key"] == key)
            width = entry["shape"][-1] if len(entry["shape"]) < 2 else int(torch.tensor(entry["shape"][1:]).prod())
            # beyond the row (what used to move a value into the next row), negative, or a repeat
            choice = rng.choice([width, width + rng.randint(1, 9), 2 * width, -1, "dup"])
            if choice == "dup" and len(cols) > 1:
                cols[i] = cols[i - 1 if i else 1]
            elif choice == "dup" or (fmt == "<h" and not -1 <= choice < 1 << 16):
                return "content/none", join(reseal(header, data), data)
            else:
                cols[i] = choice - (1 << 16) if fmt == "<h" and choice >= 1 << 15 else choice  # int16 wraps
            raw = b"".join(struct.pack(fmt, c) for c in cols)
        elif target == ":bits":
            raw = bytearray(data[begin:end])
            if not raw:
                return "content/none", join(reseal(header, data), data)
            pos = rng.randrange(len(raw) * 8)
            raw[pos // 8] ^= 1 << (pos % 8)  # one bit: the population moves by one
            raw = bytes(raw)
        else:
            raw = bytearray(data[begin:end])
            if not raw:
                return "content/none", join(reseal(header, data), data)
            raw[rng.randrange(len(raw))] = rng.randint(2, 255)
            raw = bytes(raw)
        data = data[:begin] + raw + data[end:]
        return f"content/{target}", join(reseal(header, data), data)
    if kind == "big_csr":  # a CSR entry declared much wider, its columns retyped to match: valid but huge
        entries = json.loads(meta["entries"])
        csr = [e for e in entries if e["encoding"] == "csr"]
        if not csr:
            return "big_csr/none", join(reseal(header, data), data)
        e = rng.choice(csr)
        rows = e["shape"][0] if len(e["shape"]) > 1 else 1
        width = rng.choice([2**20, 2**24, 2**28, 2**33])
        e["shape"] = [rows, width] if len(e["shape"]) > 1 else [width]
        name = f"{e['key']}:col"
        rec = header[name]
        old = {"I16": ("<h", 0xFFFF), "I32": ("<i", None), "I64": ("<q", None)}[rec["dtype"]]
        size = struct.calcsize(old[0])
        cols = [struct.unpack_from(old[0], data, rec["data_offsets"][0] + i * size)[0] for i in range(rec["shape"][0])]
        cols = [c & old[1] if old[1] else c for c in cols]
        dtype, fmt = ("I32", "<i") if width <= 2**31 else ("I64", "<q")
        raw = b"".join(struct.pack(fmt, c) for c in cols)
        meta["entries"] = json.dumps(entries)
        header, data = rebuild(header, data, {name: (dtype, [len(cols)], raw)})
        return "big_csr", join(reseal(header, data), data)
    # values_count: one more or one fewer value than the structure says, CRC resealed
    name = _pick_tensor(rng, header, ":values")
    if name is None:
        return "values_count/none", join(reseal(header, data), data)
    rec = header[name]
    raw = tensor_bytes(header, data, name)
    item = {"F32": 4, "F64": 8, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}[
        rec["dtype"]
    ]
    if raw and rng.random() < 0.5:
        raw, shape = raw[:-item], [rec["shape"][0] - 1]
    else:
        raw, shape = raw + b"\0" * (item - 1) + b"\1", [rec["shape"][0] + 1]
    header, data = rebuild(header, data, {name: (rec["dtype"], shape, raw)})
    return "values_count", join(reseal(header, data), data)


# --------------------------------------------------------------------------- the run


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def run(seed: int, mutants: int, ceiling_mib: int) -> dict[str, Any]:
    import resource

    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="sparse-fuzz-")
    bases = {}
    for name, (model, masks) in base_models(seed).items():
        path = os.path.join(tmp, f"{name}.lobs")
        save_sparse(model, path, masks=masks)
        with open(path, "rb") as f:
            blob = f.read()
        ref = read_sparse(path)
        assert same(ref, model.state_dict()), name
        bases[name] = {"blob": blob, "model": model, "ref": ref, "scrambled": scrambled(model)}
    path = os.path.join(tmp, "mutant.lobs")

    def attempt(base: dict[str, Any], blob: bytes) -> tuple[str, str | None]:
        """(outcome, failure or None) of reading and loading one file."""
        with open(path, "wb") as f:
            f.write(blob)
        refs = [b["ref"] for b in bases.values()]
        try:
            got = read_sparse(path)
            read_outcome = "equal" if any(same(got, r) for r in refs) else None
            if read_outcome is None:
                return "read", "read_sparse returned a state_dict unlike any saved one"
        except ValueError:
            read_outcome = "refused"
        except BaseException as err:  # noqa: BLE001 - anything but ValueError is the failure we look for
            return "read", f"read_sparse raised {type(err).__name__}: {str(err)[:200]}"
        model = base["model"]
        model.load_state_dict(base["scrambled"])
        try:
            load_sparse(model, path)
            if not same(model.state_dict(), base["ref"]):
                return "load", "load_sparse loaded values unlike the saved ones"
            load_outcome = "equal"
        except ValueError:
            if not same(model.state_dict(), base["scrambled"]):
                return "load", "load_sparse refused the file after changing the model"
            load_outcome = "refused"
        except BaseException as err:  # noqa: BLE001
            return "load", f"load_sparse raised {type(err).__name__}: {str(err)[:200]}"
        return f"read {read_outcome}, load {load_outcome}", None

    for base in bases.values():  # warm-up: lazy initialisations happen before the limit is set
        attempt(base, base["blob"])
    ceiling = ceiling_mib << 20
    vm = _vm_bytes()
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = vm + ceiling if hard == resource.RLIM_INFINITY else min(vm + ceiling, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    try:
        torch.empty(ceiling + (1 << 20), dtype=torch.uint8)
        probe = "not enforced: allocating more than the ceiling succeeded"
    except (RuntimeError, MemoryError):
        probe = "enforced"

    rng = random.Random(seed)
    blobs = [b["blob"] for b in bases.values()]
    outcomes: dict[str, int] = {}
    kinds: dict[str, dict[str, int]] = {}
    failures = []
    t0 = time.perf_counter()
    for i in range(mutants):
        name = rng.choice(sorted(bases))
        base = bases[name]
        kind, blob = mutate(rng, base["blob"], [b for b in blobs if b is not base["blob"]])
        outcome, failure = attempt(base, blob)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        kinds.setdefault(kind.split("/")[0], {}).setdefault(outcome, 0)
        kinds[kind.split("/")[0]][outcome] += 1
        if failure is not None:
            failures.append({"mutant": i, "base": name, "kind": kind, "failure": failure})
    return {
        "mutants": mutants,
        "seconds": time.perf_counter() - t0,
        "probe": probe,
        "ceiling_mib": ceiling_mib,
        "outcomes": outcomes,
        "kinds": kinds,
        "failures": failures[:20],
        "n_failures": len(failures),
        "file_bytes": {n: len(b["blob"]) for n, b in bases.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mutants", type=int, default=3000)
    parser.add_argument("--ceiling-mib", type=int, default=64)
    args = parser.parse_args()
    print(json.dumps(run(args.seed, args.mutants, args.ceiling_mib)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
