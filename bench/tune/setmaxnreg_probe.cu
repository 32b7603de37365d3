// How many registers ptxas gives the code a warp-specialised kernel runs after `setmaxnreg.inc`: the launch bounds
// alone allow 65,536 / threads (168 for 384 threads, 128 for 512), and the consumer roles need more. Each kernel keeps
// `Live` floats live across a loop in its consumer warpgroups after raising their budget to `Budget`; compile only:
//
//   nvcc --generate-code=arch=compute_90a,code=sm_90a -O3 -Xptxas -v -c bench/tune/setmaxnreg_probe.cu -o probe.o
//   cuobjdump -sass probe.o | grep -oE '\bR[0-9]+\b' | sort -t R -k 2 -n | tail -1
//
// No spills with a highest register above the launch bound's share means ptxas allocated the raised budget.

template <int Threads, int ProducerRegisters, int Budget, int Live>
__global__ void __launch_bounds__(Threads, 1) probe(const float* __restrict__ in, float* __restrict__ out, int iters) {
  if (threadIdx.x < 128) {  // the producer warpgroup gives registers up
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(ProducerRegisters));
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Budget));
  float a[Live];
#pragma unroll
  for (int i = 0; i < Live; ++i) a[i] = in[threadIdx.x + i * Threads];
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int i = 0; i < Live; ++i) a[i] = fmaf(a[i], a[(i + 1) % Live], a[(i + 7) % Live]);
  }
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < Live; ++i) s += a[i] * float(i);
  out[threadIdx.x] = s;
}

// One producer and two consumer warpgroups (the sm_90a kernels' layout), and one producer with three consumers.
template __global__ void probe<384, 40, 232, 200>(const float*, float*, int);
template __global__ void probe<512, 24, 160, 150>(const float*, float*, int);
