"""Block-wise dynamic 8-bit quantization: the state format of bitsandbytes' 8-bit optimizers (Dettmers et al.,
"8-bit Optimizers via Block-wise Quantization", ICLR 2022), so that our optimizer state is theirs byte for byte.

A tensor is cut, in flat (row-major) order, into blocks of ``blocksize`` (256) elements, the last one possibly
partial; each block stores one fp32 scale ``absmax = max |x|`` over the block, and each element the uint8 index of
the entry of a sorted 256-value map in [-1, 1] nearest to ``x * (1 / absmax)``:

    code = argmin_j |map[j] - clamp(x * (1 / absmax), -1, 1)|      (bucketize on the midpoints (map[j] + map[j+1]) / 2;
                                                                     a value on a midpoint takes the lower index)
    x'   = map[code] * absmax                                      (dequantization, in fp32)

A block of zeros keeps ``absmax = 0`` (the reciprocal is taken of ``max(absmax, 1e-38)``) and dequantizes to 0.
This is bitsandbytes' rule on its CUDA and default (pure torch) backends, bit for bit on whole blocks. Its CPU
library (0.50) looks codes up in a uniform 65,536-bin table over [-1, 1] instead, which rounds values below
~1.5e-5 of the block's absmax to the wrong code; its absmax and dequantization match ours exactly.

The map is the dynamic data type (Dettmers 2016, "8-Bit Approximations for Parallelism in Deep Learning";
bitsandbytes ``functional.create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)``): a decimal exponent
10^-6 ... 10^0 and a linear fraction whose resolution grows with the exponent, plus 0 and 1. The signed map holds
the first moment (``qmap1``), the unsigned one the second moment and an 8-bit Fisher (``qmap2``).
"""

import torch

BLOCKSIZE = 256  # bitsandbytes' optimizer block size
_MIN_ABSMAX = 1e-38  # the scale's reciprocal is finite for any nonzero block


def _dynamic_map(signed: bool) -> torch.Tensor:
    exponent_bits, fraction_bits = 7, 7  # 8 bits: sign (or one more fraction bit) + exponent + fraction
    values = [torch.zeros(1), torch.ones(1)]
    for i in range(exponent_bits):
        # 2^i (signed) or 2^(i+1) (unsigned) values per decade, the midpoints of a linear grid on [0.1, 1] in fp32
        count = 2 ** (i + fraction_bits - exponent_bits + (0 if signed else 1)) + 1
        grid = torch.linspace(0.1, 1, count, dtype=torch.float32)
        decade = 10.0 ** (i - exponent_bits + 1) * ((grid[:-1] + grid[1:]) / 2)  # an fp32 product, as bitsandbytes'
        values += [decade, -decade] if signed else [decade]
    return torch.cat(values).sort().values


_DYNAMIC_MAPS = {signed: _dynamic_map(signed) for signed in (True, False)}  # built once; torch.compile sees constants


def dynamic_map(signed: bool = True, device=None) -> torch.Tensor:
    """The 256 sorted fp32 values of bitsandbytes' dynamic map (``create_dynamic_map(signed)``), a fresh tensor."""
    return _DYNAMIC_MAPS[bool(signed)].to(device, copy=True)


def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """x flattened to fp32 and zero-padded to whole blocks, shaped (blocks, blocksize)."""
    flat = x.reshape(-1).float()
    pad = -flat.numel() % blocksize
    return torch.nn.functional.pad(flat, (0, pad)).reshape(-1, blocksize)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int = BLOCKSIZE):
    """(codes uint8 shaped like x, absmax fp32 of shape (ceil(numel / blocksize),)), the rule of the module doc."""
    blocks = _blocks(x, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1 / absmax.clamp(min=_MIN_ABSMAX))[:, None]).clamp(-1, 1)
    midpoints = (code[:-1] + code[1:]) / 2
    codes = torch.bucketize(scaled, midpoints).to(torch.uint8)
    return codes.reshape(-1)[: x.numel()].reshape(x.shape), absmax


def dequantize_blockwise(codes, absmax, code, blocksize: int = BLOCKSIZE, dtype=torch.float32) -> torch.Tensor:
    """map[codes] * absmax[block] in fp32, cast to ``dtype``, shaped like codes."""
    values = _blocks(code[codes.reshape(-1).long()], blocksize) * absmax[:, None]
    return values.reshape(-1)[: codes.numel()].reshape(codes.shape).to(dtype)
