// Shared by the W4A16 CUDA kernels (w4a16.cu, w4a16_sm90.cu): the per-chunk code slot, small copy helpers and
// the launch glue. The packed "cuda-mma" layout is described at the top of w4a16.cu.
#pragma once

#include <c10/cuda/CUDAException.h>

#include <mutex>
#include <set>
#include <tuple>
#include <utility>

#include "common.cuh"

namespace llmc::cuda {

// Loads done only where `in` holds, else `otherwise`, as predicated instructions: written as `if (in) load`, the
// compiler branches around each slot's loads, splitting the decode loop into basic blocks it does not schedule
// across (e3399bd:scripts/results/h100_s9_gemv).
__device__ __forceinline__ uint4 ld_stream_if(const void* p, bool in) {  // ld_stream's cache policy, zeros otherwise
  uint4 v;
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n mov.b32 %3, 0;\n"
      " @p ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n}"
      : "=&r"(v.x), "=&r"(v.y), "=&r"(v.z), "=&r"(v.w)
      : "l"(p), "r"(int(in)));
  return v;
}
__device__ __forceinline__ float ldg_if(const float* p, bool in, float otherwise) {
  float v;
  asm("{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n mov.b32 %0, %3;\n @p ld.global.nc.f32 %0, [%1];\n}"
      : "=&f"(v) : "l"(p), "r"(int(in)), "f"(otherwise));
  return v;
}
__device__ __forceinline__ uint32_t ldg_if(const uint8_t* p, bool in, uint32_t otherwise) {
  uint32_t v;
  asm("{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n mov.b32 %0, %3;\n @p ld.global.nc.u8 %0, [%1];\n}"
      : "=&r"(v) : "l"(p), "r"(int(in)), "r"(otherwise));
  return v;
}

// Programmatic dependent launch (sm_90+; no-ops elsewhere, and when the kernel was launched without the attribute):
// launch_dependents lets the next kernel in the stream launch now, so its blocks take SMs as this one's leave
// instead of after the grid has drained; pdl_wait blocks until the kernels before have finished and their writes
// are visible. Nothing a kernel before may have written (activations, outputs, weights) is read before pdl_wait.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// `bytes` (a multiple of 16, 16-byte aligned) of global memory into L2, fire and forget. Safe before pdl_wait: L2
// is where every write lands, so a prefetched line is never stale (a load into registers could be).
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#endif
}

// A chunk's weights, scales and zero points are loaded together into a register slot U chunks before they
// are used. (Loading the next group's scales "one group ahead" into loop-carried registers does not work:
// the compiler moves the fresh value between registers right after the load, which waits for it, and the
// warp stalls a full memory round trip at every group.)
template <typename T>
struct Slot {
  uint4 q;          // 4 k-steps x 8 codes of this lane
  float s0, s1;     // group scales of rows g and g + 8
  uint32_t z0, z1;  // their zero points, raw bytes (converted at use, when the load has long landed)

