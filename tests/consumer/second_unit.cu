// The consumer's second CUDA translation unit that includes all of cce (main.cu says why).
#include <cce/cce.cuh>

const char* second_unit_status() { return cce::to_string(cce::status::success); }
