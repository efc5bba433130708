#include <gtest/gtest.h>

#include <cmath>

#include "engine/base/dtype.h"
#include "engine/base/error.h"

namespace needle {
namespace {

TEST(DType, F16RoundTripsEveryValue) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = F16ToF32(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    EXPECT_EQ(F32ToF16(f), h) << "f16 bits " << h;
  }
}

TEST(DType, F16KnownValuesAndRounding) {
  EXPECT_EQ(F16ToF32(0x3c00), 1.0f);
  EXPECT_EQ(F16ToF32(0xc000), -2.0f);
  EXPECT_EQ(F16ToF32(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(F32ToF16(65504.0f), 0x7bff);
  EXPECT_EQ(F32ToF16(1e6f), 0x7c00);  // overflow to inf
  // 1 + 2^-11 is halfway between 1 and the next f16: ties to even (1.0).
  EXPECT_EQ(F32ToF16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);
  EXPECT_EQ(F32ToF16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
}

TEST(DType, BF16RoundsToNearestEven) {
  EXPECT_EQ(F32ToBF16(1.0f), 0x3f80);
  EXPECT_EQ(BF16ToF32(0x3f80), 1.0f);
  // 1 + 2^-8 is halfway between bf16 1.0 and 1.0078125: ties to even.
  EXPECT_EQ(F32ToBF16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  EXPECT_EQ(F32ToBF16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_TRUE(std::isnan(BF16ToF32(F32ToBF16(NAN))));
}

TEST(DType, ParseNames) {
  DType t;
  EXPECT_TRUE(ParseSafetensorsDType("BF16", &t));
  EXPECT_EQ(t, DType::kBF16);
  EXPECT_FALSE(ParseSafetensorsDType("F8_E4M3X", &t));
  EXPECT_EQ(ParseFloatDType("f16", "--kv-type"), DType::kF16);
  EXPECT_THROW(ParseFloatDType("int4", "--kv-type"), Error);
}

}  // namespace
}  // namespace needle
