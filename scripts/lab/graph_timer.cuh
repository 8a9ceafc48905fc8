// The labs' timing (scripts/lab/*): like scripts/bench_kernels.py, a CUDA graph of 4 x nb launches, launch(i)
// reading the i-th of nb rotating weight copies (more than 2x L2 in all), replayed 7 times; returns the median
// microseconds per launch.
#pragma once
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cuda_runtime.h>

#define CK(x)                                                                          \
  do {                                                                                 \
    cudaError_t e = (x);                                                               \
    if (e != cudaSuccess) {                                                            \
      printf("err %s line %d\n", cudaGetErrorString(e), __LINE__);                     \
      exit(1);                                                                         \
    }                                                                                  \
  } while (0)

template <typename Launch>
float graph_time_us(cudaStream_t st, int nb, Launch&& launch) {
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
  for (int r = 0; r < 4; ++r)
    for (int i = 0; i < nb; ++i) launch(i);
  CK(cudaStreamEndCapture(st, &g));
  CK(cudaGraphInstantiate(&ge, g, 0));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::vector<float> ts;
  for (int rep = 0; rep < 7; ++rep) {
    CK(cudaGraphLaunch(ge, st));  // warm-up replay, then the timed one
    CK(cudaEventRecord(e0, st));
    CK(cudaGraphLaunch(ge, st));
    CK(cudaEventRecord(e1, st));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    ts.push_back(ms * 1000 / (4 * nb));
  }
  std::sort(ts.begin(), ts.end());
  CK(cudaGraphExecDestroy(ge));
  CK(cudaGraphDestroy(g));
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  return ts[3];
}
