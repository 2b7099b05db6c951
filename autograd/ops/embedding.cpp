// embedding: forward and backward through Backend::embedding_forward/backward.
#include "autograd/autocast.h"
#include "autograd/ops.h"
#include "autograd/ops/op_util.h"

namespace nha {

using autograd::Node;
using autograd::SavedTensor;
using ops_detail::record;

namespace {

// out [..., C] = table[ids]:  dtable[v] = sum of dout rows whose id is v (ids get no gradient)
struct EmbeddingBackward final : Node {
  SavedTensor ids;         // [...] i32/i64
  int64_t table_rows = 0;  // V
  std::vector<Tensor> apply(std::vector<Tensor>&& g) override {
    const autograd::OutputMeta& m = outputs[0];  // [..., C]
    Tensor idv = ids.unpack(), dout = g[0].contiguous();
    Tensor dtable = Tensor::empty({table_rows, m.shape.back()}, m.dtype, m.device);  // [V, C]
    backend_for(dout).embedding_backward(dtable, dout, idv);
    return {dtable};
  }
  std::string name() const override { return "EmbeddingBackward"; }
  void release_saved() override { ids.reset(); }
};

}  // namespace

Tensor embedding(const Tensor& table, const Tensor& ids) {
  ops_detail::check_same_device({table, ids}, "embedding");
  NHA_CHECK(table.dim() == 2) << "embedding: table must be [V, C], got " << table.str();
  Tensor tc = table.contiguous(), idc = ids.contiguous();
  Shape out_shape = ids.shape();
  out_shape.push_back(table.size(1));
  Tensor out = Tensor::empty(out_shape, table.dtype(), table.device());  // [..., C]
  backend_for(tc).embedding_forward(out, tc, idc);
  if (autograd::any_requires_grad({table})) {
    auto node = std::make_shared<EmbeddingBackward>();
    node->ids = SavedTensor(idc, "embedding.ids");
    node->table_rows = table.size(0);
    record(node, {table}, out);
  }
  // Mixed precision (autograd/autocast.h): the table stays fp32 (and its gradient fp32); the
  // activations leave in the autocast dtype.
  return autocast(out);
}

}  // namespace nha
