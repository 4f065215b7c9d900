"""Device discipline, checked statically so that GPU-only bugs fail on CPU in CI.

1. Product code never creates a tensor without saying where: every torch factory call passes `device=` (for host
   data, `device="cpu"` or devices.HOST says so on purpose). A factory without a device allocates on the CPU, which
   on a GPU run meets a CUDA embedding, a CUDA gather or an NCCL collective ("No backend type associated with device
   type cpu").
2. A tensor handed to a torch.distributed collective is never a freshly created one without a device (covered by
   1), nor made by `torch.tensor(...)`/`torch.zeros(...)` on the host on purpose (`device="cpu"` / HOST) - the
   collective input must come from devices.collective_device().

The allow-list below is short and says why.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mgs_megatron"

FACTORIES = {"empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "rand", "randn", "randint",
             "randperm", "eye", "linspace", "empty_strided", "Generator"}
COLLECTIVES = {"all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "send", "recv", "isend", "irecv", "reduce", "all_to_all_single"}

ALLOW_FILES = {
    "megatron/cpu_backend.py": "its purpose is redirecting device='cuda' to the CPU",
    "testing/tiny.py": "test helpers: host tensors that tests move themselves",
}
HOST_VALUES = {"'cpu'", '"cpu"', "HOST", "devices.HOST", "torch.device('cpu')", 'torch.device("cpu")'}


def _factory_calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            yield node


def _device_kw(call: ast.Call):
    return next((k.value for k in call.keywords if k.arg == "device"), None)


def _product_files():
    for path in sorted(PKG.rglob("*.py")):
        rel = str(path.relative_to(PKG))
        if rel not in ALLOW_FILES:
            yield rel, ast.parse(path.read_text())


def test_every_tensor_factory_names_its_device():
    bad = [f"{rel}:{c.lineno} torch.{c.func.attr}(...)" for rel, tree in _product_files() for c in _factory_calls(tree)
           if _device_kw(c) is None]
    assert not bad, "tensor factories without device= (say where the tensor lives):\n" + "\n".join(bad)


def _assignments(func: ast.AST) -> dict[str, ast.AST]:
    out = {}
    for node in ast.walk(func):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = node.value
    return out


def test_collective_inputs_are_not_host_tensors():
    bad = []
    for rel, tree in _product_files():
        for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            assigned = _assignments(func)
            for call in (n for n in ast.walk(func) if isinstance(n, ast.Call)):
                if not (isinstance(call.func, ast.Attribute) and call.func.attr in COLLECTIVES
                        and isinstance(call.func.value, ast.Name) and call.func.value.id in ("dist", "torch")):
                    continue
                args = [a for a in call.args if not isinstance(a, ast.Starred)]
                for arg in args[:2]:
                    source = assigned.get(arg.id) if isinstance(arg, ast.Name) else arg
                    if isinstance(source, ast.Call) and isinstance(source.func, ast.Attribute) \
                            and source.func.attr in FACTORIES:
                        dev = _device_kw(source)
                        if dev is None or ast.unparse(dev) in HOST_VALUES:
                            bad.append(f"{rel}:{call.lineno} dist.{call.func.attr}({ast.unparse(arg)}) on a host "
                                       f"tensor made at line {source.lineno}")
    assert not bad, "collective inputs must be made on devices.collective_device():\n" + "\n".join(bad)


def test_the_check_catches_the_bugs_it_is_for():
    """The checks themselves, on the kind of code the GPU review found (rl/trainer.py's stop flag, stats)."""
    code = ("def f(dist, stop):\n"
            "    flag = torch.tensor([1.0 if stop else 0.0])\n"
            "    dist.all_reduce(flag)\n"
            "    stats = torch.zeros(3, dtype=torch.float64)\n")
    tree = ast.parse(code)
    assert [c.lineno for c in _factory_calls(tree) if _device_kw(c) is None] == [2, 4]
    func = tree.body[0]
    assigned = _assignments(func)
    call = next(n for n in ast.walk(func) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "all_reduce")
    assert _device_kw(assigned[call.args[0].id]) is None
