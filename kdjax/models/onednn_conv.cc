// oneDNN 2-D convolutions as XLA FFI handlers: the CPU kernels behind kdjax.models.onednn.
//
// Three handlers, all float32, activations NHWC and kernels HWIO (the layouts kdjax's Flax models
// use), strides and explicit top/bottom/left/right padding as attributes, no dilation or groups:
//   KdjaxOnednnConvForward      (x[N,H,W,C],  w[KH,KW,C,O])  -> y[N,OH,OW,O]
//   KdjaxOnednnConvBackwardData (dy[N,OH,OW,O], w[KH,KW,C,O]) -> dx[N,H,W,C]
//   KdjaxOnednnConvBackwardWeights (x[N,H,W,C], dy[N,OH,OW,O]) -> dw[KH,KW,C,O]
// The shapes of the result buffer say what is computed (e.g. the input size of a strided
// backward-data pass), so Python decides every shape.
//
// Why: XLA:CPU runs convolutions and their gradients through Eigen; oneDNN's (the library PyTorch's
// CPU convolutions use) are 1.2-3x faster on the CIFAR ResNet layers (benchmarks/README.md).
//
// oneDNN picks its own (blocked) kernel layout; kernels are reordered from/to HWIO on every call
// (at most a few MB). Primitives are built once per shape and cached. The scratchpad is supplied by
// the caller from a per-thread buffer, so concurrent calls from XLA's threads never share one.
#include <cstdint>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = dnnl::memory::format_tag;
using Type = dnnl::memory::data_type;

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

enum class Pass : char { kForward = 'f', kBackwardData = 'd', kBackwardWeights = 'w' };

// One convolution's geometry (oneDNN's logical dims are NCHW / OIHW whatever the memory layout).
struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr;

  std::string Key(Pass pass) const {
    char buf[320];
    std::snprintf(buf, sizeof buf, "%c %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld",
                  static_cast<char>(pass), (long long)n, (long long)h, (long long)w, (long long)c, (long long)kh,
                  (long long)kw, (long long)o, (long long)oh, (long long)ow, (long long)sh, (long long)sw,
                  (long long)pt, (long long)pb, (long long)pl, (long long)pr);
    return buf;
  }
  memory::desc Input() const { return memory::desc({n, c, h, w}, Type::f32, Tag::nhwc); }
  memory::desc Output() const { return memory::desc({n, o, oh, ow}, Type::f32, Tag::nhwc); }
  memory::desc KernelHwio() const { return memory::desc({o, c, kh, kw}, Type::f32, Tag::hwio); }
  memory::desc KernelAny() const { return memory::desc({o, c, kh, kw}, Type::f32, Tag::any); }
};

struct Primitive {
  dnnl::primitive conv;
  memory::desc kernel;            // the kernel (or kernel gradient) layout the primitive chose
  bool reorder = false;           // kernel != HWIO
  dnnl::primitive kernel_reorder;  // HWIO -> kernel (forward, backward data); kernel -> HWIO (weights)
  size_t scratchpad_bytes = 0;
};

std::shared_ptr<Primitive> Build(const Geometry& g, Pass pass) {
  const memory::dims strides{g.sh, g.sw}, pad_l{g.pt, g.pl}, pad_r{g.pb, g.pr};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const auto algorithm = dnnl::algorithm::convolution_direct;
  dnnl::convolution_forward::primitive_desc forward(Engine(), dnnl::prop_kind::forward_training, algorithm,
                                                    g.Input(), g.KernelAny(), g.Output(), strides, pad_l, pad_r,
                                                    attr);
  auto p = std::make_shared<Primitive>();
  if (pass == Pass::kForward) {
    p->conv = dnnl::convolution_forward(forward);
    p->kernel = forward.weights_desc();
    p->scratchpad_bytes = forward.scratchpad_desc().get_size();
  } else if (pass == Pass::kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(Engine(), algorithm, g.Input(), g.KernelAny(), g.Output(),
                                                       strides, pad_l, pad_r, forward, attr);
    p->conv = dnnl::convolution_backward_data(pd);
    p->kernel = pd.weights_desc();
    p->scratchpad_bytes = pd.scratchpad_desc().get_size();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(Engine(), algorithm, g.Input(), g.KernelAny(),
                                                          g.Output(), strides, pad_l, pad_r, forward, attr);
    p->conv = dnnl::convolution_backward_weights(pd);
    p->kernel = pd.diff_weights_desc();
    p->scratchpad_bytes = pd.scratchpad_desc().get_size();
  }
  p->reorder = p->kernel != g.KernelHwio();
  if (p->reorder) {
    const bool to_hwio = pass == Pass::kBackwardWeights;
    const memory::desc& from = to_hwio ? p->kernel : g.KernelHwio();
    const memory::desc& to = to_hwio ? g.KernelHwio() : p->kernel;
    p->kernel_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), from, Engine(), to));
  }
  return p;
}

std::shared_ptr<Primitive> Cached(const Geometry& g, Pass pass) {
  static std::mutex* mu = new std::mutex;
  static auto* cache = new std::unordered_map<std::string, std::shared_ptr<Primitive>>;
  const std::string key = g.Key(pass);
  {
    std::lock_guard<std::mutex> lock(*mu);
    auto it = cache->find(key);
    if (it != cache->end()) return it->second;
  }
  auto built = Build(g, pass);  // outside the lock: building JIT-compiles kernels (milliseconds)
  std::lock_guard<std::mutex> lock(*mu);
  return cache->emplace(key, built).first->second;
}

