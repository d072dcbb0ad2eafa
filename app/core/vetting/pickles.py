"""The pickle opcode vetter: which globals a pickle may reference, and how a stream is checked against them.

Opcodes are walked with pickletools and never executed, so this module unpickles nothing; it is pure stdlib
(the API process imports it) and never imports torch, onnx or numpy. It also holds the small "is this a
pickle" checks that format detection and pt2 vetting use on a file's first bytes.
"""

from __future__ import annotations

import io
import pickletools
from typing import IO

from app.core.vetting.refusals import UnsafeModelFile

_PICKLE_PROTO = 0x80
_HIGHEST_PICKLE_PROTOCOL = 5

_STORAGE_TYPES = (
    "Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
    "ComplexFloat", "ComplexDouble",
)  # fmt: skip
_DTYPES = (
    "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
)  # fmt: skip
# What torch.save needs for tensors, parameters and plain containers, and nothing
# that can reach code: no module classes, no getattr/eval, no numpy.
# "__builtin__" is the protocol-2 spelling that unpicklers map to "builtins".
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch._tensor", "_rebuild_from_type_v2"),
        ("torch", "Tensor"),
        ("torch", "Size"),
        ("torch", "device"),
        ("torch.serialization", "_get_layout"),
        ("torch.storage", "UntypedStorage"),
        *(("torch", f"{kind}Storage") for kind in _STORAGE_TYPES),
        *(("torch", dtype) for dtype in _DTYPES),
        *(
            (module, name)
            for module in ("builtins", "__builtin__")
            for name in ("set", "frozenset", "slice", "complex")
        ),
    }
)

_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
)
_MEMO_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_MEMO_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
# EXT* fetch callables from the copyreg extension registry: globals we cannot name.
_EXTENSION_OPS = frozenset({"EXT1", "EXT2", "EXT4"})
_MARK = object()  # a MARK on the simulated stack
_UNKNOWN = object()  # a value we do not track: only strings pushed as literals are


def scan_pickle(data: bytes, where: str) -> None:
    """Refuse a pickle stream unless every global it references is allowlisted.

    Opcodes are walked with pickletools, never executed. A stream may hold several
    pickles back to back (legacy torch.save does), so all are scanned and bytes
    that do not parse are refused.
    """
    stream = io.BytesIO(data)
    try:
        while stream.tell() < len(data):
            _scan_one_pickle(stream, where)
    except ValueError as exc:
        raise UnsafeModelFile(f"pickle member {where!r} is malformed ({exc}); refusing it") from exc


def starts_with_proto(head: bytes) -> bool:
    """Protocol 2+ pickles (and legacy torch.save streams) open with the PROTO opcode."""
    return len(head) >= 2 and head[0] == _PICKLE_PROTO and head[1] <= _HIGHEST_PICKLE_PROTOCOL


def parses_as_pickle(head: bytes) -> bool:
    """Protocol 0/1 pickles have no magic number, so try to parse the head up to STOP."""
    try:
        for _ in pickletools.genops(head):
            pass
    except ValueError:
        return False
    return True


def _scan_one_pickle(stream: IO[bytes], where: str) -> None:
    """Check one pickle (up to STOP), simulating just enough stack and memo to name its globals."""
    stack: list[object] = []
    memo: dict[int, object] = {}
    for opcode, arg, _position in pickletools.genops(stream):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            module, _, attribute = arg.partition(" ")
            _check_global(module, attribute, where)
        elif name == "STACK_GLOBAL":
            if len(stack) < 2 or not all(isinstance(item, str) for item in stack[-2:]):
                raise UnsafeModelFile(
                    f"pickle member {where!r} uses STACK_GLOBAL on values that are not plain strings, "
                    "which is not allowed"
                )
            _check_global(stack[-2], stack[-1], where)
        elif name in _EXTENSION_OPS:
            raise UnsafeModelFile(f"pickle member {where!r} uses the {name} opcode, which is not allowed")

        if name == "MEMOIZE":
            memo[len(memo)] = _stack_top(stack, name)
        elif name in _MEMO_PUT_OPS:
            memo[arg] = _stack_top(stack, name)
        elif name in _MEMO_GET_OPS:
            if arg not in memo:
                raise ValueError(f"{name} of unknown memo key {arg}")
            stack.append(memo[arg])
        elif name in _STRING_OPS:
            stack.append(arg)
        else:
            _apply_stack_effect(opcode, stack)


def _check_global(module: object, attribute: object, where: str) -> None:
    if (module, attribute) not in ALLOWED_GLOBALS:
        raise UnsafeModelFile(f"pickle member {where!r} references {f'{module}.{attribute}'!r}, which is not allowed")


def _stack_top(stack: list[object], name: str) -> object:
    if not stack or stack[-1] is _MARK:
        raise ValueError(f"{name} with an empty stack")
    return stack[-1]


def _apply_stack_effect(opcode: pickletools.OpcodeInfo, stack: list[object]) -> None:
    """Pop and push as pickletools documents for `opcode`, keeping tracked strings at their true depth."""
    before = opcode.stack_before
    if pickletools.markobject in before:
        while True:
            if not stack:
                raise ValueError(f"{opcode.name} without a MARK")
            if stack.pop() is _MARK:
                break
        count = before.index(pickletools.markobject)
    elif opcode.name == "POP" and stack and stack[-1] is _MARK:
        stack.pop()  # POP on an empty frame discards the MARK itself
        count = 0
    else:
        count = len(before)
    for _ in range(count):
        if not stack or stack[-1] is _MARK:
            raise ValueError(f"{opcode.name} on a stack that is too short")
        stack.pop()
    stack.extend(_MARK if item is pickletools.markobject else _UNKNOWN for item in opcode.stack_after)
