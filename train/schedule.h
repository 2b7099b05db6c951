// Learning-rate schedules. Step s counts optimizer steps from 0.
//   warmup (s < W):  lr * (s + 1) / W
//   cosine:          min + (lr - min) * (1 + cos(pi * p)) / 2,  p = (s - W) / (S - W)
//   wsd:             lr until the last decay_fraction of steps, then linear to min
//   constant:        lr
// with min = lr * min_lr_ratio and S = total steps.
#pragma once
#include <cstdint>

#include "train/config.h"

namespace nha {

double lr_at(const TrainConfig& config, int64_t step);

}  // namespace nha
