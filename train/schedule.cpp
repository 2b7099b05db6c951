#include "train/schedule.h"

#include <algorithm>
#include <cmath>

namespace nha {

double lr_at(const TrainConfig& c, int64_t step) {
  const int64_t total = c.total_steps();
  const double min_lr = c.lr * c.min_lr_ratio;
  if (step < c.warmup_steps) return c.lr * double(step + 1) / double(c.warmup_steps);
  switch (c.schedule) {
    case Schedule::Constant: return c.lr;
    case Schedule::Cosine: {
      const double span = double(std::max<int64_t>(1, total - c.warmup_steps));
      const double p = std::min(1.0, double(step - c.warmup_steps) / span);
      return min_lr + (c.lr - min_lr) * 0.5 * (1.0 + std::cos(M_PI * p));
    }
    case Schedule::WSD: {
      const double decay_steps = std::max(1.0, std::round(c.decay_fraction * double(total)));
      const double decay_start = double(total) - decay_steps;
      if (double(step) < decay_start) return c.lr;
      const double p = std::min(1.0, (double(step) - decay_start) / decay_steps);
      return c.lr + (min_lr - c.lr) * p;
    }
  }
  return c.lr;
}

}  // namespace nha
