// Standalone (nvcc only): how fast one kernel reads B bytes once, by access pattern, timed like scripts/bench_kernels.py
// (CUDA graph of 40 launches over 10 rotating buffers, > 2x L2; median of 7). B: the W4A16 8192 x 8192 codes, the
// codes + their fp32 g128 scales, and the bf16 weights of 4096 x 4096 and 8192 x 8192.
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o /tmp/rf scripts/lab/read_floor.cu && /tmp/rf
#include <cstdint>
#include "graph_timer.cuh"
__device__ __forceinline__ uint4 lds(const void* p) {
  uint4 v; asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p)); return v;
}
// (a) grid-stride, U loads in flight per thread
template <int U> __global__ void k_stride(const uint4* p, int64_t n, unsigned* out) {
  unsigned s = 0; int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x, st = (int64_t)gridDim.x * blockDim.x;
  for (; i + (U - 1) * st < n; i += U * st) { uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = lds(p + i + u * st);
#pragma unroll
    for (int u = 0; u < U; ++u) s ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w; }
  for (; i < n; i += st) { uint4 v = lds(p + i); s ^= v.x ^ v.w; }
  if (s == 0x12345678) out[0] = s;
}
// (b) our gemv pattern: block per 64 KB tile (+ rot), W warps each a contiguous run, lanes 16 B, U in flight
template <int W, int U> __global__ void k_warprun(const uint4* p, int chunks, unsigned* out, int rot) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int per = chunks / W; const uint4* base = p + ((int64_t)blockIdx.x * chunks + warp * per) * 32 + lane;
  const int r0 = rot ? (blockIdx.x * 7) % per : 0;
  unsigned s = 0;
  for (int c = 0; c < per; c += U) { uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) { int cc = c + u + r0; if (cc >= per) cc -= per; v[u] = lds(base + (int64_t)cc * 32); }
#pragma unroll
    for (int u = 0; u < U; ++u) s ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w; }
  if (s == 0x12345678) out[0] = s;
}
// (c) block-interleaved: the block's threads read consecutive 16 B of its tile
template <int T, int U> __global__ void k_blockint(const uint4* p, int chunks, unsigned* out) {
  const int64_t n = (int64_t)chunks * 32; const uint4* base = p + blockIdx.x * n + threadIdx.x;
  unsigned s = 0;
  for (int64_t i = 0; i < n; i += U * T) { uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = i + u * T < n ? lds(base + i + u * T) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < U; ++u) s ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w; }
  if (s == 0x12345678) out[0] = s;
}
int main() {
  const int64_t bytes = 8192LL * 8192 / 2;  // codes only; +2 MB scales is a separate run (bytes2)
  const int NB = 10;  // rotate over 10 buffers (> 2x L2)
  int sms; CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  for (int64_t B : std::vector<int64_t>{bytes, bytes + 2 * 1024 * 1024LL, 4096LL * 4096 * 2, 8192LL * 8192 * 2}) {
    std::vector<uint4*> buf(NB); for (auto& b : buf) { CK(cudaMalloc(&b, B)); CK(cudaMemset(b, 1, B)); }
    unsigned* out; CK(cudaMalloc(&out, 4));
    cudaStream_t st; CK(cudaStreamCreate(&st));
    const int64_t n16 = B / 16; const int tiles = 512; const int chunks = int(n16 / 32 / tiles);
    auto run = [&](const char* name, auto launch) {
      const float us = graph_time_us(st, NB, [&](int i) { launch(buf[i]); });
      printf("B=%.1fMB %-28s %7.2f us  %6.0f GB/s\n", B / 1e6, name, us, B / us / 1e3);
    };
    run("stride U4 132x8x256", [&](uint4* b) { k_stride<4><<<sms * 8, 256, 0, st>>>(b, n16, out); });
    run("stride U8 132x4x256", [&](uint4* b) { k_stride<8><<<sms * 4, 256, 0, st>>>(b, n16, out); });
    run("stride U4 132x16x128", [&](uint4* b) { k_stride<4><<<sms * 16, 128, 0, st>>>(b, n16, out); });
    if (B < 100000000) {
    run("warprun W4 U4", [&](uint4* b) { k_warprun<4, 4><<<tiles, 128, 0, st>>>(b, chunks, out, 0); });
    run("warprun W4 U8", [&](uint4* b) { k_warprun<4, 8><<<tiles, 128, 0, st>>>(b, chunks, out, 0); });
    run("warprun W4 U4 rot", [&](uint4* b) { k_warprun<4, 4><<<tiles, 128, 0, st>>>(b, chunks, out, 1); });
    run("warprun W8 U4", [&](uint4* b) { k_warprun<8, 4><<<tiles, 256, 0, st>>>(b, chunks, out, 0); });
    run("blockint T128 U4", [&](uint4* b) { k_blockint<128, 4><<<tiles, 128, 0, st>>>(b, chunks, out); });
    run("blockint T128 U8", [&](uint4* b) { k_blockint<128, 8><<<tiles, 128, 0, st>>>(b, chunks, out); });
    run("blockint T256 U4", [&](uint4* b) { k_blockint<256, 4><<<tiles, 256, 0, st>>>(b, chunks, out); });
    }
    for (auto& b : buf) cudaFree(b);
  }
  return 0;
}
