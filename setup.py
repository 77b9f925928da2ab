"""Builds ambient's two compiled parts into one wheel: the Cython hot paths (ambient._fast) and
the PyO3 crate (ambient._core, from rust/). `pip install .` runs this; the Rust crate is always a
release build with its locked dependencies."""

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools_rust import Binding, RustExtension

cython_modules = cythonize(
    [
        Extension(
            "ambient._fast.hbone_request",
            ["ambient/_fast/hbone_request.pyx"],
            # Python's CFLAGS carry -g: keep the shipped extension free of debug sections, as
            # the Rust one is (Cargo's release profile strips them).
            extra_link_args=["-Wl,--strip-debug"],
        )
    ],
    compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
)

setup(
    ext_modules=cython_modules,
    rust_extensions=[
        RustExtension(
            "ambient._core",
            path="rust/Cargo.toml",
            binding=Binding.PyO3,
            cargo_manifest_args=["--locked"],
            debug=False,
        )
    ],
    zip_safe=False,
)
