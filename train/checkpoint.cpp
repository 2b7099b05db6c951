// HDF5 checkpoints through the HDF5 C API; every call goes through H5_CHECK (see train/checkpoint.h
// and docs/checkpoint.md).
#include "train/checkpoint.h"

#include <hdf5.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <csignal>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <set>

#include "autograd/node.h"
#include "core/dtype.h"
#include "core/fileio.h"
#include "core/error.h"
#include "train/optim.h"

namespace fs = std::filesystem;

namespace nha {

namespace {

// ---- error handling ------------------------------------------------------------------------------

constexpr const char* kDamagedHint =
    "the checkpoint is damaged; resume from an older one (`nha train --resume` falls back to the "
    "newest checkpoint that verifies)";

void quiet_hdf5() {
  static bool once = [] {
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);  // we report errors ourselves
    return true;
  }();
  (void)once;
}

// The innermost entries of HDF5's error stack ("H5Dcreate2: unable to create dataset; ...").
std::string hdf5_error_text() {
  std::string msg;
  H5Ewalk2(
      H5E_DEFAULT, H5E_WALK_DOWNWARD,
      [](unsigned n, const H5E_error2_t* e, void* data) -> herr_t {
        auto* s = static_cast<std::string*>(data);
        if (n >= 3) return 0;
        if (!s->empty()) *s += "; ";
        *s += std::string(e->func_name ? e->func_name : "?") + ": " + (e->desc ? e->desc : "");
        return 0;
      },
      &msg);
  H5Eclear2(H5E_DEFAULT);
  return msg.empty() ? "no HDF5 error message" : msg;
}

// Evaluates an HDF5 call (hid_t/herr_t/htri_t: negative = failure); on failure throws an nha::Error
// with the file:line of the call site, the call's text, the file being accessed and HDF5's message.
#define H5_CHECK(call, file)                                                                   \
  [&] {                                                                                       \
    auto h5_result_ = (call);                                                                 \
    if (h5_result_ < 0) {                                                                     \
      const std::string h5_msg_ = hdf5_error_text();                                          \
      NHA_FAIL() << "HDF5 call " #call " failed for '" << (file) << "': " << h5_msg_          \
                 << ". HINT: is the path writable/readable, the disk not full, and the file an " \
                    "NHA checkpoint (docs/checkpoint.md)?";                                   \
    }                                                                                         \
    return h5_result_;                                                                        \
  }()

// An HDF5 identifier closed by its own close function at scope exit (errors there are ignored:
// the file-level close that matters is checked explicitly).
class Handle {
 public:
  Handle() = default;
  Handle(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  ~Handle() { reset(); }
  Handle(Handle&& o) noexcept : id_(o.id_), close_(o.close_) { o.id_ = -1; }
  Handle& operator=(Handle&& o) noexcept {
    if (this != &o) {
      reset();
      id_ = o.id_;
      close_ = o.close_;
      o.id_ = -1;
    }
    return *this;
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  hid_t get() const { return id_; }
  operator hid_t() const { return id_; }
  hid_t release() {
    hid_t id = id_;
    id_ = -1;
    return id;
  }
  void reset() {
    if (id_ >= 0 && close_) close_(id_);
    id_ = -1;
  }

 private:
  hid_t id_ = -1;
  herr_t (*close_)(hid_t) = nullptr;
};

int64_t g_fail_after = -1;  // test hook: datasets left before an injected failure

void count_dataset_for_testing() {
  if (g_fail_after < 0) return;
  if (g_fail_after == 0) {
    g_fail_after = -1;
    NHA_FAIL() << "injected checkpoint write failure (set_checkpoint_failure_for_testing)";
  }
  --g_fail_after;
}

// ---- writing -------------------------------------------------------------------------------------

// bfloat16 as an HDF5 float type: the top 16 bits of an IEEE f32 (sign 15, exponent 7..14, mantissa
// 0..6, bias 127). HDF5 converts it to/from other float types exactly on read.
Handle bf16_type(const std::string& file) {
  Handle t(H5_CHECK(H5Tcopy(H5T_IEEE_F32LE), file), H5Tclose);
  H5_CHECK(H5Tset_fields(t, 15, 7, 8, 0, 7), file);
  H5_CHECK(H5Tset_precision(t, 16), file);
  H5_CHECK(H5Tset_size(t, 2), file);
  H5_CHECK(H5Tset_ebias(t, 127), file);
  return t;
}

Handle vlen_string_type(const std::string& file) {
  Handle t(H5_CHECK(H5Tcopy(H5T_C_S1), file), H5Tclose);
  H5_CHECK(H5Tset_size(t, H5T_VARIABLE), file);
  H5_CHECK(H5Tset_cset(t, H5T_CSET_UTF8), file);
  return t;
}

// Object creation properties without modification times: the same state gives the same bytes.
Handle no_times_plist(hid_t cls, const std::string& file) {
  Handle p(H5_CHECK(H5Pcreate(cls), file), H5Pclose);
  H5_CHECK(H5Pset_obj_track_times(p, false), file);
  return p;
}

class Writer {
 public:
  // The file is built in memory (HDF5's core driver without a backing store) and written by
  // commit() with checked writes: HDF5 itself never writes to disk, so a full disk cannot fail
  // inside HDF5's close, which then left the file open and crashed at exit (H5F__close_cb).
  explicit Writer(std::string final_path) : path_(std::move(final_path)) {
    quiet_hdf5();
    Handle fcpl = no_times_plist(H5P_FILE_CREATE, path_);
    H5_CHECK(H5Pset_userblock(fcpl, hsize_t(kSealBytes)), path_);  // for seal_image (core/fileio.h)
    Handle fapl(H5_CHECK(H5Pcreate(H5P_FILE_ACCESS), path_), H5Pclose);
    H5_CHECK(H5Pset_fapl_core(fapl, size_t(64) << 20, false), path_);
    file_ = Handle(H5_CHECK(H5Fcreate(path_.c_str(), H5F_ACC_TRUNC, fcpl, fapl), path_), H5Fclose);
  }

  hid_t file() const { return file_; }

  Handle group(hid_t parent, const std::string& name) {
    Handle gcpl = no_times_plist(H5P_GROUP_CREATE, path_);
    return Handle(H5_CHECK(H5Gcreate2(parent, name.c_str(), H5P_DEFAULT, gcpl, H5P_DEFAULT), path_),
                  H5Gclose);
  }

  // A float tensor as /<parent>/<name> in f32 or bf16.
  void tensor(hid_t parent, const std::string& name, const Tensor& t, DType dtype) {
    count_dataset_for_testing();
    std::vector<hsize_t> dims(t.shape().begin(), t.shape().end());
    Handle space(dims.empty() ? H5_CHECK(H5Screate(H5S_SCALAR), path_)
                              : H5_CHECK(H5Screate_simple(int(dims.size()), dims.data(), nullptr),
                                         path_),
                 H5Sclose);
    Handle dcpl = no_times_plist(H5P_DATASET_CREATE, path_);
    std::vector<float> values = t.detach().to_vector<float>();
    if (dtype == DType::BF16) {
      Handle type = bf16_type(path_);
      std::vector<uint16_t> bits(values.size());
      for (size_t i = 0; i < values.size(); ++i) {
        bits[i] = bf16::round_from_float(values[i]);  // nearest even, as Tensor::to(BF16)
      }
      Handle ds(H5_CHECK(H5Dcreate2(parent, name.c_str(), type, space, H5P_DEFAULT, dcpl,
                                    H5P_DEFAULT), path_),
                H5Dclose);
      H5_CHECK(H5Dwrite(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, bits.data()), path_);
      attr(ds, kChecksumAttr, xxh64(bits.data(), bits.size() * sizeof(uint16_t), 0));
    } else {
      NHA_CHECK(dtype == DType::F32) << "checkpoint tensors are f32 or bf16, not "
                                     << dtype_name(dtype);
      Handle ds(H5_CHECK(H5Dcreate2(parent, name.c_str(), H5T_IEEE_F32LE, space, H5P_DEFAULT,
                                    dcpl, H5P_DEFAULT), path_),
                H5Dclose);
      H5_CHECK(H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()), path_);
      attr(ds, kChecksumAttr, xxh64(values.data(), values.size() * sizeof(float), 0));
    }
  }

  void string_dataset(hid_t parent, const std::string& name, const std::string& value) {
    count_dataset_for_testing();
    Handle type = vlen_string_type(path_);
    Handle space(H5_CHECK(H5Screate(H5S_SCALAR), path_), H5Sclose);
    Handle dcpl = no_times_plist(H5P_DATASET_CREATE, path_);
    Handle ds(H5_CHECK(H5Dcreate2(parent, name.c_str(), type, space, H5P_DEFAULT, dcpl,
                                  H5P_DEFAULT), path_),
              H5Dclose);
    const char* p = value.c_str();
    H5_CHECK(H5Dwrite(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, &p), path_);
    attr(ds, kChecksumAttr, xxh64(value.data(), value.size(), 0));
  }

  template <typename T>
  void attr(hid_t obj, const char* name, T value) {
    hid_t file_type, mem_type;
    if constexpr (std::is_same_v<T, double>) {
      file_type = H5T_IEEE_F64LE;
      mem_type = H5T_NATIVE_DOUBLE;
    } else if constexpr (std::is_same_v<T, uint64_t>) {
      file_type = H5T_STD_U64LE;
      mem_type = H5T_NATIVE_UINT64;
    } else {
      static_assert(std::is_same_v<T, int64_t>);
      file_type = H5T_STD_I64LE;
      mem_type = H5T_NATIVE_INT64;
    }
    Handle space(H5_CHECK(H5Screate(H5S_SCALAR), path_), H5Sclose);
    Handle a(H5_CHECK(H5Acreate2(obj, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT), path_),
             H5Aclose);
    H5_CHECK(H5Awrite(a, mem_type, &value), path_);
  }

  void attr(hid_t obj, const char* name, const std::string& value) {
    Handle type = vlen_string_type(path_);
    Handle space(H5_CHECK(H5Screate(H5S_SCALAR), path_), H5Sclose);
    Handle a(H5_CHECK(H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT), path_),
             H5Aclose);
    const char* p = value.c_str();
    H5_CHECK(H5Awrite(a, type, &p), path_);
  }

