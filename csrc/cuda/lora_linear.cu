// CUDA binding of the LoRA linear ops: pure ATen (cuBLAS GEMMs, the base GEMM accumulating into the output in
// place), the code of ../lora_linear.h; no kernel body of its own. The fused single-kernel path on GPUs is the Triton
// backend (kernels/lora_linear.py).
#include <torch/library.h>

#include "../lora_linear.h"

TORCH_LIBRARY_IMPL(fastforget, CUDA, m) {
  m.impl("lora_linear", &fastforget::lora::lora_linear);
  m.impl("lora_linear_backward", &fastforget::lora::lora_linear_backward);
}
