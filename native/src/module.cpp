// krasis_native: pybind11 bindings. They only check dtype, shape and contiguity, release the
// GIL and call the kernels; arrays come in through the buffer protocol (numpy, or torch via
// .numpy()), so the module does not depend on torch.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "kernels.h"
#include "moe.h"

namespace py = pybind11;
using krasis::MoeRunner;
using krasis::MoeWeights;

namespace {

template <class T>
const T* checked(const py::array& a, const char* name, std::vector<py::ssize_t> shape) {
    if (!a.dtype().is(py::dtype::of<T>()))
        throw py::value_error(std::string(name) + ": wrong dtype " + std::string(py::str(a.dtype())));
    if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + ": not C-contiguous");
    if (a.ndim() != py::ssize_t(shape.size())) throw py::value_error(std::string(name) + ": wrong rank");
    for (size_t i = 0; i < shape.size(); ++i)
        if (a.shape(py::ssize_t(i)) != shape[i])
            throw py::value_error(std::string(name) + ": wrong shape at dim " + std::to_string(i));
    return static_cast<const T*>(a.data());
}

void check_format(int bits, int group_size, int hidden, int width) {
    if (bits != 4 && bits != 8) throw py::value_error("bits must be 4 or 8");
    if (group_size <= 0 || group_size % krasis::kHalf != 0)
        throw py::value_error("group_size must be a positive multiple of 32");
    if (hidden % group_size != 0 || width % group_size != 0)
        throw py::value_error("hidden and width must be multiples of group_size");
    if (bits == 4 && (hidden % krasis::kUnit != 0 || width % krasis::kUnit != 0))
        throw py::value_error("INT4 needs hidden and width to be multiples of 64");
}

void moe_forward(MoeRunner& self, const py::array& x, const py::array& ids, const py::array& weights,
                 const py::array& gate_q, const py::array& gate_s, const py::array& up_q,
                 const py::array& up_s, const py::array& down_q, const py::array& down_s, int bits,
                 int group_size, py::array& out) {
    if (x.ndim() != 2 || ids.ndim() != 2 || gate_q.ndim() != 3 || down_q.ndim() != 3)
        throw py::value_error("x and ids must be 2-D, expert weights 3-D");
    const py::ssize_t M = x.shape(0), D = x.shape(1), K = ids.shape(1);
    const py::ssize_t E = gate_q.shape(0), I = gate_q.shape(1), div = bits == 4 ? 2 : 1;
    check_format(bits, group_size, int(D), int(I));
    const py::ssize_t G = group_size;
    MoeWeights w{};
    w.n_experts = int(E), w.hidden = int(D), w.width = int(I), w.bits = bits, w.group_size = group_size;
    const float* xp = checked<float>(x, "x", {M, D});
    const int64_t* idp = checked<int64_t>(ids, "topk_ids", {M, K});
    const float* wp = checked<float>(weights, "topk_weights", {M, K});
    if (bits == 8) {
        w.gate_q = reinterpret_cast<const uint8_t*>(checked<int8_t>(gate_q, "gate_q", {E, I, D}));
        w.up_q = reinterpret_cast<const uint8_t*>(checked<int8_t>(up_q, "up_q", {E, I, D}));
        w.down_q = reinterpret_cast<const uint8_t*>(checked<int8_t>(down_q, "down_q", {E, D, I}));
    } else {
        w.gate_q = checked<uint8_t>(gate_q, "gate_q", {E, I, D / div});
        w.up_q = checked<uint8_t>(up_q, "up_q", {E, I, D / div});
        w.down_q = checked<uint8_t>(down_q, "down_q", {E, D, I / div});
    }
    w.gate_s = checked<float>(gate_s, "gate_s", {E, I, D / G});
    w.up_s = checked<float>(up_s, "up_s", {E, I, D / G});
    w.down_s = checked<float>(down_s, "down_s", {E, D, I / G});
    float* op = const_cast<float*>(checked<float>(out, "out", {M, D}));
    if (!out.writeable()) throw py::value_error("out: not writeable");
    if (M == 0) return;
    py::gil_scoped_release release;
    self.forward(xp, int(M), idp, wp, int(K), w, op);
}

void linear(MoeRunner& self, const py::array& x, const py::array& qweight, const py::array& scales,
            int bits, int group_size, py::array& out) {
    if (x.ndim() != 2 || qweight.ndim() != 2) throw py::value_error("x and qweight must be 2-D");
    const py::ssize_t M = x.shape(0), K = x.shape(1), N = qweight.shape(0);
    if (bits != 4 && bits != 8) throw py::value_error("bits must be 4 or 8");
    if (group_size <= 0 || group_size % krasis::kHalf != 0 || K % group_size != 0)
        throw py::value_error("group_size must be a positive multiple of 32 dividing K");
    if (bits == 4 && K % krasis::kUnit != 0) throw py::value_error("INT4 needs K a multiple of 64");
    const float* xp = checked<float>(x, "x", {M, K});
    const uint8_t* qp = bits == 8
        ? reinterpret_cast<const uint8_t*>(checked<int8_t>(qweight, "qweight", {N, K}))
        : checked<uint8_t>(qweight, "qweight", {N, K / 2});
    const float* sp = checked<float>(scales, "scales", {N, K / group_size});
    float* op = const_cast<float*>(checked<float>(out, "out", {M, N}));
    if (!out.writeable()) throw py::value_error("out: not writeable");
    if (M == 0 || N == 0) return;
    py::gil_scoped_release release;
    self.linear(xp, int(M), qp, sp, int(N), int(K), bits, group_size, op);
}