  void attr(hid_t obj, const char* name, const std::vector<std::string>& values) {
    Handle type = vlen_string_type(path_);
    hsize_t n = values.size();
    Handle space(H5_CHECK(H5Screate_simple(1, &n, nullptr), path_), H5Sclose);
    Handle a(H5_CHECK(H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT), path_),
             H5Aclose);
    std::vector<const char*> ptrs;
    for (const std::string& s : values) ptrs.push_back(s.c_str());
    if (n > 0) H5_CHECK(H5Awrite(a, type, ptrs.data()), path_);
  }

  // The file's bytes from memory, sealed, then written atomically (temp name, fsync, rename).
  void commit() {
    H5_CHECK(H5Fflush(file_, H5F_SCOPE_GLOBAL), path_);
    // HDF5's image starts at the superblock: the user block goes in front of it.
    const ssize_t size = H5_CHECK(H5Fget_file_image(file_, nullptr, 0), path_);
    std::string image(size_t(kSealBytes + size), '\0');
    H5_CHECK(H5Fget_file_image(file_, image.data() + kSealBytes, size_t(size)), path_);
    H5_CHECK(H5Fclose(file_.release()), path_);
    seal_image(image);
    write_file_atomic(path_, image);
  }

 private:
  std::string path_;
  Handle file_;
};

