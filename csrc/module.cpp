// The only pybind11 file: turns Python buffers (CPU) or raw pointers (CUDA) into View2D,
// checks them, releases the GIL and calls the kernels in cpu/ and cuda/.
// Conventions: every operand arrives 2-D with an inner stride of one element (Python collapses
// tensors to that form); bf16 arrives as int16 words, since numpy has no bf16.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <functional>
#include <memory>
#include <optional>
#include <tuple>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/parallel.h"
#include "cpu/adapters.h"
#include "cpu/merging.h"
#include "cpu/ot.h"
#include "cpu/safetensors_header.h"
#include "cpu/topk.h"
#include "cpu/transferability.h"
#ifdef TRANSFEROPS_WITH_CUDA
#include "cuda/merging.h"
#endif

namespace py = pybind11;
using namespace transferops;

namespace {

DType dtype_of_format(std::string fmt, const std::string& what) {
  if (!fmt.empty() && (fmt[0] == '<' || fmt[0] == '=' || fmt[0] == '@')) fmt.erase(0, 1);
  if (fmt == "f") return DType::f32;
  if (fmt == "d") return DType::f64;
  if (fmt == "e") return DType::f16;
  if (fmt == "h" || fmt == "H") return DType::bf16;
  throw std::invalid_argument(what + ": unsupported buffer format '" + fmt +
                              "' (expected float32, float64, float16, or bfloat16 as int16)");
}

// Keeps the buffer_info (and so the exporter's memory) alive while the view is in use.
struct BufferView {
  py::buffer_info info;
  View2D view;
};

BufferView buffer_view(const py::buffer& b, const std::string& what, bool writable) {
  BufferView bv{b.request(writable), {}};
  const auto& info = bv.info;
  if (info.ndim != 2) {
    throw std::invalid_argument(what + ": expected a 2-D buffer, got " + std::to_string(info.ndim) + "-D");
  }
  View2D& v = bv.view;
  v.dtype = dtype_of_format(info.format, what);
  v.data = info.ptr;
  v.rows = info.shape[0];
  v.cols = info.shape[1];
  if (v.cols > 1 && info.strides[1] != info.itemsize) {
    throw std::invalid_argument(what + ": inner stride must be one element");
  }
  if (info.strides[0] % info.itemsize != 0) {
    throw std::invalid_argument(what + ": row stride is not a whole number of elements");
  }
  v.row_stride = info.strides[0] / info.itemsize;
  return bv;
}

void check_same_layout(const View2D& a, const View2D& b, const std::string& what) {
  if (a.rows != b.rows || a.cols != b.cols || a.dtype != b.dtype) {
    throw std::invalid_argument(what + ": expected [" + std::to_string(b.rows) + ", " +
                                std::to_string(b.cols) + "] " + dtype_name(b.dtype) + ", got [" +
                                std::to_string(a.rows) + ", " + std::to_string(a.cols) + "] " +
                                dtype_name(a.dtype));
  }
}

const double* weights_ptr(const std::optional<std::vector<double>>& w, size_t T) {
  if (!w) return nullptr;
  if (w->size() != T) {
    throw std::invalid_argument("weights: expected " + std::to_string(T) + " values, got " +
                                std::to_string(w->size()));
  }
  return w->data();
}

// Buffers -> views, with the shape/dtype of each checked against `like` (or the first).
std::vector<View2D> views_of(const std::vector<py::buffer>& bufs, const std::string& what,
                             std::vector<BufferView>& keep, const View2D* like) {
  if (bufs.empty()) throw std::invalid_argument(what + ": expected at least one buffer");
  keep.reserve(bufs.size());
  std::vector<View2D> views;
  for (size_t i = 0; i < bufs.size(); ++i) {
    const std::string name = what + "[" + std::to_string(i) + "]";
    keep.push_back(buffer_view(bufs[i], name, false));
    if (like) check_same_layout(keep.back().view, *like, name);
    else if (keep.back().view.dtype != keep.front().view.dtype) {
      throw std::invalid_argument(name + ": dtype differs from " + what + "[0]");
    }
    views.push_back(keep.back().view);
  }
  return views;
}

using TrimArgs = std::optional<std::vector<std::tuple<double, double, int64_t, double, double, int64_t>>>;
// (seed, stream, keep_below per task, rescale per task, index offset)
using DareArgs = std::optional<std::tuple<uint64_t, uint32_t, std::vector<uint64_t>, std::vector<double>, int64_t>>;

std::vector<cpu::Trim> trims_of(const TrimArgs& trims, size_t T) {
  std::vector<cpu::Trim> tr;
  if (trims) {
    if (trims->size() != T) throw std::invalid_argument("trims: expected " + std::to_string(T) + " entries");
    for (const auto& [lo, hi, cut, dlo, dhi, dcut] : *trims) tr.push_back(cpu::Trim{lo, hi, cut, dlo, dhi, dcut});
  }
  return tr;
}

// The cpu::Dare of `dare` (its arrays point into `dare`), or nothing.
std::optional<cpu::Dare> dare_of(const DareArgs& dare, size_t T) {
  if (!dare) return std::nullopt;
  const auto& [seed, stream, keep_below, rescale, offset] = *dare;
  if (keep_below.size() != T || rescale.size() != T) {
    throw std::invalid_argument("dare: expected keep_below and rescale for each of " + std::to_string(T) + " tasks");
  }
  for (const uint64_t k : keep_below) {
    if (k > (uint64_t(1) << 32)) throw std::invalid_argument("dare: keep_below exceeds 2^32");
  }
  return cpu::Dare{seed, stream, keep_below.data(), rescale.data(), offset};
}

// With `base`, `tvs` are models theta_t (see cpu::merge). `out` None: a counting pass. `normalize`
// None: elections divide, sums do not (see cpu::MergeSpec).
std::tuple<int64_t, int64_t> merge(
    const std::vector<py::buffer>& tvs, const std::optional<py::buffer>& base, const std::optional<py::buffer>& out,
    const std::optional<std::vector<double>>& weights, const TrimArgs& trims, const DareArgs& dare, bool elect,
    int rule, bool weight_before_election, int zero_sign, double lam, const std::optional<std::vector<double>>& scales,
    std::optional<bool> normalize) {
  if (rule != 0 && rule != 1) throw std::invalid_argument("rule: expected 0 (sum) or 1 (count)");
  if (zero_sign != 1 && zero_sign != -1) throw std::invalid_argument("zero_sign: expected 1 or -1");
  std::vector<BufferView> keep;
  const std::vector<View2D> views = views_of(tvs, "task_vectors", keep, nullptr);
  std::optional<BufferView> o, b;
  View2D out_view = views[0];
  out_view.data = nullptr;
  if (out) {
    o = buffer_view(*out, "out", true);
    check_same_layout(o->view, views[0], "out");
    out_view = o->view;
  }
  if (base) {
    b = buffer_view(*base, "base", false);
    check_same_layout(b->view, views[0], "base");
  }
  const double* w = weights_ptr(weights, tvs.size());
  const double* sc = scales ? weights_ptr(scales, tvs.size()) : nullptr;
  const std::vector<cpu::Trim> tr = trims_of(trims, tvs.size());
  const std::optional<cpu::Dare> dr = dare_of(dare, tvs.size());
  const cpu::MergeSpec spec{elect, static_cast<cpu::SignRule>(rule), weight_before_election, normalize.value_or(elect),
                            zero_sign, lam};
  py::gil_scoped_release release;
  const cpu::MergeResult r = cpu::merge(views, b ? &b->view : nullptr, out_view, w, sc, trims ? tr.data() : nullptr,
                                        dr ? &*dr : nullptr, spec);
  return {r.nonfinite, r.sign_sum};
}

// cpu::kept_l1 into a new float64 array [blocks, T, 2].
py::array_t<double> kept_l1(const std::vector<py::buffer>& tvs, const std::optional<py::buffer>& base,
                            const TrimArgs& trims, const DareArgs& dare, int64_t offset) {
  if (offset < 0) throw std::invalid_argument("offset: expected a flat index >= 0");
  std::vector<BufferView> keep;
  const std::vector<View2D> views = views_of(tvs, "task_vectors", keep, nullptr);
  std::optional<BufferView> b;
  if (base) {
    b = buffer_view(*base, "base", false);
    check_same_layout(b->view, views[0], "base");
  }
  const std::vector<cpu::Trim> tr = trims_of(trims, tvs.size());
  const std::optional<cpu::Dare> dr = dare_of(dare, tvs.size());
  const int64_t T = int64_t(tvs.size());
  py::array_t<double> partials({cpu::l1_blocks(offset, views[0].rows * views[0].cols), T, int64_t(2)});
  double* p = partials.mutable_data();
  py::gil_scoped_release release;
  cpu::kept_l1(views, b ? &b->view : nullptr, trims ? tr.data() : nullptr, dr ? &*dr : nullptr, offset, p);
  return partials;
}

std::tuple<int64_t, int64_t> fisher_average(const std::vector<py::buffer>& models, const std::vector<py::buffer>& fishers,
                                            const py::buffer& out, const std::optional<std::vector<double>>& weights,
                                            double eps) {
  BufferView o = buffer_view(out, "out", true);
  std::vector<BufferView> keep_m, keep_f;
  const std::vector<View2D> mv = views_of(models, "models", keep_m, &o.view);
  const std::vector<View2D> fv = views_of(fishers, "fishers", keep_f, &o.view);
  const double* w = weights_ptr(weights, models.size());
  py::gil_scoped_release release;
  const cpu::FisherResult r = cpu::fisher_average(mv, fv, o.view, w, eps);
  return {r.nonfinite, r.negative};
}

// The select steps' operands: tasks of one layout, and a base of the same layout or none.
struct SelectViews {
  std::vector<BufferView> keep;
  std::vector<View2D> views;
  std::optional<BufferView> base;
  SelectViews(const std::vector<py::buffer>& tasks, const std::optional<py::buffer>& b) {
    views = views_of(tasks, "tasks", keep, nullptr);
    for (size_t i = 1; i < views.size(); ++i) check_same_layout(views[i], views[0], "tasks[" + std::to_string(i) + "]");
    if (b) {
      base = buffer_view(*b, "base", false);
      check_same_layout(base->view, views[0], "base");
    }
  }
  const View2D* base_view() const { return base ? &base->view : nullptr; }
};

template <class T>
py::array_t<T> to_array(const std::vector<T>& v) {
  py::array_t<T> out(py::ssize_t(v.size()));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

template <class T>
py::array_t<T> concatenated(const std::vector<std::vector<T>>& parts) {
  size_t n = 0;
  for (const auto& p : parts) n += p.size();
  py::array_t<T> out{py::ssize_t(n)};
  T* at = out.mutable_data();
  for (const auto& p : parts) at = std::copy(p.begin(), p.end(), at);
  return out;
}

py::array_t<uint64_t> abs_sample_keys(const std::vector<py::buffer>& tasks, const std::optional<py::buffer>& base,
                                      int64_t runs, uint64_t seed) {
  const SelectViews s(tasks, base);
  // Written in place: a second buffer of this size would cost as much in page faults as the sampling.
  py::array_t<uint64_t> keys({py::ssize_t(s.views.size()), py::ssize_t(std::max<int64_t>(runs, 0)), py::ssize_t(cpu::kSampleRun)});
  uint64_t* out = keys.mutable_data();
  {
    py::gil_scoped_release release;
    cpu::abs_sample_keys(s.views, s.base_view(), runs, seed, out);
  }
  return keys;
}

uint64_t abs_order_statistic(const py::array_t<uint64_t, py::array::c_style | py::array::forcecast>& keys, int64_t i) {
  if (keys.ndim() != 1) throw std::invalid_argument("abs_order_statistic: keys: expected a 1-D array");
  py::gil_scoped_release release;
  return cpu::abs_order_statistic(keys.data(), keys.shape(0), i);
}

py::list thresholds_list(const std::vector<cpu::Threshold>& found) {
  py::list out;
  for (const auto& t : found) out.append(py::make_tuple(t.lo, t.hi, t.cut));
  return out;
}

// See cpu::abs_topk: per task (lo, hi, cut).
py::list abs_topk(const std::vector<py::buffer>& tasks, const std::optional<py::buffer>& base, int64_t k,
                  bool keep_ties) {
  const SelectViews s(tasks, base);
  std::vector<cpu::Threshold> found;
  {
    py::gil_scoped_release release;
    found = cpu::abs_topk(s.views, s.base_view(), k, keep_ties);
  }
  return thresholds_list(found);
}

std::unique_ptr<cpu::TopkSelect> topk_select(int64_t k, int64_t numel, int tasks, int64_t chunk, bool keep_ties,
                                             bool bracket, const std::optional<int64_t>& max_kept, bool blind_sample) {
  cpu::SelectOptions options;
  options.bracket = bracket;
  if (max_kept) options.max_kept = *max_kept;
  options.blind_sample = blind_sample;
  return std::make_unique<cpu::TopkSelect>(k, numel, tasks, chunk, keep_ties, options);
}

bool topk_feed(cpu::TopkSelect& select, const std::vector<py::buffer>& tasks, const std::optional<py::buffer>& base) {
  const SelectViews s(tasks, base);
  py::gil_scoped_release release;
  return select.feed(s.views, s.base_view());
}

// Per task (lo, hi, marks, expected) from a sample's keys [T, runs, run length].
py::list abs_sample_brackets(const py::array_t<uint64_t, py::array::c_style | py::array::forcecast>& keys, double q,
                             int64_t numel, int nbits, int max_marks) {
  if (keys.ndim() != 3 || keys.shape(2) != cpu::kSampleRun) {
    throw std::invalid_argument("abs_sample_brackets: keys: expected [tasks, runs, " + std::to_string(cpu::kSampleRun) +
                                "] uint64");
  }
  std::vector<cpu::SampleBracket> found;
  {
    py::gil_scoped_release release;
    found = cpu::abs_sample_brackets(keys.data(), keys.shape(0), keys.shape(1), q, numel, nbits, max_marks);
  }
  py::list out;
  for (const auto& b : found) out.append(py::make_tuple(b.lo, b.hi, b.marks, b.expected));
  return out;
}

// Per task (above, inside, keys, positions, counts): arrays, empty where the mode keeps none.
py::list abs_bracket(const std::vector<py::buffer>& tasks, const std::optional<py::buffer>& base,
                     const std::vector<uint64_t>& lo, const std::vector<uint64_t>& hi,
                     const std::vector<std::vector<uint64_t>>& marks,
                     int64_t capacity) {
  const SelectViews s(tasks, base);
  cpu::BracketResult r;
  {
    py::gil_scoped_release release;
    r = cpu::abs_bracket(s.views, s.base_view(), lo, hi, marks, capacity);
  }
  py::list out;
  for (size_t t = 0; t < s.views.size(); ++t) {
    py::array_t<uint32_t> counts = to_array(r.counts[t]);
    const py::ssize_t bins = py::ssize_t(2 * marks[t].size()) - 1;
    if (bins > 0) counts = counts.reshape({py::ssize_t(r.counts[t].size()) / bins, bins});
    out.append(py::make_tuple(r.above[t], r.inside[t], concatenated(r.keys[t]), concatenated(r.positions[t]), counts));
  }
  return out;
}

// The C function behind capsules[name] (scipy's cython_lapack / cython_blas exports).
void* capsule_pointer(const py::dict& capsules, const char* name, const char* what) {
  if (!capsules.contains(name)) throw std::invalid_argument(std::string(what) + ": missing " + name);
  PyObject* cap = py::object(capsules[name]).ptr();
  void* ptr = PyCapsule_GetPointer(cap, PyCapsule_GetName(cap));
  if (!ptr) throw py::error_already_set();
  return ptr;
}

Gemm gemm_of(const py::dict& blas) {
  Gemm gemm{};
  gemm.sgemm = reinterpret_cast<decltype(gemm.sgemm)>(capsule_pointer(blas, "sgemm", "blas"));
  gemm.dgemm = reinterpret_cast<decltype(gemm.dgemm)>(capsule_pointer(blas, "dgemm", "blas"));
  return gemm;
}

cpu::Lapack lapack_of(const py::dict& capsules) {
  cpu::Lapack l{};
  l.sytrd = reinterpret_cast<decltype(l.sytrd)>(capsule_pointer(capsules, "dsytrd", "lapack"));
  l.sterf = reinterpret_cast<decltype(l.sterf)>(capsule_pointer(capsules, "dsterf", "lapack"));
  l.ormqr = reinterpret_cast<decltype(l.ormqr)>(capsule_pointer(capsules, "dormqr", "lapack"));
  return l;
}

// A writable, column-major float64 matrix with `rows` rows (in-place LAPACK operand).
double* fortran_matrix(const py::array& a, int64_t rows, const std::string& what) {
  if (a.ndim() != 2 || !py::isinstance<py::array_t<double>>(a) || !(a.flags() & py::array::f_style) ||
      !a.writeable() || a.shape(0) != rows) {
    throw std::invalid_argument(what + ": expected a writable column-major float64 matrix with " +
                                std::to_string(rows) + " rows");
  }
  return static_cast<double*>(const_cast<void*>(a.data()));
}

// See cpu::tridiagonalize: grams[i] (n_i x n_i) and projected[i] (n_i x K_i) change in place;
// returns (diag, off, tau, sigma) per problem.
py::list tridiagonalize(const py::dict& lapack, const std::vector<py::array>& grams,
                        const std::vector<py::array>& projected, bool across_models) {
  if (grams.size() != projected.size()) throw std::invalid_argument("projected: expected one matrix per Gram matrix");
  const cpu::Lapack l = lapack_of(lapack);
  std::vector<cpu::Tridiagonal> problems;
  py::list out;
  for (size_t i = 0; i < grams.size(); ++i) {
    const int64_t n = grams[i].ndim() == 2 ? grams[i].shape(0) : -1;
    const std::string at = "[" + std::to_string(i) + "]";
    double* g = fortran_matrix(grams[i], n, "grams" + at);
    if (n < 1 || grams[i].shape(1) != n) throw std::invalid_argument("grams" + at + ": expected a square matrix");
    double* c = fortran_matrix(projected[i], n, "projected" + at);
    py::array_t<double> diag(n), off(std::max<int64_t>(n - 1, 0)), tau(std::max<int64_t>(n - 1, 0)), sigma(n);
    problems.push_back({g, n, c, projected[i].shape(1), diag.mutable_data(), off.mutable_data(), tau.mutable_data(),
                        sigma.mutable_data()});
    out.append(py::make_tuple(diag, off, tau, sigma));
  }
  {
    py::gil_scoped_release release;
    cpu::tridiagonalize(l, problems, across_models);
  }
  return out;
}

// See cpu::apply_q: X (n x K, column-major) <- Q X or Q^T X in place.
void tridiagonal_apply_q(const py::dict& lapack, const py::array& gram, const py::array_t<double>& tau,
                         const py::array& X, bool transpose) {
  const int64_t n = gram.ndim() == 2 ? gram.shape(0) : -1;
  cpu::Tridiagonal p{fortran_matrix(gram, n, "gram"), n, nullptr, 0, nullptr, nullptr,
                     const_cast<double*>(tau.data()), nullptr};
  if (tau.size() != std::max<int64_t>(n - 1, 0)) throw std::invalid_argument("tau: expected n - 1 values");
  double* x = fortran_matrix(X, n, "X");
  const cpu::Lapack l = lapack_of(lapack);
  py::gil_scoped_release release;
  cpu::apply_q(l, p, x, X.shape(1), transpose);
}

// See cpu::sinkhorn_matrix: f and g are read as the start and written back. Returns (n_iter,
// error, transport_cost, ot_eps), one each per problem.
py::tuple sinkhorn_matrix(const py::buffer& C, int64_t N, const py::buffer& a, const py::buffer& b, const py::buffer& f,
                          const py::buffer& g, double eps, double lam, double rho, double tol, int64_t memory,
                          int64_t max_iter, int64_t check_every, bool symmetric, const std::vector<double>& schedule) {
  const BufferView c = buffer_view(C, "C", false), av = buffer_view(a, "a", false), bv = buffer_view(b, "b", false);
  BufferView fv = buffer_view(f, "f", true), gv = buffer_view(g, "g", true);
  py::array_t<int64_t> n_iter(av.view.rows);
  py::array_t<double> error(av.view.rows), transport(av.view.rows), value(av.view.rows);
  const cpu::SinkhornSettings s{eps, lam, rho, tol, memory, max_iter, check_every, symmetric, schedule.data(),
                                static_cast<int64_t>(schedule.size())};
  int64_t* it = n_iter.mutable_data();
  double *err = error.mutable_data(), *cost = transport.mutable_data(), *val = value.mutable_data();
  {
    py::gil_scoped_release release;
    cpu::sinkhorn_matrix(c.view, N, av.view, bv.view, fv.view, gv.view, s, it, err, cost, val);
  }
  return py::make_tuple(n_iter, error, transport, value);
}

// OTDD's label costs (none when the table is empty); the vectors must outlive the result.
cpu::LabelCost label_cost(const std::vector<double>& label_table, const std::vector<int64_t>& x_starts,
                          const std::vector<int64_t>& y_starts) {
  if (label_table.empty()) return {};
  const int64_t kx = int64_t(x_starts.size()) - 1, ky = int64_t(y_starts.size()) - 1;
  if (kx < 1 || ky < 1 || int64_t(label_table.size()) != kx * ky) {
    throw std::invalid_argument("label_table must hold (len(x_starts) - 1) x (len(y_starts) - 1) entries");
  }
  return {label_table.data(), x_starts.data(), kx, y_starts.data(), ky};
}

// See cpu::sinkhorn_points (BLAS from scipy.linalg.cython_blas capsules). `progress` (None or a
// callable(problem, iteration, error)) runs at each check; Ctrl-C stops the solve there.
py::tuple sinkhorn_points(const py::buffer& x, const py::buffer& y, int64_t N, double scale, const py::dict& blas,
                          const py::buffer& a, const py::buffer& b, const py::buffer& f, const py::buffer& g, double eps,
                          double lam, double rho, double tol, int64_t memory, int64_t max_iter, int64_t check_every,
                          bool symmetric, const std::vector<double>& schedule, const py::object& progress,
                          const std::vector<double>& label_table, const std::vector<int64_t>& x_starts,
                          const std::vector<int64_t>& y_starts) {
  const BufferView xv = buffer_view(x, "x", false), yv = buffer_view(y, "y", false), av = buffer_view(a, "a", false),
                   bv = buffer_view(b, "b", false);
  BufferView fv = buffer_view(f, "f", true), gv = buffer_view(g, "g", true);
  const Gemm gemm = gemm_of(blas);
  const int64_t B = av.view.rows;
  py::array_t<int64_t> n_iter(B);
  py::array_t<double> error(B), transport(B), value(B);
  const cpu::SinkhornSettings s{eps, lam, rho, tol, memory, max_iter, check_every, symmetric, schedule.data(),
                                static_cast<int64_t>(schedule.size())};
  const cpu::LabelCost labels = label_cost(label_table, x_starts, y_starts);
  std::function<void(int64_t, int64_t, double)> report = [&](int64_t k, int64_t it, double err) {
    py::gil_scoped_acquire acquire;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    if (!progress.is_none()) progress(k, it, err);
  };
  int64_t* it = n_iter.mutable_data();
  double *err = error.mutable_data(), *cost = transport.mutable_data(), *val = value.mutable_data();
  {
    py::gil_scoped_release release;
    cpu::sinkhorn_points(xv.view, yv.view, N, scale, gemm, av.view, bv.view, fv.view, gv.view, s, labels, it, err,
                         cost, val, report);
  }
  return py::make_tuple(n_iter, error, transport, value);
}

// See cpu::sinkhorn_pass: x [n, d], y [m, d]; y_log_weights, y_pot [1, m] float64; out [1, n]
// float64 (a half-step) or, given x_log_weights and x_pot [1, n] float64, [2, n] (the values).
void sinkhorn_pass(const py::buffer& x, const py::buffer& y, double scale, const py::dict& blas, double eps,
                   const py::buffer& out, const py::buffer& y_log_weights, const py::buffer& y_pot,
                   const std::optional<py::buffer>& x_log_weights, const std::optional<py::buffer>& x_pot,
                   const std::vector<double>& label_table, const std::vector<int64_t>& x_starts,
                   const std::vector<int64_t>& y_starts) {
  const BufferView xv = buffer_view(x, "x", false), yv = buffer_view(y, "y", false);
  const int64_t n = xv.view.rows, m = yv.view.rows;
  std::vector<BufferView> keep;  // the buffers' exports, held until the pass is done
  auto row = [&](const py::buffer& b, int64_t len, const char* name) {
    keep.push_back(buffer_view(b, name, false));
    check_same_layout(keep.back().view, View2D{nullptr, DType::f64, 1, len, len}, name);
    return keep.back().view.row<const double>(0);
  };
  cpu::PointPass pass{eps, row(y_log_weights, m, "y_log_weights"), row(y_pot, m, "y_pot")};
  if (x_log_weights.has_value() != x_pot.has_value()) {
    throw std::invalid_argument("sinkhorn_pass: x_log_weights and x_pot go together (the values pass)");
  }
  if (x_pot) {
    pass.x_log_weights = row(*x_log_weights, n, "x_log_weights");
    pass.x_pot = row(*x_pot, n, "x_pot");
  }
  BufferView ov = buffer_view(out, "out", true);
  check_same_layout(ov.view, View2D{nullptr, DType::f64, x_pot ? 2 : 1, n, n}, "out");
  const cpu::LabelCost labels = label_cost(label_table, x_starts, y_starts);
  const Gemm gemm = gemm_of(blas);
  py::gil_scoped_release release;
  cpu::sinkhorn_pass(xv.view, yv.view, scale, gemm, pass, ov.view, labels);
}

// A contiguous buffer of `count` elements of dtype `want` (null for None), kept alive in `keep`.
void* flat_ptr(const std::optional<py::buffer>& b, int64_t count, DType want, const std::string& what,
               std::vector<py::buffer_info>& keep, bool writable) {
  if (!b) return nullptr;
  keep.push_back(b->request(writable));
  const py::buffer_info& info = keep.back();
  if (dtype_of_format(info.format, what) != want) {
    throw std::invalid_argument(what + ": expected " + dtype_name(want));
  }
  if (info.size != count) {
    throw std::invalid_argument(what + ": expected " + std::to_string(count) + " elements, got " +
                                std::to_string(info.size));
  }
  py::ssize_t expect = info.itemsize;
  for (py::ssize_t i = info.ndim - 1; i >= 0; --i) {
    if (info.shape[size_t(i)] > 1 && info.strides[size_t(i)] != expect) {
      throw std::invalid_argument(what + ": expected a contiguous buffer");
    }
    expect *= info.shape[size_t(i)];
  }
  return info.ptr;
}

using Params = std::vector<std::optional<py::buffer>>;  // w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale
constexpr const char* kBottleneckParams[7] = {"w_down", "b_down", "w_up", "b_up", "ln_weight", "ln_bias", "scale"};

// Element counts of the bottleneck adapter's weights (and of their gradients), in Params order.
std::array<int64_t, 7> bottleneck_counts(int64_t r, int64_t d) { return {r * d, r, d * r, d, d, d, d}; }

cpu::Bottleneck bottleneck_of(const Params& params, int64_t d, int64_t r, DType compute, bool layer_norm, double eps,
                              int activation, int residual, double dropout, uint64_t seed,
                              std::vector<py::buffer_info>& keep) {
  if (params.size() != 7) throw std::invalid_argument("params: expected 7 entries");
  if (activation < 0 || activation > 3) throw std::invalid_argument("activation: expected a code in 0..3");
  if (residual < 0 || residual > 2) throw std::invalid_argument("residual: expected a code in 0..2");
  if (!(dropout >= 0 && dropout < 1)) throw std::invalid_argument("dropout: expected 0 <= p < 1");
  const auto counts = bottleneck_counts(r, d);
  void* ptr[7];
  for (int i = 0; i < 7; ++i) {
    ptr[i] = flat_ptr(params[size_t(i)], counts[size_t(i)], compute, kBottleneckParams[i], keep, false);
  }
  if (!ptr[0] || !ptr[2] || !ptr[6]) throw std::invalid_argument("params: w_down, w_up and scale are required");
  return cpu::Bottleneck{d, r, ptr[0], ptr[1], ptr[2], ptr[3], ptr[4], ptr[5], ptr[6], layer_norm, eps,
                         static_cast<cpu::Activation>(activation), static_cast<cpu::Residual>(residual), dropout, seed};
}

DType compute_dtype(DType storage) { return storage == DType::f64 ? DType::f64 : DType::f32; }

// See cpu::adapter_dropout.
void adapter_dropout(const py::buffer& x, const py::buffer& out, double p, uint64_t seed) {
  const BufferView xv = buffer_view(x, "x", false);
  BufferView ov = buffer_view(out, "out", true);
  check_same_layout(ov.view, xv.view, "out");
  if (!(p >= 0 && p < 1)) throw std::invalid_argument("p: expected 0 <= p < 1");
  py::gil_scoped_release release;
  cpu::adapter_dropout(xv.view, ov.view, p, seed);
}

// See cpu::bottleneck_forward. `residual` is used with residual code 2 (separate) only.
bool bottleneck_forward(const py::buffer& x, const std::optional<py::buffer>& residual,
                        const py::buffer& out, const py::buffer& a, const py::buffer& mean, const py::buffer& rstd,
                        int64_t r, const Params& params, bool layer_norm, double eps, int activation,
                        int residual_mode, double dropout, uint64_t seed) {
  const BufferView xv = buffer_view(x, "x", false);
  BufferView ov = buffer_view(out, "out", true);
  check_same_layout(ov.view, xv.view, "out");
  std::optional<BufferView> rv;
  if (residual_mode == 2) {
    if (!residual) throw std::invalid_argument("residual: required with the separate residual mode");
    rv = buffer_view(*residual, "residual", false);
    check_same_layout(rv->view, xv.view, "residual");
  }
  const int64_t N = xv.view.rows, d = xv.view.cols;
  const DType T = compute_dtype(xv.view.dtype);
  std::vector<py::buffer_info> keep;
  const cpu::Bottleneck w = bottleneck_of(params, d, r, T, layer_norm, eps, activation, residual_mode, dropout, seed, keep);
  void* ap = flat_ptr(a, N * r, T, "a", keep, true);
  void* mp = flat_ptr(mean, N, T, "mean", keep, true);
  void* sp = flat_ptr(rstd, N, T, "rstd", keep, true);
  py::gil_scoped_release release;
  return cpu::bottleneck_forward(w, xv.view, rv ? &rv->view : nullptr, ov.view, ap, mp, sp);
}

// See cpu::bottleneck_backward; `grads` are 7 writable buffers in the params' order.
void bottleneck_backward(const py::buffer& grad, const py::buffer& x, const py::buffer& a,
                         const py::buffer& mean, const py::buffer& rstd, const py::buffer& dx, int64_t r,
                         const Params& params, const Params& grads, bool layer_norm, double eps, int activation,
                         int residual_mode, double dropout, uint64_t seed) {
  const BufferView xv = buffer_view(x, "x", false), gv = buffer_view(grad, "grad", false);
  check_same_layout(gv.view, xv.view, "grad");
  BufferView dv = buffer_view(dx, "dx", true);
  check_same_layout(dv.view, xv.view, "dx");
  const int64_t N = xv.view.rows, d = xv.view.cols;
  const DType T = compute_dtype(xv.view.dtype);
  std::vector<py::buffer_info> keep;
  const cpu::Bottleneck w = bottleneck_of(params, d, r, T, layer_norm, eps, activation, residual_mode, dropout, seed, keep);
  const void* ap = flat_ptr(a, N * r, T, "a", keep, false);
  const void* mp = flat_ptr(mean, N, T, "mean", keep, false);
  const void* sp = flat_ptr(rstd, N, T, "rstd", keep, false);
  if (grads.size() != 7) throw std::invalid_argument("grads: expected 7 entries");
  const auto counts = bottleneck_counts(r, d);
  void* gp[7];
  for (int i = 0; i < 7; ++i) {
    const std::string name = std::string("grad ") + kBottleneckParams[i];
    gp[i] = flat_ptr(grads[size_t(i)], counts[size_t(i)], T, name, keep, true);
    if (!gp[i]) throw std::invalid_argument(name + ": required");
  }
  const cpu::BottleneckGrads g{gp[0], gp[1], gp[2], gp[3], gp[4], gp[5], gp[6]};
  py::gil_scoped_release release;
  cpu::bottleneck_backward(w, gv.view, xv.view, ap, mp, sp, dv.view, g);
}

using Vector = py::array_t<double, py::array::c_style | py::array::forcecast>;

// See cpu::logme_fixed_point. Returns (evidence, alpha, beta, t_used, z or None), [K] each and
// z [K, n].
py::tuple logme_fixed_point(const Vector& diag, const Vector& off, const Vector& sigma, int64_t first,
                            int64_t extra_log_alpha, int64_t samples, int64_t dim, bool gram_of_features,
                            const py::buffer& projected, const Vector& y2, int max_iter, double tol, double damp,
                            bool with_z) {
  const int64_t n = diag.size();
  if (off.size() != std::max<int64_t>(n - 1, 0) || sigma.size() != n) {
    throw std::invalid_argument("logme_fixed_point: expected diag [n], off [n - 1], sigma [n]");
  }
  BufferView c = buffer_view(projected, "projected", false);
  if (c.view.dtype != DType::f64) throw std::invalid_argument("projected: expected float64");
  const int64_t K = c.view.rows;
  if (y2.size() != K) throw std::invalid_argument("y2: expected one value per target");
  Vector evidence(K), alpha(K), beta(K), t_used(K);
  std::optional<py::array_t<double>> z;
  View2D z_view;
  if (with_z) {
    z = py::array_t<double>({K, n});
    z_view = View2D{z->mutable_data(), DType::f64, K, n, n};
  }
  const cpu::LogmeSpectrum s{diag.data(), off.data(), sigma.data(), n, first, extra_log_alpha, samples, dim,
                             gram_of_features};
  double *e = evidence.mutable_data(), *a = alpha.mutable_data(), *b = beta.mutable_data(),
         *t = t_used.mutable_data();
  {
    py::gil_scoped_release release;
    cpu::logme_fixed_point(s, {max_iter, tol, damp}, c.view, y2.data(), e, a, b, t, with_z ? &z_view : nullptr);
  }
  return py::make_tuple(evidence, alpha, beta, t_used, z ? py::object(*z) : py::object(py::none()));
}

// A safetensors header's structure as (names, dtype indices into codes, ranks, dims: a 1 then
// the shape per tensor, offsets: begin and end per tensor, metadata dict or None); see
// cpu/safetensors_header.h for the grammar. Errors are ValueError.
py::tuple safetensors_header(const py::bytes& raw, const std::vector<std::string>& codes) {
  char* data = nullptr;
  py::ssize_t size = 0;
  if (PyBytes_AsStringAndSize(raw.ptr(), &data, &size) != 0) throw py::error_already_set();
  cpu::SafetensorsHeader h;
  {
    py::gil_scoped_release release;
    h = cpu::parse_safetensors_header(data, static_cast<size_t>(size), codes);
  }
  py::list names(h.names.size());
  for (size_t i = 0; i < h.names.size(); ++i) names[i] = py::str(h.names[i]);
  py::object meta = py::none();
  if (h.has_metadata) {
    py::dict d;
    for (const auto& [k, v] : h.metadata) d[py::str(k)] = py::str(v);
    meta = d;
  }
  return py::make_tuple(names, to_array(h.dtypes), to_array(h.ranks), to_array(h.dims), to_array(h.offsets), meta);
}

#ifdef TRANSFEROPS_WITH_CUDA
// (pointer, row_stride) pairs of device memory; rows, cols and dtype shared by all.
View2D device_view(uintptr_t ptr, int64_t row_stride, int64_t rows, int64_t cols, int dtype) {
  if (dtype < 0 || dtype > 3) throw std::invalid_argument("dtype: unknown code " + std::to_string(dtype));
  return View2D{reinterpret_cast<void*>(ptr), static_cast<DType>(dtype), rows, cols, row_stride};
}

void cuda_disjoint_merge(const std::vector<std::pair<uintptr_t, int64_t>>& tvs, uintptr_t out,
                         int64_t out_stride, int64_t rows, int64_t cols, int dtype,
                         const std::optional<std::vector<double>>& weights, int rule,
                         uintptr_t nonfinite, uintptr_t stream) {
  std::vector<View2D> views;
  for (const auto& [ptr, stride] : tvs) views.push_back(device_view(ptr, stride, rows, cols, dtype));
  const double* w = weights_ptr(weights, tvs.size());
  py::gil_scoped_release release;
  cuda::disjoint_merge(views, device_view(out, out_stride, rows, cols, dtype), w, rule,
                       reinterpret_cast<int64_t*>(nonfinite), stream);
}
#endif

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "transferops native kernels (CPU; CUDA when built with TRANSFEROPS_CUDA)";
  m.def("omp_max_threads", &max_threads, "OpenMP threads a parallel region uses (1 without OpenMP)");
  m.def("cpu_isa", &cpu::cpu_isa, "instruction set of the CPU kernels: avx512, avx2 or base");
  m.def("cpu_isas", &cpu::cpu_isas, "the instruction sets this build compiled and this CPU runs, lowest first");
  m.def("set_cpu_isa", &cpu::set_cpu_isa, py::arg("isa"), "force the CPU kernels' instruction set");
  m.def("safetensors_header", &safetensors_header, py::arg("raw"), py::arg("codes"),
        "a safetensors header parsed strictly: (names, dtype indices, ranks, dims, offsets, metadata)");
#ifdef TRANSFEROPS_OPENMP
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif
#ifdef TRANSFEROPS_WITH_CUDA
  m.attr("has_cuda") = true;
  m.attr("cuda_max_tasks") = cuda::kMaxTasks;
  m.def("cuda_disjoint_merge", &cuda_disjoint_merge, py::arg("task_vectors"), py::arg("out"),
        py::arg("out_stride"), py::arg("rows"), py::arg("cols"), py::arg("dtype"),
        py::arg("weights"), py::arg("rule"), py::arg("nonfinite"), py::arg("stream"));
#else
  m.attr("has_cuda") = false;
#endif
  m.def("merge", &merge, py::arg("task_vectors"), py::arg("base"), py::arg("out"), py::arg("weights"),
        py::arg("trims"), py::arg("dare"), py::arg("elect"), py::arg("rule"), py::arg("weight_before_election"),
        py::arg("zero_sign"), py::arg("lam"), py::arg("scales") = py::none(), py::arg("normalize") = py::none(),
        "Fused trim + (TIES election and disjoint mean | weighted sum), optionally forming the task "
        "vectors from models and a base; returns (positions where an input was NaN/Inf, sum of the "
        "elected signs)");
  m.def("kept_l1", &kept_l1, py::arg("task_vectors"), py::arg("base"), py::arg("trims"), py::arg("dare"),
        py::arg("offset"), "Per block of kept_l1_block flat indices and task: (sum |tv|, sum |kept tv|), float64 "
        "[blocks, T, 2]");
  m.attr("kept_l1_block") = cpu::kL1Block;
  m.def("fisher_average", &fisher_average, py::arg("models"), py::arg("fishers"), py::arg("out"), py::arg("weights"),
        py::arg("eps"), "Fisher merging in one pass; returns (positions with NaN/Inf, positions with a negative Fisher)");
  m.def("sinkhorn_matrix", &sinkhorn_matrix, py::arg("C"), py::arg("N"), py::arg("a"), py::arg("b"), py::arg("f"),
        py::arg("g"), py::arg("eps"), py::arg("lam"), py::arg("rho"), py::arg("tol"), py::arg("memory"),
        py::arg("max_iter"), py::arg("check_every"), py::arg("symmetric"), py::arg("schedule"),
        "stabilized kernel-domain Sinkhorn on cost matrices [B * N, M]");
  m.def("sinkhorn_pass", &sinkhorn_pass, py::arg("x"), py::arg("y"), py::arg("scale"), py::arg("blas"), py::arg("eps"),
        py::arg("out"), py::arg("y_log_weights"), py::arg("y_pot"), py::arg("x_log_weights") = py::none(),
        py::arg("x_pot") = py::none(), py::arg("label_table") = std::vector<double>(),
        py::arg("x_starts") = std::vector<int64_t>(), py::arg("y_starts") = std::vector<int64_t>(),
        "one pass of sinkhorn_points: a half-step's log-sum-exps, or (given x's) the values per row");
  m.def("sinkhorn_points", &sinkhorn_points, py::arg("x"), py::arg("y"), py::arg("N"), py::arg("scale"), py::arg("blas"),
        py::arg("a"), py::arg("b"), py::arg("f"), py::arg("g"), py::arg("eps"), py::arg("lam"), py::arg("rho"),
        py::arg("tol"), py::arg("memory"), py::arg("max_iter"), py::arg("check_every"), py::arg("symmetric"),
        py::arg("schedule"), py::arg("progress"), py::arg("label_table") = std::vector<double>(),
        py::arg("x_starts") = std::vector<int64_t>(), py::arg("y_starts") = std::vector<int64_t>(),
        "log-domain Sinkhorn on point clouds, costs recomputed in tiles (plus a cost between classes)");
  m.def("tridiagonalize", &tridiagonalize, py::arg("lapack"), py::arg("grams"), py::arg("projected"),
        py::arg("across_models"), "sytrd + sterf of Gram matrices and Q^T of their targets, in place (LAPACK from scipy)");
  m.def("tridiagonal_apply_q", &tridiagonal_apply_q, py::arg("lapack"), py::arg("gram"), py::arg("tau"), py::arg("X"),
        py::arg("transpose"), "Q X or Q^T X in place, Q from tridiagonalize");
  m.def("logme_fixed_point", &logme_fixed_point, py::arg("diag"), py::arg("off"), py::arg("sigma"), py::arg("first"),
        py::arg("extra_log_alpha"), py::arg("samples"), py::arg("dim"), py::arg("gram_of_features"),
        py::arg("projected"), py::arg("y2"), py::arg("max_iter"), py::arg("tol"), py::arg("damp"), py::arg("with_z"),
        "LogME's fixed point for every target of one model on its tridiagonalized Gram matrix");
  m.def("adapter_dropout", &adapter_dropout, py::arg("x"), py::arg("out"), py::arg("p"), py::arg("seed"),
        "out = x times the adapters' Philox dropout factors (entry (n, j) keyed by n * cols + j)");
  m.def("bottleneck_forward", &bottleneck_forward, py::arg("x"), py::arg("residual"), py::arg("out"),
        py::arg("a"), py::arg("mean"), py::arg("rstd"), py::arg("r"), py::arg("params"), py::arg("layer_norm"),
        py::arg("eps"), py::arg("activation"), py::arg("residual_mode"), py::arg("dropout"), py::arg("seed"),
        "fused bottleneck adapter forward in cache-resident row tiles; returns whether the pre-activation is finite");
  m.def("bottleneck_backward", &bottleneck_backward, py::arg("grad"), py::arg("x"), py::arg("a"),
        py::arg("mean"), py::arg("rstd"), py::arg("dx"), py::arg("r"), py::arg("params"), py::arg("grads"),
        py::arg("layer_norm"), py::arg("eps"), py::arg("activation"), py::arg("residual_mode"), py::arg("dropout"),
        py::arg("seed"), "fused bottleneck adapter backward, recomputing LN, activation and dropout mask");
  m.def("abs_sample_keys", &abs_sample_keys, py::arg("tasks"), py::arg("base"), py::arg("runs"), py::arg("seed"),
        "keys of |x| at runs of consecutive elements spread over the views: [T, runs, run length]");
  m.def("abs_order_statistic", &abs_order_statistic, py::arg("keys"), py::arg("i"),
        "the key at position i of keys (non-negative integers) sorted ascending");
  m.def("abs_sample_brackets", &abs_sample_brackets, py::arg("keys"), py::arg("q"), py::arg("numel"), py::arg("nbits"),
        py::arg("max_marks") = cpu::kMaxMarks,
        "per task of a sample's keys [T, runs, run length]: (lo, hi, marks, expected keys inside) bracketing "
        "the top fraction q of numel keys");
  m.def("abs_bracket", &abs_bracket, py::arg("tasks"), py::arg("base"), py::arg("lo"), py::arg("hi"), py::arg("marks"),
        py::arg("capacity"),
        "Bracketed-select pass: per task (keys above hi, keys in [lo, hi], their keys and flat positions "
        "(no marks, at most capacity) or counts per block of SELECT_BLOCK row columns in bins: each mark and "
        "each gap between marks)");
  m.attr("SELECT_BLOCK") = cpu::kSelectBlock;
  m.attr("SELECT_MARKS") = cpu::kMaxMarks;
  m.def("abs_topk", &abs_topk, py::arg("tasks"), py::arg("base"), py::arg("k"), py::arg("keep_ties"),
        "Exact top-k of |x| (x = task - base with a base) per task, every pass in one call: (lo, hi, cut) per "
        "task, ties at the k-th kept lowest flat index first (or all)");
  py::class_<cpu::TopkSelect>(m, "TopkSelect",
                              "The same select over tasks streamed in chunks: while next_pass() names tasks, feed "
                              "their chunks in flat order until feed returns False or they end; then thresholds()")
      .def(py::init(&topk_select), py::arg("k"), py::arg("numel"), py::arg("tasks"), py::arg("chunk"),
           py::arg("keep_ties"), py::arg("bracket") = true, py::arg("max_kept") = py::none(),
           py::arg("blind_sample") = false)
      .def("next_pass", &cpu::TopkSelect::next_pass, py::call_guard<py::gil_scoped_release>(),
           "the tasks the next pass reads (empty: done)")
      .def("feed", &topk_feed, py::arg("tasks"), py::arg("base"),
           "the pass's next chunk of its tasks (and base); False: the pass needs no more")
      .def("thresholds", [](const cpu::TopkSelect& s) { return thresholds_list(s.thresholds()); },
           "(lo, hi, cut) per task")
      .def_property_readonly("radix_passes", &cpu::TopkSelect::radix_passes);
}
