// The schema of torch.ops.adaround.optimize_layer carries OptimizeOptions' defaults, option by option.
#include <gtest/gtest.h>
#include <torch/csrc/jit/frontend/function_schema_parser.h>
#include <torch/torch.h>

#include <string>

#include "optimize_options.h"

namespace {

template <typename T>
T default_of(const c10::Argument& argument) {
  return argument.default_value()->to<T>();
}

TEST(OptimizeOptions, SchemaDefaultsAreTheStructDefaults) {
  const c10::FunctionSchema schema =
      std::get<c10::FunctionSchema>(torch::jit::parseSchemaOrName("f(" + adaround::optimize_options_schema() + ") -> ()"));
  const adaround::OptimizeOptions defaults;
  size_t index = 0;
#define ADAROUND_EXPECT_DEFAULT(type, option)                          \
  {                                                                     \
    const c10::Argument& argument = schema.arguments().at(index++);     \
    EXPECT_EQ(argument.name(), #option);                                \
    ASSERT_TRUE(argument.default_value().has_value()) << #option;       \
    EXPECT_EQ(default_of<type>(argument), defaults.option) << #option;  \
  }
  ADAROUND_OPTIMIZE_OPTIONS(ADAROUND_EXPECT_DEFAULT)
#undef ADAROUND_EXPECT_DEFAULT
  EXPECT_EQ(index, schema.arguments().size());
}

}  // namespace
