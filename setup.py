"""Builds the native CPU kernels (krasis_native); everything else is in pyproject.toml."""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

PACKAGE_DIRS = {"krasisd": "krasisd", "krasis": "client", "krasis_registry": "registry"}


def packages() -> list[str]:
    found = []
    for name, folder in PACKAGE_DIRS.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(folder)]
    return found


native = Pybind11Extension(
    "krasis_native",
    sorted(str(p) for p in __import__("pathlib").Path("native/src").glob("*.cpp")),
    cxx_std=17,
    extra_compile_args=["-O3", "-fno-strict-aliasing"],
)

setup(
    packages=packages(),
    package_dir=PACKAGE_DIRS,
    ext_modules=[native],
    cmdclass={"build_ext": build_ext},
)