void write_state_attrs(Writer& w, const TrainState& s) {
  w.attr(w.file(), "step", s.step);
  w.attr(w.file(), "tokens_seen", s.tokens_seen);
  w.attr(w.file(), "optim_step", s.optim_step);
  w.attr(w.file(), "rng_seed", s.rng_seed);
  w.attr(w.file(), "rng_offset", s.rng_offset);
  w.attr(w.file(), "loss_ema", s.loss_ema);
  w.attr(w.file(), "loss_ema_count", s.loss_ema_count);
  w.attr(w.file(), "bad_steps_in_row", s.bad_steps_in_row);
}

// ---- reading -------------------------------------------------------------------------------------

class Reader {
 public:
  explicit Reader(std::string path) : path_(std::move(path)) {
    quiet_hdf5();
    NHA_CHECK(fs::exists(path_)) << "checkpoint '" << path_ << "' does not exist. HINT: checkpoints "
                                 << "are CKPT_DIR/step_NNNNNNNN.h5; `ls` the run's checkpoints/";
    check_seal(path_, kDamagedHint);
    file_ = Handle(H5_CHECK(H5Fopen(path_.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), path_), H5Fclose);
  }
  hid_t file() const { return file_; }
  const std::string& path() const { return path_; }

  bool exists(hid_t parent, const std::string& name) const {
    return H5_CHECK(H5Lexists(parent, name.c_str(), H5P_DEFAULT), path_) > 0;
  }
  bool has_attr(hid_t obj, const char* name) const {
    return H5_CHECK(H5Aexists(obj, name), path_) > 0;
  }
  Handle group(hid_t parent, const std::string& name) const {
    NHA_CHECK(exists(parent, name)) << "'" << path_ << "' has no group '" << name
                                    << "'. HINT: is it an NHA checkpoint (docs/checkpoint.md)?";
    return Handle(H5_CHECK(H5Gopen2(parent, name.c_str(), H5P_DEFAULT), path_), H5Gclose);
  }

