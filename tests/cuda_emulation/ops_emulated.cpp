// The CUDA launchers and kernels of csrc/cuda, compiled for the CPU against the emulation of the
// CUDA execution model: torch.ops.stripeconv_cuda_emu.* on CPU tensors (see test_cuda_emulation.py).
#define STRIPECONV_CUDA_EMULATION
#define STRIPECONV_CUDA_LIBRARY stripeconv_cuda_emu
#define STRIPECONV_CUDA_DISPATCH CPU
#include "emulation.h"
#include "ops.h"
