"""Rows of a memory-mapped table read with pread: the same rows as indexing, no page of the table mapped, and
indexing wherever pread cannot be trusted (memory tables, most of a table, a file replaced or truncated)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from safetensors.torch import save_file

from wren.errors import ModelFormatError
from wren.weights import mapped_rows
from wren.weights.safetensors import SafetensorsFile

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps and smaps")

ROWS = 1024


def mapped_kib(path) -> int:
    """Resident KiB of this process's mappings of `path`."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:
                inside = len(head) > 5 and head[5] == str(path)
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total


@pytest.fixture
def table_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (ROWS, 4, 1024), generator=g, dtype=torch.uint8)  # a 4 KiB row
    scales = torch.randn(ROWS, 4, generator=g).half()
    path = tmp_path / "table.safetensors"
    save_file({"codes": codes, "scales": scales}, str(path))
    return path, codes, scales


def test_rows_equal_indexing_and_map_no_page(table_file):
    path, codes, scales = table_file
    f = SafetensorsFile(path)
    mapped_codes, mapped_scales = f.tensor("codes"), f.tensor("scales")
    ids = torch.tensor([5, 900, 5, 0, ROWS - 1, 77])
    assert mapped_rows._source(mapped_codes) is not None
    assert mapped_kib(path) <= 4  # the header page the loader read, at most
    assert torch.equal(mapped_rows.take_rows(mapped_codes, ids), codes[ids])
    assert torch.equal(mapped_rows.take_rows(mapped_scales, ids), scales[ids])  # fp16 rows of 8 bytes
    assert mapped_kib(path) <= 4
    mapped_codes[ids]  # indexing the mapping instead maps the rows' pages and their neighbours
    assert mapped_kib(path) >= 5 * 4


def test_memory_tables_and_large_lookups_are_indexed(table_file):
    path, codes, _ = table_file
    assert mapped_rows._source(codes) is None  # made in memory: no file to read
    ids = torch.arange(0, ROWS, 2)  # half the table: indexing touches most pages either way
    assert torch.equal(mapped_rows.take_rows(codes, ids), codes[ids])
    mapped = SafetensorsFile(path).tensor("codes")
    assert torch.equal(mapped_rows.take_rows(mapped, ids), codes[ids])
    assert mapped_kib(path) > ROWS // 2 * 4


def test_ids_outside_the_table_fail(table_file):
    mapped = SafetensorsFile(table_file[0]).tensor("codes")
    for bad in ([ROWS], [-1], [3, ROWS + 7]):
        with pytest.raises(IndexError):
            mapped_rows.take_rows(mapped, torch.tensor(bad))


def test_a_file_replaced_under_the_mapping_is_not_read(table_file, tmp_path):
    path, codes, scales = table_file
    mapped = SafetensorsFile(path).tensor("codes")
    other = tmp_path / "other.safetensors"
    save_file({"codes": torch.zeros_like(codes), "scales": scales}, str(other))
    os.replace(other, path)  # the mapping keeps the old file; the path now names another
    ids = torch.tensor([1, 2, 3])
    assert torch.equal(mapped_rows.take_rows(mapped, ids), codes[ids])


def test_a_truncated_file_is_a_clear_error(table_file):
    path, _, _ = table_file
    mapped = SafetensorsFile(path).tensor("codes")
    assert mapped_rows._source(mapped) is not None
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(ModelFormatError, match="truncated"):
        mapped_rows.take_rows(mapped, torch.tensor([ROWS - 1]))


def test_the_file_is_closed_with_the_table(table_file):
    mapped = SafetensorsFile(table_file[0]).tensor("codes")
    fd, _ = mapped_rows._source(mapped)
    key = id(mapped)
    del mapped
    assert key not in mapped_rows._sources
    with pytest.raises(OSError):
        os.fstat(fd)
