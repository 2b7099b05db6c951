#include "common/nha_reference.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace nha {

std::pair<Tensor, Tensor> nha_recurrent_forward(const Tensor& q, const Tensor& k, const Tensor& qr,
                                                const Tensor& kr, const Tensor& v, const Tensor& s,
                                                const Tensor& g, double scale, int64_t window) {
  NHA_CHECK(q.dim() == 4 && v.dim() == 4 && s.dim() == 4)
      << "nha_recurrent_forward: wants [B, T, H, D] inputs, got " << q.str();
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dk = q.size(3), Dv = v.size(3),
                M = s.size(3);
  // Host copies in double; element (b, t, h, x) of a [B, T, H, X] tensor is at
  // ((b*T + t)*H + h)*X + x.
  const std::vector<double> Q = q.to_vector<double>(), K = k.to_vector<double>(),
                            QR = qr.to_vector<double>(), KR = kr.to_vector<double>(),
                            V = v.to_vector<double>(), S = s.to_vector<double>(),
                            G = g.to_vector<double>();
  auto at = [&](int64_t b, int64_t t, int64_t h, int64_t X) {
    return size_t(((b * T + t) * H + h) * X);
  };
  std::vector<double> out(size_t(B * T * H * Dv), 0.0), lse(size_t(B * H * T));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      std::vector<double> Hk(size_t(Dk * M), 0.0), Hv(size_t(M * Dv), 0.0);  // [Dk, M], [M, Dv]
      for (int64_t t = 0; t < T; ++t) {
        // Write the token that just left the window (window 0: the current token).
        if (const int64_t j = t - window; j >= 0)
          for (int64_t m = 0; m < M; ++m) {
            const double a = std::exp(G[at(b, j, h, M) + m]), sj = S[at(b, j, h, M) + m];
            for (int64_t d = 0; d < Dk; ++d)
              Hk[d * M + m] = Hk[d * M + m] * a + K[at(b, j, h, Dk) + d] * sj;
            for (int64_t e = 0; e < Dv; ++e)
              Hv[m * Dv + e] = Hv[m * Dv + e] * a + sj * V[at(b, j, h, Dv) + e];
          }
        // Logits [slots ; window], then one softmax.
        const int64_t u0 = window == 0 ? t + 1 : std::max<int64_t>(0, t - window + 1);
        std::vector<double> z(size_t(M + t + 1 - u0), 0.0);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t d = 0; d < Dk; ++d) z[m] += scale * Q[at(b, t, h, Dk) + d] * Hk[d * M + m];
        for (int64_t u = u0; u <= t; ++u)
          for (int64_t d = 0; d < Dk; ++d)
            z[M + u - u0] += scale * QR[at(b, t, h, Dk) + d] * KR[at(b, u, h, Dk) + d];
        const double mx = *std::max_element(z.begin(), z.end());
        double sum = 0;
        for (double zi : z) sum += std::exp(zi - mx);
        const double l = mx + std::log(sum);
        lse[size_t((b * H + h) * T + t)] = l;
        double* o = out.data() + at(b, t, h, Dv);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t e = 0; e < Dv; ++e) o[e] += std::exp(z[m] - l) * Hv[m * Dv + e];
        for (int64_t u = u0; u <= t; ++u)
          for (int64_t e = 0; e < Dv; ++e)
            o[e] += std::exp(z[M + u - u0] - l) * V[at(b, u, h, Dv) + e];
      }
    }
  return {Tensor::from_vector<double>(out, {B, T, H, Dv}),
          Tensor::from_vector<double>(lse, {B, H, T})};
}

}  // namespace nha