  std::vector<std::string> names(hid_t group) const {
    std::vector<std::string> out;
    // H5Literate / H5L_info_t: the 1.10 names (1.12+ maps them to the v2 API by default).
    H5_CHECK(H5Literate(
                 group, H5_INDEX_NAME, H5_ITER_INC, nullptr,
                 [](hid_t, const char* name, const H5L_info_t*, void* data) -> herr_t {
                   static_cast<std::vector<std::string>*>(data)->push_back(name);
                   return 0;
                 },
                 &out),
             path_);
    return out;
  }

  Shape shape(hid_t parent, const std::string& name) const {
    Handle ds(H5_CHECK(H5Dopen2(parent, name.c_str(), H5P_DEFAULT), path_), H5Dclose);
    Handle space(H5_CHECK(H5Dget_space(ds), path_), H5Sclose);
    const int rank = H5_CHECK(H5Sget_simple_extent_ndims(space), path_);
    std::vector<hsize_t> dims(static_cast<size_t>(rank));
    if (rank > 0) H5_CHECK(H5Sget_simple_extent_dims(space, dims.data(), nullptr), path_);
    return Shape(dims.begin(), dims.end());
  }

  // Dataset as an f32 CPU tensor (HDF5 converts f32/bf16/f64 file types); every value finite.
  Tensor tensor(hid_t parent, const std::string& name) const {
    Shape sh = shape(parent, name);
    Handle ds(H5_CHECK(H5Dopen2(parent, name.c_str(), H5P_DEFAULT), path_), H5Dclose);
    Handle type(H5_CHECK(H5Dget_type(ds), path_), H5Tclose);
    NHA_CHECK(H5_CHECK(H5Tget_class(type), path_) == H5T_FLOAT)
        << "'" << path_ << "': dataset '" << name << "' is not floating point. HINT: "
        << kDamagedHint;
    // A damaged shape must not turn into a huge allocation: the values must fit in the file.
    const int64_t file_bytes = int64_t(fs::file_size(path_));
    int64_t numel = 1;
    for (int64_t d : sh) {
      NHA_CHECK(d >= 0 && (d == 0 || numel <= file_bytes / d))
          << "'" << path_ << "': dataset '" << name << "' has shape " << shape_str(sh)
          << ", more values than the file holds. HINT: " << kDamagedHint;
      numel *= d;
    }
    // The stored bytes first (the file type as memory type: no conversion) for the checksum,
    // then HDF5's conversion to float32 in place (exact for f32 and bf16).
    const size_t stored_size = H5Tget_size(type);  // 0 on failure (unsigned: not for H5_CHECK)
    NHA_CHECK(stored_size > 0) << "'" << path_ << "': dataset '" << name
                               << "' has no valid type size. HINT: " << kDamagedHint;
    std::vector<unsigned char> raw(size_t(numel) * std::max(stored_size, sizeof(float)));
    if (numel > 0) H5_CHECK(H5Dread(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, raw.data()), path_);
    verify(ds, raw.data(), size_t(numel) * stored_size);
    if (numel > 0)
      H5_CHECK(H5Tconvert(type, H5T_NATIVE_FLOAT, size_t(numel), raw.data(), nullptr, H5P_DEFAULT),
               path_);
    std::vector<float> values(static_cast<size_t>(numel));
    std::memcpy(values.data(), raw.data(), values.size() * sizeof(float));
    const auto bad = std::find_if(values.begin(), values.end(), [](float v) { return !std::isfinite(v); });
    NHA_CHECK(bad == values.end())
        << "'" << path_ << "': dataset '" << name << "' holds " << *bad << " at index "
        << bad - values.begin() << " (training never stores a non-finite value). HINT: "
        << kDamagedHint;
    return Tensor::from_vector(values, sh);
  }

