// Catch2's runner for the CPU tests, compiled once and linked into each of them.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
