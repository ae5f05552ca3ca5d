"""The one compiled module: the collector's L2 order book (``services/collector/_cbook.c``).

Everything else is in pyproject.toml. The extension is optional: where it cannot be built
(no C compiler), ``services.collector.book`` falls back to its pure-Python reference.
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
    ],
)