  std::string string_dataset(hid_t parent, const std::string& name) const {
    NHA_CHECK(exists(parent, name)) << "'" << path_ << "' has no dataset '" << name
                                    << "'. HINT: is it an NHA checkpoint (docs/checkpoint.md)?";
    Handle ds(H5_CHECK(H5Dopen2(parent, name.c_str(), H5P_DEFAULT), path_), H5Dclose);
    Handle type = vlen_string_type(path_);
    char* p = nullptr;
    H5_CHECK(H5Dread(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, &p), path_);
    std::string s = p ? p : "";
    if (p) H5free_memory(p);
    verify(ds, s.data(), s.size());
    return s;
  }

  // Checks the dataset's kChecksumAttr against its stored bytes (files written before per-dataset
  // checksums have none).
  void verify(hid_t ds, const void* bytes, size_t n) const {
    if (!has_attr(ds, kChecksumAttr)) return;
    char name[512] = {};
    H5_CHECK(H5Iget_name(ds, name, sizeof(name)), path_);  // the full path, e.g. /optim/v/...
    check_dataset_checksum(path_, name, attr<uint64_t>(ds, kChecksumAttr), bytes, n, kDamagedHint);
  }

  std::vector<std::string> str_list_attr(hid_t obj, const char* name) const {
    Handle a(H5_CHECK(H5Aopen(obj, name, H5P_DEFAULT), path_), H5Aclose);
    Handle space(H5_CHECK(H5Aget_space(a), path_), H5Sclose);
    const hssize_t n = H5_CHECK(H5Sget_simple_extent_npoints(space), path_);
    std::vector<char*> ptrs(size_t(std::max<hssize_t>(n, 0)), nullptr);
    Handle type = vlen_string_type(path_);
    if (n > 0) H5_CHECK(H5Aread(a, type, ptrs.data()), path_);
    std::vector<std::string> out;
    for (char* p : ptrs) {
      out.emplace_back(p ? p : "");
      if (p) H5free_memory(p);
    }
    return out;
  }

  template <typename T>
  T attr(hid_t obj, const char* name) const {
    NHA_CHECK(has_attr(obj, name)) << "'" << path_ << "' lacks the attribute '" << name
                                   << "'. HINT: is it an NHA checkpoint (docs/checkpoint.md)?";
    Handle a(H5_CHECK(H5Aopen(obj, name, H5P_DEFAULT), path_), H5Aclose);
    T value{};
    if constexpr (std::is_same_v<T, std::string>) {
      Handle type = vlen_string_type(path_);
      char* p = nullptr;
      H5_CHECK(H5Aread(a, type, &p), path_);
      value = p ? p : "";
      if (p) H5free_memory(p);
    } else if constexpr (std::is_same_v<T, double>) {
      H5_CHECK(H5Aread(a, H5T_NATIVE_DOUBLE, &value), path_);
    } else if constexpr (std::is_same_v<T, uint64_t>) {
      H5_CHECK(H5Aread(a, H5T_NATIVE_UINT64, &value), path_);
    } else {
      static_assert(std::is_same_v<T, int64_t>);
      H5_CHECK(H5Aread(a, H5T_NATIVE_INT64, &value), path_);
    }
    return value;
  }

 private:
  std::string path_;
  Handle file_;
};

// Counters a resume trusts (a negative step would give a negative LR and drop metrics records).
void check_state(const TrainState& s, const std::string& path) {
  auto fail_unless = [&](bool ok, const char* what, double v) {
    NHA_CHECK(ok) << "'" << path << "': attribute " << what << " = " << v
                  << " is out of range. HINT: " << kDamagedHint;
  };
  fail_unless(s.step >= 0, "step", double(s.step));
  fail_unless(s.tokens_seen >= 0, "tokens_seen", double(s.tokens_seen));
  fail_unless(s.optim_step >= 0 && s.optim_step <= s.step, "optim_step (<= step)",
              double(s.optim_step));
  fail_unless(std::isfinite(s.loss_ema) && s.loss_ema >= 0, "loss_ema", s.loss_ema);
  fail_unless(s.loss_ema_count >= 0 && s.loss_ema_count <= s.step, "loss_ema_count",
              double(s.loss_ema_count));
  fail_unless(s.bad_steps_in_row >= 0 && s.bad_steps_in_row <= s.step, "bad_steps_in_row",
              double(s.bad_steps_in_row));
}