  // scales / zeros: the kernel's [N][G] arrays (zeros null: symmetric), o0 / o1: rows g and g + 8 as 32-bit element
  // offsets. (The arrays' base addresses stay kernel parameters, in uniform registers, so a slot load costs no
  // per-lane 64-bit row pointers: four registers fewer in the 128-register decode kernels.)
  // PRED: predicated loads (ld_stream_if, ldg_if), else a branch around them.
  template <bool PRED>
  __device__ __forceinline__ void load(const uint4* wq, const float* scales, const uint8_t* zeros, int o0, int o1, int c,
                                       int cshift, bool in) {
    const int gi = c >> cshift;
    if (PRED) {
      q = ld_stream_if(wq, in);
      s0 = ldg_if(scales + (o0 + gi), in, 0.f), s1 = ldg_if(scales + (o1 + gi), in, 0.f);
      z0 = zeros != nullptr ? ldg_if(zeros + (o0 + gi), in, 8u) : 8u;
      z1 = zeros != nullptr ? ldg_if(zeros + (o1 + gi), in, 8u) : 8u;
    } else if (in) {
      q = ld_stream(wq);
      s0 = __ldg(scales + (o0 + gi)), s1 = __ldg(scales + (o1 + gi));
      z0 = zeros != nullptr ? __ldg(zeros + (o0 + gi)) : 8u, z1 = zeros != nullptr ? __ldg(zeros + (o1 + gi)) : 8u;
    } else {
      q = make_uint4(0, 0, 0, 0), s0 = s1 = 0.f, z0 = z1 = 8u;
    }
  }
  // The A fragment of k-step s, zero point removed, unscaled (exact small integers).
  __device__ __forceinline__ void codes(int s, uint32_t* a) const {
    const uint32_t word = s == 0 ? q.x : s == 1 ? q.y : s == 2 ? q.z : q.w;
    const uint32_t zz0 = Mma<T>::pair(Mma<T>::kBias + float(z0), Mma<T>::kBias + float(z0));
    const uint32_t zz1 = Mma<T>::pair(Mma<T>::kBias + float(z1), Mma<T>::kBias + float(z1));
#pragma unroll
    for (int r = 0; r < 4; ++r) a[r] = Mma<T>::sub(nibbles_or_magic(word >> (4 * r)), (r & 1) ? zz1 : zz0);
  }
  // acc[mt] += this chunk's codes x the activation fragments b[mt] (4 k-steps), accumulated unscaled in fp32 and
  // then scaled once by the group scales of rows g and g + 8.
  template <int MT>
  __device__ __forceinline__ void mma_scaled(const uint32_t (&b)[MT][4][2], float (&acc)[MT][4]) const {
    float part[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) part[mt][e] = 0.f;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      uint32_t a[4];
      codes(s, a);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) Mma<T>::mma(part[mt], a, b[mt][s][0], b[mt][s][1]);
    }
    add_scaled<MT>(part, acc);
  }
  // acc[mt] += the chunk's unscaled partial sums part[mt], scaled by the group scales of rows g and g + 8.
  template <int MT>
  __device__ __forceinline__ void add_scaled(const float (&part)[MT][4], float (&acc)[MT][4]) const {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      acc[mt][0] += s0 * part[mt][0], acc[mt][1] += s0 * part[mt][1];
      acc[mt][2] += s1 * part[mt][2], acc[mt][3] += s1 * part[mt][3];
    }
  }

 private:
  // (v & 0x000F000F) | magic as one LOP3 (left to itself the compiler emits an AND and an OR: one LUT op takes a
  // single immediate).
  __device__ __forceinline__ static uint32_t nibbles_or_magic(uint32_t v) {
    uint32_t r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(v), "n"(0x000F000F), "r"(Mma<T>::kMagic));
    return r;
  }
};

__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem_addr(smem)), "l"(gmem), "r"(valid ? 4 : 0));
}

// Per kernel and device, once: allow `smem` bytes of dynamic shared memory (past 48 KiB needs the opt-in)
// and ask for the largest shared-memory carveout (without it the driver may size L1/shared for fewer
// resident blocks than registers allow; several blocks per SM is what hides these kernels' memory latency).
template <typename Kernel>
inline void launch_attrs_once(Kernel kernel, int smem) {
  static std::mutex mu;
  static std::set<std::tuple<const void*, int, int>> done;  // (kernel, device, smem)
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), dev, smem);
  std::lock_guard<std::mutex> lock(mu);
  if (done.count(key)) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
  done.insert(key);
}

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent launch where `pdl` (the kernel then
// calls pdl_wait before reading anything an earlier kernel may write), in clusters of `cluster_z` blocks along the
// grid's z where that is more than 1.
template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), dim3 grid, dim3 block, int smem, cudaStream_t stream, bool pdl,
                   int cluster_z, Args&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid, cfg.blockDim = block, cfg.dynamicSmemBytes = smem, cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  int n = 0;
  if (pdl) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster_z > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = 1, attr[n].val.clusterDim.y = 1, attr[n++].val.clusterDim.z = cluster_z;
  }
  cfg.attrs = attr, cfg.numAttrs = n;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

// Programmatic dependent launch is on for the decode kernel on sm_90+ (Knob::W4_PDL).
inline bool pdl_enabled() { return cc_major() >= 9 && knob(Knob::W4_PDL, 1) != 0; }

// Hopper W4A16 for mid-size M (w4a16_sm90.cu): false, doing nothing, where this build or device has no such
// kernel or the shape does not suit it (the caller then runs its own kernels).
template <typename T>
bool w4a16_sm90(const T* x, const uint4* qw, const float* scales, const uint8_t* zeros, const T* bias, T* out, int M,
                int N, int K, int G, int cshift, int chunks, cudaStream_t stream);

}  // namespace llmc::cuda
