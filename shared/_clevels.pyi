# The compiled level check (_clevels.c); services.detector.books.ordered_levels is its reference.
from typing import Any

def ordered(levels: Any, descending: bool, /) -> bool | None: ...