// strict: a training checkpoint is required (resume); otherwise an export file gives its step,
// tokens_seen and config (the rest stays zero/empty).
TrainState read_state(const Reader& r, bool strict) {
  const std::string format = r.attr<std::string>(r.file(), "format");
  if (!strict && format == kExportFormat) {
    TrainState s;
    s.step = r.attr<int64_t>(r.file(), "step");
    s.tokens_seen = r.attr<int64_t>(r.file(), "tokens_seen");
    s.config_yaml = r.string_dataset(r.file(), "config");
    return s;
  }
  NHA_CHECK(format == kCheckpointFormat)
      << "'" << r.path() << "' has format '" << format << "', not a training checkpoint ("
      << kCheckpointFormat << "). HINT: export files (`nha export`) hold parameters only and "
      << "cannot resume a run";
  TrainState s;
  s.step = r.attr<int64_t>(r.file(), "step");
  s.tokens_seen = r.attr<int64_t>(r.file(), "tokens_seen");
  s.optim_step = r.attr<int64_t>(r.file(), "optim_step");
  s.rng_seed = r.attr<uint64_t>(r.file(), "rng_seed");
  s.rng_offset = r.attr<uint64_t>(r.file(), "rng_offset");
  s.loss_ema = r.attr<double>(r.file(), "loss_ema");
  s.loss_ema_count = r.attr<int64_t>(r.file(), "loss_ema_count");
  s.bad_steps_in_row = r.attr<int64_t>(r.file(), "bad_steps_in_row");
  s.loader_state = r.string_dataset(r.file(), "loader_state");
  s.config_yaml = r.string_dataset(r.file(), "config");
  check_state(s, r.path());
  return s;
}

// Copies `src` (f32 CPU) into `dst` (any device/dtype) after checking the shape.
void copy_into(Tensor& dst, const Tensor& src, const std::string& what, const std::string& path) {
  NHA_CHECK(dst.shape() == src.shape())
      << "'" << path << "': " << what << " has shape " << shape_str(src.shape())
      << " but the model's is " << shape_str(dst.shape())
      << ". HINT: the checkpoint was written by a model of another shape; compare model.* in its "
         "/config with your config";
  autograd::NoGradGuard no_grad;
  dst.copy_(src);
}

}  // namespace

// ---- public API ----------------------------------------------------------------------------------

void set_checkpoint_failure_for_testing(int64_t fail_after_datasets) {
  g_fail_after = fail_after_datasets;
}

void save_checkpoint(const std::string& path, const std::vector<NamedParameter>& params,
                     const AdamW* opt, const TrainState& state) {
  Writer w(path);
  w.attr(w.file(), "format", std::string(kCheckpointFormat));
  write_state_attrs(w, state);
  {
    Handle g = w.group(w.file(), "params");
    std::vector<std::string> names;
    for (const NamedParameter& p : params) {
      w.tensor(g, p.name, p.tensor, DType::F32);
      names.push_back(p.name);
    }
    w.attr(g, "names", names);  // registration order (the group itself lists names sorted)
  }
  if (opt) {
    Handle g = w.group(w.file(), "optim");
    w.attr(g, "step", opt->step_count());
    w.attr(g, "lr", opt->options().lr);
    w.attr(g, "beta1", opt->options().beta1);
    w.attr(g, "beta2", opt->options().beta2);
    w.attr(g, "eps", opt->options().eps);
    w.attr(g, "weight_decay", opt->options().weight_decay);
    Handle gm = w.group(g, "m");
    Handle gv = w.group(g, "v");
    std::vector<std::string> decayed;
    for (size_t i = 0; i < opt->params().size(); ++i) {
      const ParamEntry& e = opt->params()[i];
      w.tensor(gm, e.name, opt->m(i), DType::F32);
      w.tensor(gv, e.name, opt->v(i), DType::F32);
      if (e.decay) decayed.push_back(e.name);
    }
    w.attr(g, "decayed", decayed);
  }
  w.string_dataset(w.file(), "config", state.config_yaml);
  w.string_dataset(w.file(), "loader_state", state.loader_state);
  w.commit();
}

TrainState read_train_state(const std::string& path) {
  Reader r(path);
  return read_state(r, false);
}

