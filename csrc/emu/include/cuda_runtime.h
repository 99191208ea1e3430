// Emulator shim of <cuda_runtime.h> (csrc/emu/cuemu.h): only on the emulator's include path.
#pragma once
#include "../cuemu.h"
