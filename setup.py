"""The compiled modules: the collector's L2 order book (``services/collector/_cbook.c``) and the
detector's check of a book's levels (``shared/_clevels.c``).

Everything else is in pyproject.toml. Both are optional: where they cannot be built (no C
compiler), their callers run the pure-Python references they are tested against.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "services.collector._cbook",
            ["services/collector/_cbook.c"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
        Extension("shared._clevels", ["shared/_clevels.c"], extra_compile_args=["-O2"], optional=True),
    ],
)