TrainState load_checkpoint(const std::string& path, const std::vector<NamedParameter>& params,
                           AdamW* opt) {
  Reader r(path);
  TrainState s = read_state(r, true);
  Handle g = r.group(r.file(), "params");
  std::vector<std::string> stored = r.names(g);
  std::set<std::string> stored_set(stored.begin(), stored.end()), model_set;
  std::string missing, extra;
  for (const NamedParameter& p : params) {
    model_set.insert(p.name);
    if (!stored_set.count(p.name)) missing += " " + p.name;
  }
  for (const std::string& n : stored)
    if (!model_set.count(n)) extra += " " + n;
  NHA_CHECK(missing.empty() && extra.empty())
      << "'" << path << "' does not match the model: missing parameters:" << (missing.empty() ? " none" : missing)
      << "; unexpected parameters:" << (extra.empty() ? " none" : extra)
      << ". HINT: resume with the config the run was started with (its /config dataset)";
  for (const NamedParameter& p : params) {
    Tensor dst = p.tensor;
    copy_into(dst, r.tensor(g, p.name), "parameter '" + p.name + "'", path);
  }
  if (opt) {
    NHA_CHECK(r.exists(r.file(), "optim"))
        << "'" << path << "' has no optimizer state. HINT: resume from a training checkpoint";
    Handle go = r.group(r.file(), "optim");
    Handle gm = r.group(go, "m");
    Handle gv = r.group(go, "v");
    for (size_t i = 0; i < opt->params().size(); ++i) {
      const std::string& name = opt->params()[i].name;
      NHA_CHECK(r.exists(gm, name) && r.exists(gv, name))
          << "'" << path << "' has no optimizer state for '" << name << "'";
      copy_into(opt->m(i), r.tensor(gm, name), "optim/m/" + name, path);
      const Tensor v = r.tensor(gv, name);
      // A negative second moment would make sqrt(v) NaN in the next update.
      const std::vector<float> vs = v.to_vector<float>();
      NHA_CHECK(std::none_of(vs.begin(), vs.end(), [](float x) { return x < 0; }))
          << "'" << path << "': optim/v/" << name << " holds a negative value. HINT: "
          << kDamagedHint;
      copy_into(opt->v(i), v, "optim/v/" + name, path);
    }
    opt->set_step_count(s.optim_step);
  }
  return s;
}

std::map<std::string, Tensor> read_parameters(const std::string& path) {
  Reader r(path);
  Handle g = r.group(r.file(), "params");
  std::map<std::string, Tensor> out;
  for (const std::string& n : r.names(g)) out[n] = r.tensor(g, n);
  return out;
}

std::string read_config_yaml(const std::string& path) {
  Reader r(path);
  return r.string_dataset(r.file(), "config");
}

void load_parameters_into(const std::string& path, const std::vector<NamedParameter>& params) {
  const std::map<std::string, Tensor> saved = read_parameters(path);
  autograd::NoGradGuard no_grad;
  for (const NamedParameter& p : params) {
    auto it = saved.find(p.name);
    NHA_CHECK(it != saved.end()) << path << " lacks parameter '" << p.name
                                 << "'. HINT: the file and its config disagree; re-export it";
    NHA_CHECK(it->second.shape() == p.tensor.shape())
        << path << ": parameter '" << p.name << "' is " << it->second.str()
        << " but the model expects " << p.tensor.str();
    Tensor dst = p.tensor;
    dst.copy_(it->second);
  }
}

void export_parameters(const std::string& checkpoint_path, const std::string& out_path,
                       DType dtype) {
  NHA_CHECK(dtype == DType::F32 || dtype == DType::BF16)
      << "export dtype must be fp32 or bf16, got " << dtype_name(dtype);
  std::error_code ec;
  NHA_CHECK(!fs::equivalent(checkpoint_path, out_path, ec))
      << "the export file '" << out_path << "' is the checkpoint being exported ('"
      << checkpoint_path << "'): it would be replaced. HINT: choose another --out, e.g. model.h5";
  std::vector<NamedParameter> params;
  std::vector<std::string> order;
  std::string config;
  int64_t step = 0, tokens = 0;
  {
    Reader r(checkpoint_path);
    Handle g = r.group(r.file(), "params");
    order = r.has_attr(g, "names") ? r.str_list_attr(g, "names") : r.names(g);
    for (const std::string& n : order) params.push_back({n, r.tensor(g, n), ParamKind::Weight});
    config = r.string_dataset(r.file(), "config");
    if (r.has_attr(r.file(), "step")) step = r.attr<int64_t>(r.file(), "step");
    if (r.has_attr(r.file(), "tokens_seen")) tokens = r.attr<int64_t>(r.file(), "tokens_seen");
  }
  write_parameters(out_path, params, config, dtype, step, tokens);
}

