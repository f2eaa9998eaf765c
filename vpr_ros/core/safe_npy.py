"""Read ``.npy`` files, including object arrays, without running code from the file.

``np.load(allow_pickle=True)`` unpickles: a crafted file can call any Python function. Object
arrays (``dtype=object``, e.g. VPR-Bench's ``ground_truth_new.npy``) are stored as a pickle, so
:func:`load_npy` reads them with a small interpreter of its own. The stdlib ``pickletools.genops``
only *parses* the opcode stream; this module gives the opcodes their meaning for a closed set of
values and never calls anything the file names:

* plain values: ``None``, bools, ints, floats, str, bytes, lists, tuples;
* numpy arrays (``numpy[._core|.core].multiarray._reconstruct`` of ``numpy.ndarray``, or protocol 5's
  ``numeric._frombuffer`` of in-band bytes), numeric or object dtype, and numpy numeric scalars
  (``multiarray.scalar``);
* ``numpy.dtype`` for the simple kinds ``b i u f ? O``, and ``_codecs.encode`` of latin-1 text
  (how Python 2 era pickles carry raw bytes).

Anything else (dicts, sets, other globals, persistent ids, out-of-band buffers) is refused with
a :class:`DatasetError` naming the file. Plain numeric ``.npy`` files go to
``np.load(allow_pickle=False)``.
"""

from __future__ import annotations

import math
import os
import pickletools
import re
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from vpr_ros.core.errors import DatasetError

#: The largest file read (bytes); a ground-truth list is far smaller.
MAX_BYTES = 512 * 1024 * 1024

_MULTIARRAY = ("numpy.core.multiarray", "numpy._core.multiarray")
_DTYPE_TEXT = re.compile(r"^[|<>=]?[biufO?][0-9]{0,2}$")


class _Bad(Exception):
    """A reason the pickle stream is refused (turned into a DatasetError with the path)."""


class _Global:
    """A callable the stream named that this reader gives a meaning to (never the real one)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind


class _DType:
    """A dtype under construction (BUILD may still change its byte order)."""

    def __init__(self, value: np.dtype) -> None:
        self.value = value


class _Array:
    """An array under construction: made by ``_reconstruct``, filled by BUILD."""

    def __init__(self) -> None:
        self.value: np.ndarray | None = None


_ALLOWED_GLOBALS = {
    **{(m, "_reconstruct"): "reconstruct" for m in _MULTIARRAY},
    **{(m, "scalar"): "scalar" for m in _MULTIARRAY},
    **{(m, "_frombuffer"): "frombuffer" for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    ("_codecs", "encode"): "encode",
}

_PUSH_ARG = {
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
    "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "BYTEARRAY8",
}


def load_npy(path: str | os.PathLike) -> np.ndarray:
    """The array stored in ``path`` (numeric or object dtype), read without unpickling.

    Raises DatasetError naming the file for a missing, truncated or malformed file, and for an
    object array holding anything but the values listed in the module docstring.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if size > MAX_BYTES:
        raise DatasetError(f"{path}: {size} bytes, more than the {MAX_BYTES} this reader accepts")
    try:
        with open(path, "rb") as f:
            version = npy_format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = npy_format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = npy_format.read_array_header_2_0(f)
            else:
                raise _Bad(f"npy format version {version[0]}.{version[1]} is not supported (1.0 or 2.0)")
            body = f.read()
    except _Bad as exc:
        raise DatasetError(f"{path}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not a valid .npy file ({exc})") from None
    if not dtype.hasobject:
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{path}: not a valid .npy file ({exc})") from None
    if dtype != np.dtype(object):
        raise DatasetError(f"{path}: structured dtype {dtype} with objects is not supported")
    try:
        value = _unpickle(body)
    except _Bad as exc:
        raise DatasetError(f"{path}: refused: {exc}") from None
    except Exception as exc:  # any parse failure of untrusted bytes is one error line
        raise DatasetError(f"{path}: corrupt object array ({type(exc).__name__}: {exc})") from None
    if not isinstance(value, np.ndarray):
        raise DatasetError(f"{path}: holds a {type(value).__name__}, not an array")
    if value.shape != tuple(shape):
        raise DatasetError(f"{path}: header says shape {tuple(shape)}, data has {value.shape}")
    return value


