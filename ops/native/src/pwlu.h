// PWLU (ops/pwlu.py): a piecewise-linear activation with N uniform intervals on [B_L, B_R], knot
// values Y_0..Y_N and linear tails of slopes K_L, K_R, one function for the whole tensor or one per
// channel of X's axis rank(X) - rank(P).
#pragma once

#include "common.h"

namespace onnxvq {

// The ai.onnxvq PWLU custom op (X, bounds, knots, slopes -> Y, all float32), for
// RegisterCustomOps to add to its domain. One instance for the process.
OrtCustomOp* PWLUCustomOp();

}  // namespace onnxvq
