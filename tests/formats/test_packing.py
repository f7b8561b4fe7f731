import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit.formats.packing import pack, packed_len, unpack


@settings(max_examples=80, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 5, 6, 7, 8]), k=st.integers(1, 70), rows=st.integers(1, 3), seed=st.integers(0, 999))
def test_pack_unpack_roundtrip(bits, k, rows, seed):
    codes = torch.randint(0, 2**bits, (rows, k), generator=torch.Generator().manual_seed(seed), dtype=torch.int64).to(torch.uint8)
    p = pack(codes, bits)
    assert p.dtype == torch.uint8 and p.shape == (rows, packed_len(k, bits))
    assert torch.equal(unpack(p, bits, k), codes)


def test_4bit_low_nibble_first():
    assert pack(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8), 4).tolist() == [[0x21, 0x0F]]


def test_3bit_is_dense():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    p = pack(codes, 3)
    assert p.shape == (1, 3)
    word = int(p[0, 0]) | int(p[0, 1]) << 8 | int(p[0, 2]) << 16
    assert [(word >> (3 * i)) & 7 for i in range(8)] == [1, 2, 3, 4, 5, 6, 7, 0]


@pytest.mark.parametrize("bits,per_byte", [(2, 4), (4, 2), (8, 1)])
def test_sizes(bits, per_byte):
    assert packed_len(128, bits) == 128 // per_byte
