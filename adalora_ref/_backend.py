"""The one module that knows about array libraries.

Everything else in adalora_ref takes its namespace from its inputs through `namespace(...)` and
uses only the array API standard. This module owns:

- finding the namespace of a set of arrays, and refusing a mix of libraries;
- the checks every public function shares (shape, dtype, finiteness of arrays; finite real numbers
  and step numbers among plain values), with errors that name the offending value, and `shown`,
  the repr those errors print a value with;
- moving arrays to and from NumPy (for random initialisation and for files);
- looking up a backend by name (`numpy`, `array_api_strict`, `torch`, `cupy`) for the CLI and tests.

It does not own any AdaLoRA math.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import numbers
import reprlib
from typing import Any

import array_api_compat
import numpy as np

Array = Any
"""Any array of a library that implements the array API standard (numpy, cupy, torch, ...)."""

BACKENDS = ("numpy", "array_api_strict", "torch", "cupy")
INT64_MAX = 2**63 - 1
"""The largest step number or integer setting accepted: what a port stores in an int64."""
INT64_REQUIREMENT = "an integer < 2**63 (a port stores it in int64)"
"""What an error says of an integer above INT64_MAX."""


def namespace(*arrays: Array | None) -> Any:
    """The array API namespace shared by `arrays` (None entries are ignored).

    Raises TypeError naming the libraries when the arrays come from more than one.
    """
    present = [a for a in arrays if a is not None]
    if not present:
        raise TypeError("namespace() needs at least one array")
    try:
        return array_api_compat.array_namespace(*present)
    except TypeError as err:
        kinds = sorted({type(a).__module__ + "." + type(a).__qualname__ for a in present})
        raise TypeError(f"arrays come from different libraries or are not arrays: {kinds}") from err


def get_backend(name: str) -> Any:
    """The array API namespace of the library called `name` (one of BACKENDS).

    Raises ValueError for an unknown name and ImportError (with the reason) when the library is
    not installed, or when cupy is installed but no GPU can be used.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "numpy":
        return array_api_compat.array_namespace(np.zeros(0))
    if name == "array_api_strict":
        return importlib.import_module("array_api_strict")
    if name == "torch":
        torch = importlib.import_module("torch")
        return array_api_compat.array_namespace(torch.zeros(0))
    cupy = importlib.import_module("cupy")
    try:
        probe = cupy.zeros(1)
    except Exception as err:  # cupy raises its own CUDA error types when no GPU is usable
        raise ImportError(f"cupy is installed but no GPU is usable: {err}") from err
    return array_api_compat.array_namespace(probe)


def dtype_by_name(xp: Any, name: str) -> Any:
    """`xp.float32` or `xp.float64` from the strings "float32" / "float64"."""
    if name not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {name!r}")
    return getattr(xp, name)


_DTYPE_NAMES: dict[Any, str] = {}  # dtype -> "float32" / "float64": a few entries, one per dtype object met


def dtype_name(dtype: Any) -> str:
    """ "float32" or "float64" for a floating dtype of any backend (remembered per dtype: the
    checks ask on every call, and str() of a dtype is the slow part)."""
    try:
        return _DTYPE_NAMES[dtype]
    except (KeyError, TypeError):  # not seen yet, or a dtype that cannot be a key
        pass
    text = str(dtype)
    for name in ("float32", "float64"):
        if text.endswith(name):
            with contextlib.suppress(TypeError):  # an unhashable dtype is not remembered
                _DTYPE_NAMES[dtype] = name
            return name
    raise TypeError(f"only float32 and float64 are supported, got dtype {dtype}")


def to_numpy(x: Array) -> np.ndarray:
    """A NumPy copy (or view) of `x`, from any backend, host or GPU."""
    if isinstance(x, np.ndarray | np.generic | float | int):
        return np.asarray(x)
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    return np.from_dlpack(x)


def from_numpy(xp: Any, value: np.ndarray, *, dtype: Any = None, device: Any = None) -> Array:
    """`value` as an array of namespace `xp`, with the given dtype and device."""
    if dtype is None:
        dtype = getattr(xp, dtype_name(value.dtype))
    return xp.asarray(np.ascontiguousarray(value), dtype=dtype, device=device)


def to_bool_list(x: Array) -> list[bool]:
    """A 1-D boolean array of any backend as a Python list of bool."""
    return [bool(v) for v in to_numpy(x).tolist()]


def device_of(x: Array) -> Any:
    return array_api_compat.device(x)


def check_shape(name: str, x: Array, shape: tuple[int, ...]) -> None:
    """Raise ValueError naming `name` when `x.shape != shape`."""
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")


def check_dtype(name: str, x: Array, dtype: Any) -> None:
    """Raise TypeError naming `name` when `x.dtype != dtype`."""
    if x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype}, expected {dtype} (dtypes are never mixed)")


def check_finite(name: str, x: Array) -> None:
    """Raise ValueError naming `name` when `x` holds NaN or Inf."""
    xp = namespace(x)
    if not bool(xp.all(xp.isfinite(x))):
        bad = int(xp.sum(xp.astype(~xp.isfinite(x), xp.int64)))
        raise ValueError(f"{name} holds {bad} non-finite value(s) (NaN or Inf)")


def is_integer(value: object) -> bool:
    """Whether `value` is an integer of any library (int, np.int64, ...) and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """Whether `value` is a real number of any library (int, float, np.float32, ...) and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite_real(value: object) -> bool:
    """Whether `value` is a real number (see is_real) that is finite as a float. False for bool, str,
    None, NaN, +-inf and an int too large to be a float."""
    if not is_real(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range
        return False


def plain_real(value: numbers.Real) -> int | float:
    """A real number as a plain Python int or float (an int stays an int, as JSON keeps it).

    Plain, because a NumPy float64 scalar in the arithmetic would promote a float32 array to float64.
    """
    return int(value) if isinstance(value, numbers.Integral) else float(value)


class _ShortRepr(reprlib.Repr):
    """repr() for error messages: long or deep values cut short, an integer too long to print described."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 6, 200, 200, 60
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = 20

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 200:
            return f"<{'a negative' if x < 0 else 'an'} integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_SHORT_REPR = _ShortRepr()


def shown(value: object) -> str:
    """`repr(value)` for an error message, cut short when long or deep; an integer of more than 200 bits
    is described ("<an integer of 1329 bits>"): Python refuses to print one of more than 4300 digits."""
    return _SHORT_REPR.repr(value)


def check_step(name: str, value: object) -> int:
    """A step number as a plain int: any integral type but bool, from 0 (step 0 is a step) to INT64_MAX.

    Raises TypeError naming `name` for anything but an integer (2.0, "3", True) and ValueError for a
    negative one or one beyond int64.
    """
    if not is_integer(value):
        raise TypeError(f"{name} must be an integer >= 0, got {shown(value)} of type {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {shown(value)}")
    if value > INT64_MAX:
        raise ValueError(f"{name} must be {INT64_REQUIREMENT}, got {shown(value)}")
    return int(value)


def dtype_name_or_raise(name: str, x: Array) -> str:
    try:
        return dtype_name(x.dtype)
    except TypeError:
        raise TypeError(f"{name} has dtype {x.dtype}; only float32 and float64 are supported") from None