def _unpickle(data: bytes) -> Any:
    """Interpret the allowed subset of the pickle protocol (see the module docstring)."""
    stack: list[Any] = []
    marks: list[list[Any]] = []
    memo: dict[int, Any] = {}

    def pop_mark() -> list[Any]:
        nonlocal stack
        if not marks:
            raise _Bad("unbalanced MARK")
        items, stack = stack, marks.pop()
        return items

    def pop() -> Any:
        if not stack:
            raise _Bad("stack underflow")
        return stack.pop()

    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in _PUSH_ARG:
            stack.append(arg)
        elif name in ("PROTO", "FRAME"):
            continue
        elif name == "STOP":
            if len(stack) != 1 or marks:
                raise _Bad("stream ends with an unbalanced stack")
            return _resolve(stack[0])
        elif name == "NONE":
            stack.append(None)
        elif name in ("NEWTRUE", "NEWFALSE"):
            stack.append(name == "NEWTRUE")
        elif name == "MARK":
            marks.append(stack)
            stack = []
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name == "LIST":
            items = pop_mark()  # first: pop_mark rebinds ``stack``
            stack.append(items)
        elif name == "APPEND":
            value = pop()
            _as_list(stack).append(value)
        elif name == "APPENDS":
            items = pop_mark()
            _as_list(stack).extend(items)
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name == "TUPLE":
            items = pop_mark()
            stack.append(tuple(items))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            if len(stack) < n:
                raise _Bad("stack underflow")
            items = tuple(stack[-n:])
            del stack[-n:]
            stack.append(items)
        elif name == "POP":
            if stack:
                stack.pop()
            else:
                pop_mark()
        elif name == "POP_MARK":
            pop_mark()
        elif name == "DUP":
            stack.append(stack[-1] if stack else pop())
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else pop()
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = stack[-1] if stack else pop()
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if int(arg) not in memo:
                raise _Bad(f"memo key {arg} used before it was set")
            stack.append(memo[int(arg)])
        elif name == "GLOBAL":
            module, _, attr = str(arg).partition(" ")
            stack.append(_lookup(module, attr))
        elif name == "STACK_GLOBAL":
            attr, module = pop(), pop()
            if not (isinstance(module, str) and isinstance(attr, str)):
                raise _Bad("STACK_GLOBAL without module and name strings")
            stack.append(_lookup(module, attr))
        elif name == "REDUCE":
            args, func = pop(), pop()
            if not isinstance(func, _Global) or not isinstance(args, tuple):
                raise _Bad("REDUCE of something that is not an allowed callable")
            stack.append(_call(func.kind, args))
        elif name == "BUILD":
            state = pop()
            if not stack:
                raise _Bad("stack underflow")
            _build(stack[-1], state)
        else:
            raise _Bad(f"pickle opcode {name} is not allowed")
    raise _Bad("stream has no STOP")


def _as_list(stack: list[Any]) -> list[Any]:
    if not stack or not isinstance(stack[-1], list):
        raise _Bad("APPEND to something that is not a list")
    return stack[-1]


def _lookup(module: str, attr: str) -> _Global:
    kind = _ALLOWED_GLOBALS.get((module, attr))
    if kind is None:
        raise _Bad(f"global {module}.{attr} is not allowed")
    return _Global(kind)


def _call(kind: str, args: tuple) -> Any:
    if kind == "reconstruct":
        if len(args) != 3 or not (isinstance(args[0], _Global) and args[0].kind == "ndarray"):
            raise _Bad("_reconstruct of something other than numpy.ndarray")
        return _Array()
    if kind == "dtype":
        if not args or not isinstance(args[0], str) or not _DTYPE_TEXT.match(args[0]):
            raise _Bad(f"dtype {args[:1]!r} is not a simple numeric or object dtype")
        return _DType(np.dtype(args[0]))
    if kind == "scalar":
        if len(args) != 2 or not isinstance(args[0], _DType):
            raise _Bad("numpy scalar without a dtype")
        dtype, raw = args[0].value, _raw_bytes(args[1])
        if dtype.hasobject or len(raw) != dtype.itemsize:
            raise _Bad(f"numpy scalar of dtype {dtype} with {len(raw)} bytes")
        return np.frombuffer(raw, dtype=dtype)[0].item()
    if kind == "frombuffer":  # protocol 5: (data, dtype, shape, order)
        if len(args) != 4 or not isinstance(args[1], _DType) or args[3] not in ("C", "F"):
            raise _Bad("_frombuffer without (data, dtype, shape, order)")
        target = _Array()
        _build(target, (args[2], args[1], args[3] == "F", args[0]))
        return target
    if kind == "encode":
        if len(args) != 2 or not isinstance(args[0], str) or args[1] not in ("latin1", "latin-1"):
            raise _Bad("_codecs.encode other than latin-1 text")
        return args[0].encode("latin-1")
    raise _Bad(f"{kind} cannot be called")


def _raw_bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):  # Python 2 'str' payloads arrive as latin-1 text
        return value.encode("latin-1")
    raise _Bad(f"expected raw bytes, got {type(value).__name__}")


def _build(target: Any, state: Any) -> None:
    if isinstance(target, _DType):
        if not isinstance(state, tuple) or len(state) < 2:
            raise _Bad("dtype state is not a tuple")
        order = state[1]
        if order in ("<", ">"):
            target.value = target.value.newbyteorder(order)
        elif order not in ("|", "="):
            raise _Bad(f"dtype byte order {order!r}")
        return
    if not isinstance(target, _Array) or target.value is not None:
        raise _Bad("BUILD of something that is not a new array")
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise _Bad("array state is not a (version, shape, dtype, fortran, data) tuple")
    shape, dtype, fortran, data = state[-4:]
    if not (isinstance(shape, tuple) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise _Bad(f"array shape {shape!r}")
    if not isinstance(dtype, _DType):
        raise _Bad("array without a dtype")
    count = math.prod(shape)
    order = "F" if fortran else "C"
    if dtype.value.hasobject:
        if not isinstance(data, list) or len(data) != count:
            raise _Bad(f"object array of shape {shape} with {len(data) if isinstance(data, list) else '?'} "
                       "items")
        out = np.empty(count, dtype=object)
        for i, item in enumerate(data):
            out[i] = _resolve(item)
        target.value = out.reshape(shape, order=order)
        return
    raw = _raw_bytes(data)
    if len(raw) != count * dtype.value.itemsize:
        raise _Bad(f"array of shape {shape} and dtype {dtype.value} with {len(raw)} data bytes")
    target.value = np.frombuffer(raw, dtype=dtype.value).reshape(shape, order=order).copy()


def _resolve(value: Any) -> Any:
    """Replace finished arrays by their values; refuse dtypes or callables left as data."""
    if isinstance(value, _Array):
        if value.value is None:
            raise _Bad("array used before it was filled")
        return value.value
    if isinstance(value, list):
        return [_resolve(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_resolve(v) for v in value)
    if isinstance(value, (_DType, _Global)):
        raise _Bad("a dtype or callable stored as a value")
    return value
