// The visible keys of an attention row, shared by both instruction-set builds of the attention kernel. Included
// by the attention_*.h kernels only.
#pragma once

#include <cstdint>
#include <vector>

namespace {

// The visible cache positions of row i, in the order every sum over them is taken.
void visible_keys(int64_t i, const int64_t* lo, const int64_t* prefix_end,
                  const bool* mask, int64_t mask_cols, std::vector<int64_t>& keys) {
  keys.clear();
  for (int64_t t = lo[i]; t < prefix_end[i]; ++t) keys.push_back(t);
  for (int64_t j = 0; j < mask_cols; ++j)
    if (mask[i * mask_cols + j]) keys.push_back(prefix_end[i] + j);
}

}  // namespace