uint64_t stream_read(MoeRunner& self, const py::buffer& buf) {
    const py::buffer_info info = buf.request();
    const size_t n_bytes = size_t(info.size) * size_t(info.itemsize);
    const auto* data = static_cast<const uint8_t*>(info.ptr);
    py::gil_scoped_release release;
    return self.stream_read(data, n_bytes);
}

// Activation rows as the kernels quantize them, with the selected ISA's routine (for tests).
py::tuple quantize_activations(const py::array& x, int group_size) {
    if (x.ndim() != 2) throw py::value_error("x must be 2-D [M, K]");
    const py::ssize_t M = x.shape(0), K = x.shape(1), G = group_size;
    if (group_size <= 0 || group_size % krasis::kHalf != 0 || K % group_size != 0)
        throw py::value_error("group_size must be a positive multiple of 32 dividing K");
    const float* xp = checked<float>(x, "x", {M, K});
    py::array_t<int8_t> q({M, K});
    py::array_t<float> scales({M, K / G});
    py::array_t<int32_t> sums({M, K / G});
    const krasis::KernelTable& kt = krasis::active_kernels();
    for (py::ssize_t m = 0; m < M; ++m)
        kt.quantize(xp + m * K, int(K), group_size, q.mutable_data(m), scales.mutable_data(m),
                    sums.mutable_data(m), nullptr);
    return py::make_tuple(q, scales, sums);
}

std::vector<std::string> supported_isas() {
    std::vector<std::string> out{"scalar"};
    if (krasis::kernels_avx2() != nullptr) out.emplace_back("avx2");
    if (krasis::kernels_avx512() != nullptr) out.emplace_back("avx512");
    return out;
}

void set_isa(const std::string& name) {
    if (!krasis::select_isa(name.c_str()))
        throw py::value_error("ISA '" + name + "' is unknown or not supported by this CPU");
}

}  // namespace

PYBIND11_MODULE(krasis_native, m) {
    m.doc() = "krasis CPU expert kernels: fused INT4/INT8 routed-expert MoE";
    m.attr("__version__") = "0.2.0";
    m.attr("LAYOUT_VERSION") = 1;
    m.def("isa", [] { return std::string(krasis::active_kernels().name); },
          "Instruction set the kernels dispatch to.");
    m.def("set_isa", &set_isa, py::arg("name"),
          "Force 'scalar', 'avx2', 'avx512' or 'auto' (ValueError if the CPU lacks it).");
    m.def("supported_isas", &supported_isas, "Instruction sets this CPU can run.");
    m.def("default_threads", &krasis::default_threads, "Usable cores minus one.");
    m.def("quantize_activations", &quantize_activations, py::arg("x"), py::arg("group_size"),
          "(q int8 [M, K], scales float32 [M, K/G], sums int32 [M, K/G]) of x float32 [M, K], "
          "as the selected ISA quantizes activations.");
    py::class_<MoeRunner>(m, "MoE")
        .def(py::init<int>(), py::arg("threads") = 0,
             "Fused MoE runner with its own thread pool (threads=0: usable cores minus one). "
             "ValueError if KRASIS_NATIVE_SPIN_US is not an integer in [0, 60000000].")
        .def_property_readonly("threads", &MoeRunner::threads)
        .def_property_readonly("spin_us", &MoeRunner::spin_us,
                               "Microseconds idle workers spin before they sleep "
                               "(KRASIS_NATIVE_SPIN_US, default 2000).")
        .def("forward", &moe_forward, py::arg("x"), py::arg("topk_ids"), py::arg("topk_weights"),
             py::arg("gate_q"), py::arg("gate_s"), py::arg("up_q"), py::arg("up_s"),
             py::arg("down_q"), py::arg("down_s"), py::arg("bits"), py::arg("group_size"),
             py::arg("out"),
             "out[M, D] = sum_k w[:, k] * down(SiLU(gate x) * up x) over the routed experts.")
        .def("linear", &linear, py::arg("x"), py::arg("qweight"), py::arg("scales"),
             py::arg("bits"), py::arg("group_size"), py::arg("out"),
             "out[M, N] = x[M, K] @ W.T for a quantized W [N, K] in the CPU layout.")
        .def("stream_read", &stream_read, py::arg("buffer"),
             "Sum a buffer's 64-bit words with the pool (read-bandwidth probe).");
}
