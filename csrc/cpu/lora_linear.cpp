// LoRA linear on the CPU: the ATen GEMMs of ../lora_linear.h (MKL / oneDNN), the base GEMM accumulating into the
// output in place.
#include <torch/library.h>

#include "../lora_linear.h"

TORCH_LIBRARY_IMPL(fastforget, CPU, m) {
  m.impl("lora_linear", &fastforget::lora::lora_linear);
  m.impl("lora_linear_backward", &fastforget::lora::lora_linear_backward);
}
