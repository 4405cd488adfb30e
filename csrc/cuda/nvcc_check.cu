// Compile check for the torch-free CUDA code (not part of the extension). Instantiates every template so that
// kernel bodies are checked on a machine without a GPU or a CUDA build of torch (from the repository root):
//
//   nvcc -c -std=c++17 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
//     csrc/cuda/nvcc_check.cu -o /tmp/nvcc_check.o
#include "anchored_lm_loss.cuh"
#include "ewc_penalty.cuh"
#include "fisher_update.cuh"
#include "grad_ema.cuh"
#include "grad_moments.cuh"
#include "mofo.cuh"
#include "multi_tensor.cuh"
#include "protected_adamw8bit_step.cuh"
#include "protected_adamw_step.cuh"
#include "scale_grads.cuh"
#include "weight_merge.cuh"

namespace fastforget::gpu {

template void plan_blocks<TensorMeta<kEwcRoles>>(int64_t*, int64_t);
template int64_t meta_words<TensorMeta<kEwcRoles>>(int64_t, int64_t);
template void plan_blocks<FisherUpdateMeta>(int64_t*, int64_t);
template int64_t meta_words<FisherUpdateMeta>(int64_t, int64_t);
template void plan_blocks<GradEmaMeta>(int64_t*, int64_t);
template int64_t meta_words<GradEmaMeta>(int64_t, int64_t);
template void plan_blocks<GradMomentsMeta>(int64_t*, int64_t);
template int64_t meta_words<GradMomentsMeta>(int64_t, int64_t);
template void plan_blocks<ScaleGradsMeta>(int64_t*, int64_t);
template int64_t meta_words<ScaleGradsMeta>(int64_t, int64_t);
template void plan_blocks<MergeMeta>(int64_t*, int64_t);
template int64_t meta_words<MergeMeta>(int64_t, int64_t);

// The launchers instantiate every kernel (including sum_partials_kernel) and device helper.
template cudaError_t launch_ewc_penalty<float>(const int64_t*, int64_t, int64_t, double, bool, float*, float*,
                                               cudaStream_t);
template cudaError_t launch_ewc_penalty<double>(const int64_t*, int64_t, int64_t, double, bool, double*, double*,
                                                cudaStream_t);
template cudaError_t launch_ewc_penalty_backward<float>(const int64_t*, int64_t, int64_t, double, const float*,
                                                        cudaStream_t);
template cudaError_t launch_ewc_penalty_backward<double>(const int64_t*, int64_t, int64_t, double, const double*,
                                                         cudaStream_t);
template cudaError_t launch_fisher_update<float>(const int64_t*, int64_t, int64_t, double, double, bool,
                                                 cudaStream_t);
template cudaError_t launch_fisher_update<double>(const int64_t*, int64_t, int64_t, double, double, bool,
                                                  cudaStream_t);
template cudaError_t launch_grad_ema_stats<float>(const int64_t*, int64_t, int64_t, const float*, const float*,
                                                  float*, float*, cudaStream_t);
template cudaError_t launch_grad_ema_stats<double>(const int64_t*, int64_t, int64_t, const double*, const double*,
                                                   double*, double*, cudaStream_t);
template cudaError_t launch_grad_ema_protect<float>(const int64_t*, int64_t, int64_t, const float*, const float*,
                                                    const float*, const bool*, float, cudaStream_t);
template cudaError_t launch_grad_ema_protect<double>(const int64_t*, int64_t, int64_t, const double*,
                                                     const double*, const double*, const bool*, double,
                                                     cudaStream_t);
template cudaError_t launch_grad_moments<float>(const int64_t*, int64_t, int64_t, const float*, float*, float*,
                                                cudaStream_t);
template cudaError_t launch_grad_moments<double>(const int64_t*, int64_t, int64_t, const double*, double*, double*,
                                                 cudaStream_t);
template cudaError_t launch_scale_grads<float>(const int64_t*, int64_t, int64_t, const float*, cudaStream_t);
template cudaError_t launch_scale_grads<double>(const int64_t*, int64_t, int64_t, const double*, cudaStream_t);
template cudaError_t launch_weight_merge<float>(const int64_t*, int64_t, int64_t, const int64_t*, int64_t,
                                                const float*, bool, cudaStream_t);
template cudaError_t launch_weight_merge<double>(const int64_t*, int64_t, int64_t, const int64_t*, int64_t,
                                                 const double*, bool, cudaStream_t);
template void plan_blocks<MofoSelectMeta>(int64_t*, int64_t);
template int64_t meta_words<MofoSelectMeta>(int64_t, int64_t);
template void plan_blocks<MofoUpdateMeta>(int64_t*, int64_t);
template int64_t meta_words<MofoUpdateMeta>(int64_t, int64_t);
template cudaError_t launch_mofo_thresholds<float>(const int64_t*, int64_t, int64_t, const int64_t*, int*, int64_t*,
                                                   int64_t*, int64_t*, cudaStream_t);
template cudaError_t launch_mofo_thresholds<double>(const int64_t*, int64_t, int64_t, const int64_t*, int*, int64_t*,
                                                    int64_t*, int64_t*, cudaStream_t);
template cudaError_t launch_mofo_update<float>(const int64_t*, int64_t, int64_t, bool, const float*, const int64_t*,
                                               const float*, float, float, const float*, cudaStream_t);
template cudaError_t launch_mofo_update<double>(const int64_t*, int64_t, int64_t, bool, const double*,
                                                const int64_t*, const double*, double, double, const float*,
                                                cudaStream_t);
template void plan_blocks<AdamwMeta>(int64_t*, int64_t);
template int64_t meta_words<AdamwMeta>(int64_t, int64_t);
template cudaError_t launch_protected_adamw_step<float>(const int64_t*, int64_t, int64_t, bool, int, bool,
                                                        const float*, const float*, AdamwScalars<float>,
                                                        const float*, float*, float, float*, cudaStream_t);
template cudaError_t launch_protected_adamw_step<double>(const int64_t*, int64_t, int64_t, bool, int, bool,
                                                         const double*, const double*, AdamwScalars<double>,
                                                         const float*, double*, double, double*, cudaStream_t);
template void plan_blocks<Adamw8bitMeta>(int64_t*, int64_t);
template int64_t meta_words<Adamw8bitMeta>(int64_t, int64_t);
template cudaError_t launch_protected_adamw8bit_step<float>(const int64_t*, int64_t, int64_t, bool, int, bool,
                                                            const float*, const float*, AdamwScalars<float>,
                                                            const float*, const float*, const float*, float*, float,
                                                            float*, cudaStream_t);

template cudaError_t launch_anchored_lm_loss_rows<float, float>(const float*, const float*, const int64_t*,
                                                                 const float*, const float*, float*, float*, int64_t,
                                                                 int64_t, double, double, bool, bool, bool, int64_t,
                                                                 cudaStream_t);
template cudaError_t launch_anchored_lm_loss_rows<double, double>(const double*, const double*, const int64_t*,
                                                                   const double*, const double*, double*, double*,
                                                                   int64_t, int64_t, double, double, bool, bool, bool,
                                                                   int64_t, cudaStream_t);
template cudaError_t launch_anchored_lm_loss_rows<__nv_bfloat16, float>(const __nv_bfloat16*, const __nv_bfloat16*,
                                                                         const int64_t*, const float*, const float*,
                                                                         float*, __nv_bfloat16*, int64_t, int64_t,
                                                                         double, double, bool, bool, bool, int64_t,
                                                                         cudaStream_t);
template cudaError_t launch_anchored_lm_loss_rows<__half, float>(const __half*, const __half*, const int64_t*,
                                                                  const float*, const float*, float*, __half*,
                                                                  int64_t, int64_t, double, double, bool, bool, bool,
                                                                  int64_t, cudaStream_t);

}  // namespace fastforget::gpu
