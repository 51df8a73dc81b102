"""What a candidate program may contain: a whitelist over Python's AST, checked before anything runs.

The executor (`execution.executor`) is a security boundary with two
layers. This is the first: a program must parse, and every node must be of
an allowed kind, so imports, dunder access (`().__class__.__mro__` and the
like), `global`, `with`, `async`, and calls to anything outside `BUILTINS`
by name (`open`, `eval`, `getattr`, ...) are refused with a named reason
before a process is started. The second layer is the child process's
limits (CPU, memory, file size, wall time, recursion), for what a whitelist
cannot see: an infinite loop or a huge list is legal Python.
"""

from __future__ import annotations

import ast
import threading

# Names a program may read besides its own: plain, side-effect-free builtins.
BUILTINS = ("abs", "all", "any", "bool", "dict", "divmod", "enumerate", "filter", "float", "int", "isinstance",
            "len", "list", "map", "max", "min", "pow", "range", "reversed", "round", "set", "sorted", "str", "sum",
            "tuple", "zip", "True", "False", "None", "ValueError", "ZeroDivisionError", "IndexError", "KeyError",
            "Exception")

_ALLOWED = (
    ast.Module, ast.FunctionDef, ast.arguments, ast.arg, ast.Return, ast.Assign, ast.AugAssign, ast.AnnAssign,
    ast.For, ast.While, ast.If, ast.Break, ast.Continue, ast.Pass, ast.Expr, ast.Assert, ast.Raise, ast.Try,
    ast.ExceptHandler, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Compare, ast.IfExp, ast.Call, ast.keyword,
    ast.Constant, ast.Name, ast.Load, ast.Store, ast.Del, ast.Delete, ast.Attribute, ast.Subscript, ast.Slice,
    ast.List, ast.Tuple, ast.Dict, ast.Set, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp,
    ast.comprehension, ast.Starred, ast.Lambda, ast.JoinedStr, ast.FormattedValue,
    ast.And, ast.Or, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.LShift, ast.RShift,
    ast.BitOr, ast.BitXor, ast.BitAnd, ast.Invert, ast.Not, ast.UAdd, ast.USub, ast.Eq, ast.NotEq, ast.Lt,
    ast.LtE, ast.Gt, ast.GtE, ast.Is, ast.IsNot, ast.In, ast.NotIn)
# Methods a program may call on its values (lists, dicts, strings, sets); anything else by attribute is refused.
METHODS = ("append", "extend", "insert", "pop", "remove", "index", "count", "sort", "reverse", "copy", "clear",
           "get", "keys", "values", "items", "update", "setdefault", "add", "discard", "union", "intersection",
           "difference", "split", "join", "strip", "lstrip", "rstrip", "startswith", "endswith", "lower", "upper",
           "replace", "find", "isdigit", "isalpha")
MAX_SOURCE_CHARS = 20_000
# CPython 3.11's parser is not safe to call from several threads at once (`run_many` checks programs in a
# thread pool): concurrent calls raised "SystemError: AST constructor recursion depth mismatch" on valid
# programs. One parse at a time; a parse takes well under a millisecond.
_PARSE_LOCK = threading.Lock()


def refusal(source: str, entry: str) -> str | None:
    """None if `source` may run and defines the function `entry`; else why not, in a few words."""
    if not isinstance(source, str):
        return "not_source: the program is not a string"
    if len(source) > MAX_SOURCE_CHARS:
        return f"too_long: {len(source)} characters (limit {MAX_SOURCE_CHARS})"
    try:
        with _PARSE_LOCK:
            tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError, SystemError) as e:  # ValueError: null bytes
        return f"syntax: {type(e).__name__}: {e}"[:200]
    defined = set()
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED):
            return f"forbidden_syntax: {type(node).__name__} at line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Name) and node.id.startswith("_"):
            return f"forbidden_name: {node.id!r}"
        if isinstance(node, ast.Attribute) and node.attr not in METHODS:
            return f"forbidden_attribute: .{node.attr}"
        if isinstance(node, (ast.FunctionDef, ast.arg)):
            name = node.name if isinstance(node, ast.FunctionDef) else node.arg
            if name.startswith("_"):
                return f"forbidden_name: {name!r}"
            defined.add(name)
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
    for node in ast.walk(tree):  # a name read must be a whitelisted builtin or one of the program's own
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id not in BUILTINS and node.func.id not in defined:
            return f"forbidden_call: {node.func.id}()"
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) \
                and node.id not in BUILTINS and node.id not in defined:
            return f"unknown_name: {node.id!r}"
    if not any(isinstance(n, ast.FunctionDef) and n.name == entry for n in tree.body):
        return f"no_entry: the program defines no top-level function {entry!r}"
    return None
