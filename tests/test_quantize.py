"""fastforget.quantize against bitsandbytes' own dynamic map and block-wise quantize/dequantize ops (CPU)."""

import pytest
import torch

from fastforget.quantize import BLOCKSIZE, dequantize_blockwise, dynamic_map, quantize_blockwise

bnb_functional = pytest.importorskip("bitsandbytes.functional")

SIZES = [1, 255, 256, 257, 4097]


def _bnb_default(x, code):
    """bitsandbytes' default (pure torch) backend kernel of quantize_blockwise, which its CUDA kernel agrees with;
    its CPU kernel is the 65,536-bin table (see fastforget/quantize.py)."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(keys, x, code, BLOCKSIZE)


def _data(n, seed=0, zero_blocks=()):
    """Values over 8 decades (moments are), with some blocks all zero."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.logspace(-8, 0, n)[torch.randperm(n, generator=gen)]
    for b in zero_blocks:
        x[b * BLOCKSIZE : (b + 1) * BLOCKSIZE] = 0
    return x


def _nearest(x, code):
    """Brute force: per element the nearest map entry to clamp(x * (1 / absmax), -1, 1), ties to the lower index."""
    flat = x.reshape(-1).double()
    codes = []
    for start in range(0, flat.numel(), BLOCKSIZE):
        block = x.reshape(-1)[start : start + BLOCKSIZE].float()
        absmax = block.abs().max()
        scaled = (block * (1 / absmax.clamp(min=1e-38))).clamp(-1, 1).double()
        distance = (scaled[:, None] - code.double()[None, :]).abs()
        codes.append(distance.argmin(dim=1))  # argmin returns the first (lowest) index of equal distances
    return torch.cat(codes).to(torch.uint8).reshape(x.shape)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_bitsandbytes(signed):
    ours = dynamic_map(signed)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert torch.equal(ours, bnb_functional.create_dynamic_map(signed))
    assert bool((ours[1:] > ours[:-1]).all())  # sorted, distinct
    assert ours[-1] == 1 and (ours[0] == -ours[-2] if signed else ours[0] == 0)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_matches_nearest_and_bitsandbytes(n, signed):
    code = dynamic_map(signed)
    x = _data(n, zero_blocks=[1] if n > 2 * BLOCKSIZE else [])
    x = x if signed else x.abs()
    codes, absmax = quantize_blockwise(x, code)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and absmax.shape == (-(-n // BLOCKSIZE),)
    assert torch.equal(codes, _nearest(x, code))
    bnb_codes, bnb_absmax = _bnb_default(x, code)
    assert torch.equal(absmax, bnb_absmax)
    whole = n - n % BLOCKSIZE
    assert torch.equal(codes[:whole], bnb_codes[:whole])
    # bitsandbytes' default kernel divides the partial last block by its absmax instead of multiplying by the
    # reciprocal; where the two scalings agree the codes do
    tail = x[whole:]
    same = tail * (1 / absmax[-1]) == tail / absmax[-1]
    assert torch.equal(codes[whole:][same], bnb_codes[whole:][same])


@pytest.mark.parametrize("n", SIZES)
def test_against_bitsandbytes_cpu_kernel(n):
    """Its absmax and dequantization are ours bit for bit; its codes (a 65,536-bin table) are never nearer."""
    code = dynamic_map(True)
    x = _data(n, seed=1)
    codes, absmax = quantize_blockwise(x, code)
    bnb_codes, bnb_absmax = torch.ops.bitsandbytes.quantize_blockwise(x, code, BLOCKSIZE)
    assert torch.equal(absmax, bnb_absmax)
    ours = dequantize_blockwise(codes, absmax, code)
    theirs = torch.ops.bitsandbytes.dequantize_blockwise(bnb_codes, bnb_absmax, code, BLOCKSIZE, torch.float32)
    assert torch.equal(ours, torch.ops.bitsandbytes.dequantize_blockwise(codes, absmax, code, BLOCKSIZE, torch.float32))
    assert bool(((ours.double() - x.double()).abs() <= (theirs.double() - x.double()).abs()).all())


def test_zero_blocks_and_empty():
    code = dynamic_map(False)
    x = torch.zeros(300)
    codes, absmax = quantize_blockwise(x, code)
    assert torch.equal(absmax, torch.zeros(2)) and bool((codes == 0).all())  # code[0] == 0 in the unsigned map
    assert torch.equal(dequantize_blockwise(codes, absmax, code), x)
    signed = dynamic_map(True)
    codes, absmax = quantize_blockwise(x, signed)
    assert bool((signed[codes.long()] == 0).all())
    codes, absmax = quantize_blockwise(torch.zeros(0), code)
    assert codes.shape == (0,) and absmax.shape == (0,)
    assert dequantize_blockwise(codes, absmax, code).shape == (0,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_and_outputs(dtype):
    code = dynamic_map(True)
    x = _data(1000, seed=2).to(dtype)
    codes, absmax = quantize_blockwise(x, code)
    want_codes, want_absmax = quantize_blockwise(x.float(), code)
    assert torch.equal(codes, want_codes) and torch.equal(absmax, want_absmax)
    out = dequantize_blockwise(codes, absmax, code, dtype=dtype)
    assert out.dtype == dtype and torch.equal(out, dequantize_blockwise(codes, absmax, code).to(dtype))


def test_shapes_keep_flat_blocks():
    """Blocks run over the flat (row-major) order, whatever the shape."""
    code = dynamic_map(True)
    x = _data(33 * 17, seed=3).reshape(33, 17)
    codes, absmax = quantize_blockwise(x, code)
    flat_codes, flat_absmax = quantize_blockwise(x.reshape(-1), code)
    assert codes.shape == (33, 17) and torch.equal(codes.reshape(-1), flat_codes) and torch.equal(absmax, flat_absmax)
    assert dequantize_blockwise(codes, absmax, code).shape == (33, 17)
