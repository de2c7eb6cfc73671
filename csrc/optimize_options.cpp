#include "optimize_options.h"

#include <charconv>
#include <sstream>

namespace adaround {
namespace {

std::string literal(int64_t v) { return std::to_string(v); }
std::string literal(bool v) { return v ? "True" : "False"; }
std::string literal(const std::string& v) { return "'" + v + "'"; }
// The shortest decimal that reads back as the same double (std::to_chars: independent of the locale),
// with a point so that it reads as a float ("20.").
std::string literal(double v) {
  char buffer[32];
  const auto result = std::to_chars(buffer, buffer + sizeof(buffer), v);
  std::string s(buffer, result.ptr);
  return s.find_first_of(".e") == std::string::npos ? s + "." : s;
}

const char* schema_type(int64_t) { return "int"; }
const char* schema_type(double) { return "float"; }
const char* schema_type(const std::string&) { return "str"; }
const char* schema_type(bool) { return "bool"; }

}  // namespace

std::string optimize_options_schema() {
  const OptimizeOptions defaults;
  std::ostringstream schema;
  const char* separator = "";
#define ADAROUND_SCHEMA_ENTRY(type, name)                                                            \
  schema << separator << schema_type(defaults.name) << " " #name "=" << literal(defaults.name); \
  separator = ", ";
  ADAROUND_OPTIMIZE_OPTIONS(ADAROUND_SCHEMA_ENTRY)
#undef ADAROUND_SCHEMA_ENTRY
  return schema.str();
}

}  // namespace adaround
