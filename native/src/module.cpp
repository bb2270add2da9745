// krasis_native: CPU kernels for routed experts (pybind11 bindings).
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(krasis_native, m) {
    m.doc() = "krasis CPU expert kernels";
    m.attr("__version__") = "0.1.0";
}
