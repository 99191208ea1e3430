// Emulator shim of <cuda_fp16.h>: the storage type and its conversions, round to nearest
// even with subnormals, infinities and NaN handled as the device intrinsics do.
#pragma once
#include <cstdint>
#include <cstring>

#include "../cuemu.h"

struct __half {
  unsigned short __x;
};

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.__x & 0x8000u) << 16;
  const uint32_t exp = (h.__x >> 10) & 0x1fu;
  uint32_t mant = h.__x & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf, or NaN keeping its payload
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    bits = sign | ((112u - static_cast<uint32_t>(e)) << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  __half h;
  if (ax >= 0x7f800000u) {  // inf or NaN (NaN stays a quiet NaN)
    h.__x = static_cast<uint16_t>(sign | (ax > 0x7f800000u ? 0x7e00u | ((ax >> 13) & 0x3ffu) : 0x7c00u));
    return h;
  }
  if (ax >= 0x477ff000u) {  // rounds to >= 65520: overflow to inf
    h.__x = static_cast<uint16_t>(sign | 0x7c00u);
    return h;
  }
  if (ax < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    if (ax < 0x33000000u) {  // < 2^-25 rounds to 0 (exactly 2^-25 is a tie to even: 0)
      h.__x = sign;
      return h;
    }
    const uint32_t e = ax >> 23;            // 102 .. 112
    const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;        // value = m * 2^(e-150); half ulp 2^-24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
    h.__x = static_cast<uint16_t>(sign | r);
    return h;
  }
  uint32_t r = ((ax - 0x38000000u) >> 13);  // rebias exponent 127 -> 15
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  h.__x = static_cast<uint16_t>(sign | r);
  return h;
}
inline __half __float2half(float f) { return __float2half_rn(f); }

// Bit casts (host and device in CUDA's header too).
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short bits) {
  __half h;
  h.__x = bits;
  return h;
}