void write_parameters(const std::string& out_path, const std::vector<NamedParameter>& params,
                      const std::string& config_yaml, DType dtype, int64_t step,
                      int64_t tokens_seen) {
  NHA_CHECK(dtype == DType::F32 || dtype == DType::BF16)
      << "export dtype must be fp32 or bf16, got " << dtype_name(dtype);
  Writer w(out_path);
  w.attr(w.file(), "format", std::string(kExportFormat));
  w.attr(w.file(), "dtype", std::string(dtype == DType::BF16 ? "bf16" : "fp32"));
  w.attr(w.file(), "step", step);
  w.attr(w.file(), "tokens_seen", tokens_seen);
  {
    Handle g = w.group(w.file(), "params");
    for (const NamedParameter& p : params) w.tensor(g, p.name, p.tensor, dtype);
  }
  w.string_dataset(w.file(), "config", config_yaml);
  w.commit();
}

std::string checkpoint_path(const std::string& dir, int64_t step) {
  char name[64];
  std::snprintf(name, sizeof(name), "step_%08lld.h5", (long long)step);
  return (fs::path(dir) / name).string();
}

std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& dir) {
  std::vector<std::pair<int64_t, std::string>> out;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return out;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (name.size() < 9 || name.rfind("step_", 0) != 0 || name.substr(name.size() - 3) != ".h5")
      continue;
    const std::string digits = name.substr(5, name.size() - 8);
    int64_t step = -1;
    const auto [end, err] = std::from_chars(digits.data(), digits.data() + digits.size(), step);
    // Not ours (we never write a step beyond int64): ignored like any other foreign file.
    if (digits.empty() || err != std::errc() || end != digits.data() + digits.size()) continue;
    out.emplace_back(step, entry.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::string> remove_stale_temp_files(const std::string& dir) {
  std::vector<std::string> removed;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return removed;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    const size_t tmp = name.find(".h5.tmp.");
    if (name.rfind("step_", 0) != 0 || tmp == std::string::npos) continue;
    long pid = 0;
    const char* first = name.c_str() + tmp + 8;
    const auto [end, err] = std::from_chars(first, name.c_str() + name.size(), pid);
    if (err != std::errc() || *end != '\0' || pid <= 0) continue;
    // kill(pid, 0) probes without signalling: ESRCH = no such process, so nobody writes it.
    if (::kill(pid_t(pid), 0) == 0 || errno != ESRCH) continue;
    if (fs::remove(entry.path(), ec)) removed.push_back(entry.path().string());
  }
  return removed;
}

std::string latest_checkpoint(const std::string& dir) {
  auto all = list_checkpoints(dir);
  return all.empty() ? std::string() : all.back().second;
}

std::string resolve_checkpoint(const std::string& run_or_ckpt) {
  NHA_CHECK(fs::exists(run_or_ckpt)) << "'" << run_or_ckpt << "' does not exist. HINT: pass a run "
                                     << "directory (runs/NAME) or a checkpoint file (.h5)";
  if (fs::is_regular_file(run_or_ckpt)) return run_or_ckpt;
  std::string latest = latest_checkpoint(run_or_ckpt);
  if (latest.empty()) latest = latest_checkpoint((fs::path(run_or_ckpt) / "checkpoints").string());
  NHA_CHECK(!latest.empty()) << "no checkpoint (step_*.h5) in '" << run_or_ckpt << "' or '"
                             << (fs::path(run_or_ckpt) / "checkpoints").string()
                             << "'. HINT: a run writes checkpoints every checkpoint.interval steps "
                             << "and at the end";
  return latest;
}

std::vector<std::string> prune_checkpoints(const std::string& dir, int64_t keep_last) {
  auto all = list_checkpoints(dir);
  std::vector<std::string> removed;
  for (size_t i = 0; i + size_t(std::max<int64_t>(keep_last, 1)) < all.size(); ++i) {
    fs::remove(all[i].second);
    removed.push_back(all[i].second);
  }
  return removed;
}

}  // namespace nha
