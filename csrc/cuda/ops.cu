// The CUDA build of the stripe_conv2d kernels: torch.ops.stripeconv_cuda.* for CUDA tensors.
#include "ops.h"
