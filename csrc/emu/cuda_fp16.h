// Stand-in for CUDA's <cuda_fp16.h> when the kernel headers are compiled for the CPU emulator (-I csrc/emu).
#pragma once

#include "cuda_emu.h"
