// Host-side parts of the emulator used by its C API (capi.cpp): configuration, guarded
// global buffers, statistics and the message of the last failure.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace cuemu {

struct Config {
  uint64_t seed = 0;        // scheduling seed: 0 and 1 are fixed orders, others random
  int64_t sample_blocks = 0;  // > 0: run only the first, last and this many random blocks
  int guard_mode = 0;       // 0: buffers end at a guard page; 1: they start after one
};
void configure(const Config& cfg);
Config config();

// A host buffer copied into its own mapping between two PROT_NONE guard pages for the
// duration of a launch: an access past either end faults, and the SIGSEGV handler names
// the buffer, the offset and the CUDA thread. Outputs are copied back on destruction.
class GuardedBuffer {
 public:
  GuardedBuffer(const char* name, void* host, size_t bytes, bool copy_back);
  ~GuardedBuffer();
  GuardedBuffer(const GuardedBuffer&) = delete;
  GuardedBuffer& operator=(const GuardedBuffer&) = delete;
  void* data() const { return data_; }

 private:
  const char* name_;
  void* host_;
  size_t bytes_;
  bool copy_back_;
  char* map_ = nullptr;
  size_t map_len_ = 0;
  char* data_ = nullptr;
  int slot_ = -1;
};

// Details of the last emulator failure on this thread ("" if none), and clearing them.
const std::string& last_message();
void clear_last_message();

struct Stats {
  int64_t launches = 0, blocks = 0, context_switches = 0;
};
Stats stats();
// The same counts for the launches made from one source file (launch_kernel's call site,
// by file name, e.g. "retrieval_tc_fwd.cu"): launches that passed the launch checks and
// blocks run (no context switches). Tests use it to tell which kernel a dispatch ran.
Stats site_stats(const char* file);

}  // namespace cuemu

namespace cuemu {

// The fragment layouts the emulated tensor-core instructions use (cuemu_mma.cpp), exposed
// for tests/test_mma_layouts.py through the C API (capi.cpp).
enum MmaOperand : int { kOperandA = 0, kOperandB = 1, kOperandC = 2 };
// (row, col) of element i of `lane`'s m16n8k16 fragment of operand A (16 x 16, i < 8),
// B (16 x 8: row = k, col = n, i < 4) or C/D (16 x 8, i < 4).
void mma_layout(MmaOperand op, int lane, int i, int* row, int* col);
// (row, col) within matrix j of element e (0: low half) of register j that `lane` gets from
// ldmatrix(.trans).
void ldmatrix_layout(bool trans, int lane, int e, int* row, int* col);

}  // namespace cuemu