// Per-thread buffers for the scratchpad and the reordered kernel, grown on demand.
float* ThreadBuffer(int which, size_t bytes) {
  thread_local std::vector<float> buffers[2];
  auto& b = buffers[which];
  if (b.size() * sizeof(float) < bytes) b.resize((bytes + sizeof(float) - 1) / sizeof(float) + 16);
  return b.data();
}

ffi::Error Run(Pass pass, const Geometry& g, void* input, void* kernel, void* output) {
  try {
    auto p = Cached(g, pass);
    dnnl::stream stream(Engine());
    memory input_m(g.Input(), Engine(), input), output_m(g.Output(), Engine(), output);
    memory kernel_hwio(g.KernelHwio(), Engine(), kernel);
    memory kernel_m = kernel_hwio;
    if (p->reorder) kernel_m = memory(p->kernel, Engine(), ThreadBuffer(0, p->kernel.get_size()));
    memory scratchpad(dnnl::memory::desc({static_cast<int64_t>(p->scratchpad_bytes)}, Type::u8, Tag::a), Engine(),
                      ThreadBuffer(1, p->scratchpad_bytes));
    if (pass != Pass::kBackwardWeights && p->reorder) {
      p->kernel_reorder.execute(stream, {{DNNL_ARG_FROM, kernel_hwio}, {DNNL_ARG_TO, kernel_m}});
    }
    if (pass == Pass::kForward) {
      p->conv.execute(stream, {{DNNL_ARG_SRC, input_m}, {DNNL_ARG_WEIGHTS, kernel_m}, {DNNL_ARG_DST, output_m},
                               {DNNL_ARG_SCRATCHPAD, scratchpad}});
    } else if (pass == Pass::kBackwardData) {
      p->conv.execute(stream, {{DNNL_ARG_DIFF_SRC, input_m}, {DNNL_ARG_WEIGHTS, kernel_m},
                               {DNNL_ARG_DIFF_DST, output_m}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
    } else {
      p->conv.execute(stream, {{DNNL_ARG_SRC, input_m}, {DNNL_ARG_DIFF_WEIGHTS, kernel_m},
                               {DNNL_ARG_DIFF_DST, output_m}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
      if (p->reorder) p->kernel_reorder.execute(stream, {{DNNL_ARG_FROM, kernel_m}, {DNNL_ARG_TO, kernel_hwio}});
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, "kdjax oneDNN convolution (" + g.Key(pass) + "): " + e.what());
  }
  return ffi::Error::Success();
}

Geometry Make(ffi::Span<const int64_t> input, ffi::Span<const int64_t> kernel, ffi::Span<const int64_t> output,
              int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Geometry{input[0], input[1], input[2], input[3], kernel[0], kernel[1], kernel[3], output[1], output[2],
                  sh, sw, pt, pb, pl, pr};
}

ffi::Error Forward(ffi::Buffer<ffi::F32, 4> x, ffi::Buffer<ffi::F32, 4> w, ffi::ResultBuffer<ffi::F32, 4> y,
                   int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Run(Pass::kForward, Make(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr),
             x.untyped_data(), w.untyped_data(), y->untyped_data());
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32, 4> dy, ffi::Buffer<ffi::F32, 4> w, ffi::ResultBuffer<ffi::F32, 4> dx,
                        int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Run(Pass::kBackwardData, Make(dx->dimensions(), w.dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr),
             dx->untyped_data(), w.untyped_data(), dy.untyped_data());
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32, 4> x, ffi::Buffer<ffi::F32, 4> dy,
                           ffi::ResultBuffer<ffi::F32, 4> dw, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                           int64_t pl, int64_t pr) {
  return Run(Pass::kBackwardWeights,
             Make(x.dimensions(), dw->dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr), x.untyped_data(),
             dw->untyped_data(), dy.untyped_data());
}

}  // namespace

#define KDJAX_CONV_BINDING                                                                             \
  ffi::Ffi::Bind()                                                                                     \
      .Arg<ffi::Buffer<ffi::F32, 4>>()                                                                 \
      .Arg<ffi::Buffer<ffi::F32, 4>>()                                                                 \
      .Ret<ffi::Buffer<ffi::F32, 4>>()                                                                 \
      .Attr<int64_t>("sh")                                                                             \
      .Attr<int64_t>("sw")                                                                             \
      .Attr<int64_t>("pt")                                                                             \
      .Attr<int64_t>("pb")                                                                             \
      .Attr<int64_t>("pl")                                                                             \
      .Attr<int64_t>("pr")

XLA_FFI_DEFINE_HANDLER_SYMBOL(KdjaxOnednnConvForward, Forward, KDJAX_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KdjaxOnednnConvBackwardData, BackwardData, KDJAX_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KdjaxOnednnConvBackwardWeights, BackwardWeights, KDJAX_CONV_BINDING);

// The oneDNN version the library was loaded with, for kdjax's diagnostics.
extern "C" int KdjaxOnednnVersion() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
