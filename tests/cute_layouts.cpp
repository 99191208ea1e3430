// CuTe's statement of the PTX layouts the CUDA emulator implements (csrc/emu/cuemu_mma.cpp),
// printed as JSON for tests/test_mma_layouts.py: an authority independent of this project.
// Host code only; built by that test with g++ against the CuTe headers of the nvidia-cutlass
// wheel (cutlass_library/source/include) and the CUDA toolkit's include folders.
//
// mma: for each MMA atom, "A"[lane][i] = [m, k], "B"[lane][i] = [n, k], "C"[lane][i] = [m, n]
//   from MMA_Traits<...>::{A,B,C}Layout, which map (thread, value) to an index of the
//   column-major (M, K), (N, K) and (M, N) tiles.
// ldmatrix: for each copy atom (SM75_U32x{1,2,4}_LDSM_N, SM75_U16x{2,4,8}_LDSM_T), bits of a
//   stack of 8 x 8 b16 matrices (1024 bits each, row-major, 128 bits a row):
//   "src"[lane] = the row (matrix * 8 + row) whose 128 bits lane supplies (SrcLayout);
//   "dst"[lane][e] = the element (matrix * 64 + row * 8 + col) lane receives as its e-th
//   16-bit value (register e / 2, low half first) (DstLayout).
// Anything that does not fit these shapes (a value not 16 contiguous bits, a thread map
// that is not the identity) is named on stderr, counted in "errors" and fails the test.
#include <cstdio>
#include <cute/atom/copy_traits_sm75.hpp>
#include <cute/atom/mma_traits_sm80.hpp>

using namespace cute;

static int g_errors = 0;

static void error(const char* what, const char* atom) {
  std::fprintf(stderr, "%s in %s\n", what, atom);
  ++g_errors;
}

template <class ThrID>
static void check_threads(const char* atom) {
  if (int(size(ThrID{})) != 32) error("ThrID of size != 32", atom);
  for (int t = 0; t < 32; ++t)
    if (int(ThrID{}(t)) != t) error("ThrID is not the identity", atom);
}

// [[[a, b], ...] per value] per thread: idx = layout(t, v), a = idx % rows, b = idx / rows.
template <class L>
static void print_tv(const char* key, L layout, int rows, bool comma) {
  std::printf("\"%s\": [", key);
  for (int t = 0; t < int(size<0>(layout)); ++t) {
    std::printf("%s[", t ? ", " : "");
    for (int v = 0; v < int(size<1>(layout)); ++v) {
      const int idx = int(layout(t, v));
      std::printf("%s[%d, %d]", v ? ", " : "", idx % rows, idx / rows);
    }
    std::printf("]");
  }
  std::printf("]%s\n", comma ? "," : "");
}

template <class Op>
static void print_mma(const char* atom, bool comma) {
  using Traits = MMA_Traits<Op>;
  check_threads<typename Traits::ThrID>(atom);
  using MNK = typename Traits::Shape_MNK;
  const int M = int(size<0>(MNK{})), N = int(size<1>(MNK{}));
  std::printf("\"%s\": {\"shape\": [%d, %d, %d],\n", atom, M, N, int(size<2>(MNK{})));
  print_tv("A", typename Traits::ALayout{}, M, true);
  print_tv("B", typename Traits::BLayout{}, N, true);
  print_tv("C", typename Traits::CLayout{}, M, false);
  std::printf("}%s\n", comma ? "," : "");
}

template <class Op>
static void print_ldsm(const char* atom, bool comma) {
  using Traits = Copy_Traits<Op>;
  check_threads<typename Traits::ThrID>(atom);
  using Src = typename Traits::SrcLayout;
  using Dst = typename Traits::DstLayout;
  std::printf("\"%s\": {\"src\": [", atom);
  for (int t = 0; t < 32; ++t) {
    const int first = int(Src{}(t, 0));
    if (int(size<1>(Src{})) != 128 || first % 128) error("a source value that is not one 128-bit row", atom);
    for (int b = 0; b < 128; ++b)
      if (int(Src{}(t, b)) != first + b) error("a source row that is not 128 contiguous bits", atom);
    std::printf("%s%d", t ? ", " : "", first / 128);
  }
  std::printf("],\n\"dst\": [");
  const int values = int(size<1>(Dst{}));
  if (values % 16) error("a destination that is not whole 16-bit values", atom);
  for (int t = 0; t < 32; ++t) {
    std::printf("%s[", t ? ", " : "");
    for (int e = 0; e < values / 16; ++e) {
      const int first = int(Dst{}(t, 16 * e));
      if (first % 16) error("a 16-bit value that is not element-aligned", atom);
      for (int b = 0; b < 16; ++b)
        if (int(Dst{}(t, 16 * e + b)) != first + b) error("a 16-bit value that is not 16 contiguous bits", atom);
      std::printf("%s%d", e ? ", " : "", first / 16);
    }
    std::printf("]");
  }
  std::printf("]}%s\n", comma ? "," : "");
}

int main() {
  std::printf("{\"mma\": {\n");
  print_mma<SM80_16x8x16_F32BF16BF16F32_TN>("SM80_16x8x16_F32BF16BF16F32_TN", true);
  print_mma<SM80_16x8x16_F32F16F16F32_TN>("SM80_16x8x16_F32F16F16F32_TN", false);
  std::printf("},\n\"ldmatrix\": {\n");
  print_ldsm<SM75_U32x1_LDSM_N>("SM75_U32x1_LDSM_N", true);
  print_ldsm<SM75_U32x2_LDSM_N>("SM75_U32x2_LDSM_N", true);
  print_ldsm<SM75_U32x4_LDSM_N>("SM75_U32x4_LDSM_N", true);
  print_ldsm<SM75_U16x2_LDSM_T>("SM75_U16x2_LDSM_T", true);
  print_ldsm<SM75_U16x4_LDSM_T>("SM75_U16x4_LDSM_T", true);
  print_ldsm<SM75_U16x8_LDSM_T>("SM75_U16x8_LDSM_T", false);
  std::printf("},\n\"errors\": %d}\n", g_errors);
  return g_errors ? 1 : 0;
}
