// The plain host types build and behave with the host compiler alone.
#include <catch2/catch.hpp>

#include <string>

#include <cce/options.hpp>
#include <cce/status.hpp>

TEST_CASE("every status has a distinct description", "[status]") {
  using cce::status;
  CHECK(std::string(cce::to_string(status::success)) == "success");
  CHECK(std::string(cce::to_string(status::invalid_size)) != cce::to_string(status::invalid_stride));
  CHECK(std::string(cce::to_string(static_cast<status>(-1))) == "unknown status");
}

TEST_CASE("options::exact disables the filter and is deterministic", "[options]") {
  constexpr cce::options exact = cce::options::exact();
  STATIC_REQUIRE(exact.filter == cce::filter_mode::none);
  STATIC_REQUIRE(exact.deterministic);

  const cce::options defaults{};
  CHECK(defaults.filter == cce::filter_mode::automatic);
  CHECK_FALSE(defaults.deterministic);
  // Everything else is left at its default.
  CHECK(exact.reduction == defaults.reduction);
  CHECK(exact.ignore_index == defaults.ignore_index);
  CHECK(exact.temperature == defaults.temperature);
}
