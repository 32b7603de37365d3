// Umbrella header of the cce library.
#pragma once

#include <cce/linear_cross_entropy.cuh>
#include <cce/options.hpp>
#include <cce/problem.hpp>
#include <cce/status.hpp>
