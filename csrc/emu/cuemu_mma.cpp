// cuemu: the tensor-core instructions the wrappers of csrc/cuda/mma.cuh issue, emulated one
// warp at a time (warp_collective in cuemu.cpp): mma.sync.aligned.m16n8k16.row.col with
// fp32 accumulation for .bf16 and .f16 inputs, and ldmatrix.sync.aligned.m8n8{.x1,.x2,.x4}
// {,.trans}.shared.b16.
//
// The fragment layouts below are the PTX ISA's ("Matrix Fragments for mma.m16n8k16 with
// floating point type", "Warp-level matrix load instruction: ldmatrix"). They are written
// once, here; tests/test_mma_layouts.py checks them against CuTe's MMA_Traits and
// Copy_Traits (SM80_16x8x16_F32{BF16BF16,F16F16}F32_TN, SM75_*_LDSM_{N,T}) and against a
// matmul in float64, so a kernel and the emulator cannot share one mistake.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdlib>
#include <cstring>

#include "cuemu.h"
#include "cuemu_internal.h"

namespace cuemu {

// ---- m16n8k16 fragment layouts (PTX ISA) ---------------------------------------------------
// groupID = lane >> 2 and threadID_in_group = lane % 4. Element i of a lane's fragment sits
// in register i / 2, in its low 16 bits when i is even.
//   A (16 x 16, row-major operand), a0..a7 in 4 registers:
//     row = groupID + 8 * ((i / 2) % 2), col = 2 * threadID_in_group + i % 2 + 8 * (i / 4)
//   B (16 x 8, column-major operand), b0..b3 in 2 registers:
//     row (k) = 2 * threadID_in_group + i % 2 + 8 * (i / 2), col (n) = groupID
//   C and D (16 x 8, fp32), c0..c3 in 4 registers:
//     row = groupID + 8 * (i / 2), col = 2 * threadID_in_group + i % 2
void mma_layout(MmaOperand op, int lane, int i, int* row, int* col) {
  const int g = lane >> 2, t = lane & 3;
  switch (op) {
    case kOperandA:
      *row = g + 8 * ((i >> 1) & 1);
      *col = 2 * t + (i & 1) + 8 * (i >> 2);
      return;
    case kOperandB:
      *row = 2 * t + (i & 1) + 8 * (i >> 1);
      *col = g;
      return;
    case kOperandC:
      *row = g + 8 * (i >> 1);
      *col = 2 * t + (i & 1);
      return;
  }
}

// ---- ldmatrix layout (PTX ISA) --------------------------------------------------------------
// Lane l supplies the address of row l % 8 of matrix l / 8 (lanes 0-7 for .x1, 0-15 for
// .x2, all for .x4; the other lanes' addresses are not used). Each row is 8 b16 elements,
// 16 contiguous bytes. Lane t receives, in register j, two elements of matrix j, element e
// (0: low half, 1: high half) being
//   row t / 4, column 2 * (t % 4) + e             without .trans,
//   row 2 * (t % 4) + e, column t / 4             with .trans.
void ldmatrix_layout(bool trans, int lane, int e, int* row, int* col) {
  if (trans) {
    *row = 2 * (lane & 3) + e;
    *col = lane >> 2;
  } else {
    *row = lane >> 2;
    *col = 2 * (lane & 3) + e;
  }
}

namespace {

float decode(uint16_t bits, MmaType type) {
  if (type == kMmaBf16) {
    __nv_bfloat16 h;
    h.__x = bits;
    return __bfloat162float(h);
  }
  __half h;
  h.__x = bits;
  return __half2float(h);
}

float element(const uint32_t* regs, int i, MmaType type) {
  const uint32_t r = regs[i >> 1];
  return decode(static_cast<uint16_t>((i & 1) ? r >> 16 : r & 0xffffu), type);
}

struct MmaFrag {
  float* c;
  const uint32_t* a;
  const uint32_t* b;
};

// D = A * B + C over the whole warp. Products of two bf16 or two fp16 values are exact in
// fp32; each of D's elements is accumulated in fp32, C first, then k = 0..15 in order (the
// tensor core's order and rounding inside the sum differ in the last bits).
template <MmaType kType>
void mma_op(void* const* frags) {
  float A[16][16], B[16][8], C[16][8];
  int r, c;
  for (int lane = 0; lane < 32; ++lane) {
    const MmaFrag& f = *static_cast<const MmaFrag*>(frags[lane]);
    for (int i = 0; i < 8; ++i) {
      mma_layout(kOperandA, lane, i, &r, &c);
      A[r][c] = element(f.a, i, kType);
    }
    for (int i = 0; i < 4; ++i) {
      mma_layout(kOperandB, lane, i, &r, &c);
      B[r][c] = element(f.b, i, kType);
      mma_layout(kOperandC, lane, i, &r, &c);
      C[r][c] = f.c[i];
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const MmaFrag& f = *static_cast<const MmaFrag*>(frags[lane]);
    for (int i = 0; i < 4; ++i) {
      mma_layout(kOperandC, lane, i, &r, &c);
      float acc = C[r][c];
      for (int k = 0; k < 16; ++k) acc += A[r][k] * B[k][c];
      f.c[i] = acc;
    }
  }
}

struct LdmFrag {
  uint32_t* r;
  const void* addr;
};

template <int kNum, bool kTrans>
void ldmatrix_op(void* const* frags) {
  uint16_t m[4][8][8];  // [matrix][row][column]
  for (int j = 0; j < kNum; ++j) {
    for (int row = 0; row < 8; ++row) {
      const int lane = 8 * j + row;
      const void* p = static_cast<const LdmFrag*>(frags[lane])->addr;
      check_warp_smem_row(p, lane);  // shared, 16-byte aligned, no cp.async pending or unseen
      std::memcpy(m[j][row], p, 16);
    }
  }
  int row, col;
  for (int lane = 0; lane < 32; ++lane) {
    uint32_t* out = static_cast<const LdmFrag*>(frags[lane])->r;
    for (int j = 0; j < kNum; ++j) {
      uint32_t v = 0;
      for (int e = 0; e < 2; ++e) {
        ldmatrix_layout(kTrans, lane, e, &row, &col);
        v |= static_cast<uint32_t>(m[j][row][col]) << (16 * e);
      }
      out[j] = v;
    }
  }
}

}  // namespace

void mma_m16n8k16(MmaType type, float* c, const uint32_t* a, const uint32_t* b, const char* file, int line) {
  MmaFrag f{c, a, b};
  if (type == kMmaBf16)
    warp_collective("mma.sync.m16n8k16.bf16", &mma_op<kMmaBf16>, &f, file, line);
  else
    warp_collective("mma.sync.m16n8k16.f16", &mma_op<kMmaF16>, &f, file, line);
}

void ldmatrix(int num, bool trans, uint32_t* r, const void* smem, const char* file, int line) {
  LdmFrag f{r, smem};
  WarpOp op = nullptr;
  const char* name = "";
  switch (num * 2 + (trans ? 1 : 0)) {
    case 2: op = &ldmatrix_op<1, false>, name = "ldmatrix.x1"; break;
    case 3: op = &ldmatrix_op<1, true>, name = "ldmatrix.x1.trans"; break;
    case 4: op = &ldmatrix_op<2, false>, name = "ldmatrix.x2"; break;
    case 5: op = &ldmatrix_op<2, true>, name = "ldmatrix.x2.trans"; break;
    case 8: op = &ldmatrix_op<4, false>, name = "ldmatrix.x4"; break;
    case 9: op = &ldmatrix_op<4, true>, name = "ldmatrix.x4.trans"; break;
    default: std::abort();  // the wrappers pass 1, 2 or 4
  }
  warp_collective(name, op, &f, file, line);
}

}  // namespace cuemu
