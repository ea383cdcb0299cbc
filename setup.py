"""Build the compiled hot paths (src/fastmta/message/_core.pyx, src/fastmta/smtp/_client.pyx).

Everything else lives in pyproject.toml. The extension is not optional: a
build that cannot compile it fails loudly rather than silently shipping the
slow pure-Python reference (which stays importable and is selected at run
time with FASTMTA_NO_EXTENSIONS=1).
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "fastmta.message._core",
        ["src/fastmta/message/_core.pyx"],
        extra_compile_args=["-O3"],
    ),
    Extension(
        "fastmta.smtp._client",
        ["src/fastmta/smtp/_client.pyx"],
        extra_compile_args=["-O3"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
        },
    )
)
