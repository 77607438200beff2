"""Real-kernel tests for pixell_kernel_runtime/execution/kernel_side.py (no mocks).

One ipykernel is started for the module; the helper module's SOURCE is executed in it silently,
exactly as the server does, and everything is read back through execute_reply user_expressions.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from jupyter_client.manager import start_new_kernel

SRC_PATH = Path(__file__).resolve().parents[1] / "pixell_kernel_runtime/execution/kernel_side.py"
SRC = SRC_PATH.read_text(encoding="utf-8")
COLLECT = {"r": "__pixell__.collect()"}
TIMEOUT = 30


def bootstrap_code(src: str = SRC) -> str:
    return (
        "import sys, types\n"
        '__m = types.ModuleType("__pixell__"); '
        f'exec(compile({src!r}, "<pixell>", "exec"), __m.__dict__); '
        'sys.modules["__pixell__"] = __m; __pixell__ = __m; __pixell__.install(); del __m\n'
    )


def run(kc, code, *, silent=False, user_expressions=None):
    """Execute ``code``; return (reply content, captured stdout, iopub message types)."""
    stdout, types_seen = [], []

    def hook(msg):
        types_seen.append(msg["msg_type"])
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            stdout.append(msg["content"]["text"])

    reply = kc.execute_interactive(
        code,
        silent=silent,
        user_expressions=COLLECT if user_expressions is None else user_expressions,
        timeout=TIMEOUT,
        output_hook=hook,
    )
    return reply["content"], "".join(stdout), types_seen


def expr_data(content, key="r"):
    assert content["status"] == "ok", content
    entry = content["user_expressions"][key]
    assert entry["status"] == "ok", entry
    return entry["data"]


def collected(content, key="r"):
    """The payload from application/json; text/plain must carry the same JSON."""
    data = expr_data(content, key)
    payload = data["application/json"]
    assert json.loads(data["text/plain"]) == payload
    return payload


def collect_after(kc, code, **kwargs):
    content, _, _ = run(kc, code, **kwargs)
    return collected(content)


@pytest.fixture(scope="module")
def kc():
    km, client = start_new_kernel(kernel_name="python3", startup_timeout=60)
    try:
        content, out, seen = run(client, bootstrap_code(), silent=True, user_expressions={})
        assert content["status"] == "ok", content
        assert out == "" and "stream" not in seen and "execute_result" not in seen
        yield client
    finally:
        client.stop_channels()
        km.shutdown_kernel(now=True)


def test_import_is_stdlib_only_and_side_effect_free():
    code = (
        "import sys, types\n"
        "m = types.ModuleType('__pixell__')\n"
        f"exec(compile({SRC!r}, '<pixell>', 'exec'), m.__dict__)\n"
        "heavy = [n for n in ('numpy', 'pandas', 'IPython') if n in sys.modules]\n"
        "print(heavy)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_user_expression_renders_application_json(kc):
    data = expr_data(run(kc, "pass")[0])
    assert isinstance(data["application/json"], dict)
    assert set(data["application/json"]) == {"has_result", "result", "result_source"}
    assert json.loads(data["text/plain"]) == data["application/json"]


def test_install_is_idempotent_even_after_rebootstrap(kc):
    count = (
        "[sum(1 for cb in get_ipython().events.callbacks[e]"
        " if getattr(cb, '_pixell_hook', None) or"
        " getattr(getattr(cb, '__wrapped__', None), '_pixell_hook', None)) "
        "for e in ('pre_run_cell', 'post_run_cell')]"
    )
    run(kc, "__pixell__.install(); __pixell__.install()", silent=True, user_expressions={})
    content, _, _ = run(kc, bootstrap_code(), silent=True, user_expressions={"n": count})
    assert expr_data(content, "n")["text/plain"] == "[1, 1]"
    assert collect_after(kc, "result = 'still works'")["result"] == "still works"


def test_seed_case(kc):
    content, out, _ = run(kc, 'result = 2 + 2\nprint(f"The answer is {result}")')
    assert out == "The answer is 4\n"
    assert collected(content) == {"has_result": True, "result": 4, "result_source": "result"}


def test_last_expression(kc):
    payload = collect_after(kc, "x = 3\nx * 7")
    assert payload == {"has_result": True, "result": 21, "result_source": "expression"}
    assert collect_after(kc, "x * 7;")["has_result"] is False  # semicolon silences the value


def test_old_result_does_not_leak(kc):
    assert collect_after(kc, "result = 'old'")["result"] == "old"
    assert collect_after(kc, "y = 1") == {
        "has_result": False,
        "result": None,
        "result_source": None,
    }
    assert collect_after(kc, "y + 1") == {
        "has_result": True,
        "result": 2,
        "result_source": "expression",
    }
    # Mutating without rebinding is not binding.
    assert collect_after(kc, "result = [1]")["result"] == [1]
    assert collect_after(kc, "result.append(2)")["has_result"] is False
    # Binding inside a function body or a comprehension target is not a module-level store.
    assert collect_after(kc, "def f():\n    result = 9\n    return result\n")["has_result"] is False
    assert collect_after(kc, "[result for result in range(3)]")["result_source"] == "expression"
    assert collect_after(kc, "del result")["has_result"] is False


def test_rebinding_same_object_is_detected_via_ast(kc):
    assert collect_after(kc, "result = 5")["result"] == 5
    assert collect_after(kc, "result = result") == {
        "has_result": True,
        "result": 5,
        "result_source": "result",
    }
    assert collect_after(kc, "result = 2 + 3")["result_source"] == "result"  # cached small int
    assert collect_after(kc, "if True:\n    (result := 5)\n")["result_source"] == "result"
    assert collect_after(kc, "for result in [5]: pass")["result_source"] == "result"
    assert collect_after(kc, "from math import pi as result")["result"] == pytest.approx(3.14159)
    assert collect_after(kc, "result += 0")["result_source"] == "result"


def test_error_cell_has_no_user_expressions(kc):
    content, _, _ = run(kc, "result = 1\n1/0")
    assert content["status"] == "error"
    assert content["ename"] == "ZeroDivisionError"
    assert content["user_expressions"] == {}


def test_dataframe_and_series(kc):
    code = (
        "import pandas as pd, numpy as np\n"
        "result = pd.DataFrame({'a': range(250), 'b': np.linspace(0, 1, 250),"
        " 'when': pd.date_range('2024-01-01', periods=250)})\n"
        "result.loc[1, 'b'] = np.nan\n"
    )
    payload = collect_after(kc, code)
    df = payload["result"]
    assert payload["result_source"] == "result"
    assert df["type"] == "dataframe"
    assert df["shape"] == [250, 3] and df["truncated"] is True
    assert df["columns"] == ["a", "b", "when"]
    assert df["dtypes"]["a"] == "int64" and df["dtypes"]["b"] == "float64"
    assert len(df["data"]) == 100 and df["index"][:3] == [0, 1, 2]
    assert df["data"][0] == [0, 0.0, "2024-01-01T00:00:00"]
    assert df["data"][1][1] is None  # NaN

    content, _, _ = run(kc, "pass", user_expressions={"r": "__pixell__.collect(max_rows=10)"})
    assert collected(content)["has_result"] is False  # `pass` did not bind result
    run(kc, "small = result.head(3)", user_expressions={})
    content, _, _ = run(
        kc, "result = small['a']", user_expressions={"r": "__pixell__.collect(max_rows=2)"}
    )
    series = collected(content)["result"]
    assert series == {
        "type": "series",
        "name": "a",
        "dtype": "int64",
        "index": [0, 1],
        "data": [0, 1],
        "shape": [3],
        "truncated": True,
    }
    assert collect_after(kc, "result = small.iloc[:2, :1]")["result"]["truncated"] is False


def test_scalars_containers_and_numpy(kc):
    code = textwrap.dedent(
        """
        import numpy as np, datetime, decimal
        result = {
            "nan": float("nan"), "inf": float("inf"), "i64": np.int64(7),
            "f64": np.float64(2.5), "fnan": np.float64("nan"), "b": np.bool_(True),
            "set": {3, 1, 2}, "nested": {"a": {"b": [1, {"c": None}], 2: (1, 2)}},
            "arr": np.array([[1.5, np.nan], [3.0, 4.0]]), "big": np.arange(100_000),
            "day": datetime.date(2024, 5, 1), "dec": decimal.Decimal("1.25"),
            "raw": b"hi",
        }
        """
    )
    r = collect_after(kc, code)["result"]
    assert r["nan"] is None and r["inf"] is None and r["fnan"] is None
    assert r["i64"] == 7 and r["f64"] == 2.5 and r["b"] is True
    assert r["set"] == [1, 2, 3]
    assert r["nested"] == {"a": {"b": [1, {"c": None}], "2": [1, 2]}}
    assert r["arr"] == [[1.5, None], [3.0, 4.0]]
    assert r["big"]["type"] == "ndarray" and r["big"]["truncated"] is True
    assert r["big"]["shape"] == [100_000] and 0 < len(r["big"]["data"]) < 100_000
    assert r["day"] == "2024-05-01" and r["dec"] == 1.25
    assert r["raw"] == {"type": "bytes", "length": 2, "base64": "aGk=", "truncated": False}
    assert collect_after(kc, "np.float64('nan')") == {
        "has_result": True,
        "result": None,
        "result_source": "expression",
    }


def test_unrepresentable_and_cyclic_values_never_raise(kc):
    code = textwrap.dedent(
        """
        class Broken:
            def __repr__(self):
                raise RuntimeError("no repr")
        cyc = [1]
        cyc.append(cyc)
        deep = []
        node = deep
        for _ in range(100):
            node.append([])
            node = node[0]
        result = {"broken": Broken(), "cyc": cyc, "deep": deep, "long": "x" * 500}
        """
    )
    content, _, _ = run(kc, code, user_expressions={"r": "__pixell__.collect(max_chars=100)"})
    r = collected(content)["result"]
    assert r["broken"].startswith("<unrepresentable") and "Broken" in r["broken"]
    assert r["cyc"] == [1, "<cycle list>"]
    # 100 levels deep: converted down to the depth bound (20), then the rest as its repr.
    node, levels = r["deep"], 0
    while isinstance(node, list):
        assert len(node) == 1, node
        node, levels = node[0], levels + 1
    assert 10 <= levels <= 21 and isinstance(node, str) and node.startswith("[["), (levels, node)
    assert r["long"].startswith("x" * 100) and "truncated" in r["long"]
    assert collect_after(kc, "result = Broken()")["result"].startswith("<unrepresentable")
    assert collect_after(kc, "result = [Broken()] * 3")["result"][0].startswith("<unrep")


HANDLER_MODULE = textwrap.dedent(
    """
    import asyncio

    CALLS = {"n": 0}

    def handler(request):
        CALLS["n"] += 1
        return {"echo": request, "calls": CALLS["n"], "nan": float("nan")}

    async def ahandler(request):
        await asyncio.sleep(0.01)
        return {"async": True, "a": request["a"] * 2}

    def failing(request):
        raise ValueError("bad input: " + str(request.get("a")))

    def nothing(request):
        return None
    """
)


def handler_cell(module, function, payload):
    return (
        f"__pixell_rv = __pixell__.call_handler({module!r}, {function!r}, "
        f"{json.dumps(payload)!r})\n"
        "if __pixell__.isawaitable(__pixell_rv): __pixell_rv = await __pixell_rv\n"
        "__pixell__.set_handler_result(__pixell_rv); del __pixell_rv"
    )


@pytest.fixture(scope="module")
def handler_pkg(kc, tmp_path_factory):
    root = tmp_path_factory.mktemp("pkgroot")
    (root / "pxh_src").mkdir()
    (root / "pxh_src/__init__.py").write_text("")
    (root / "pxh_src/main.py").write_text(HANDLER_MODULE)
    content, _, _ = run(
        kc, f"import sys; sys.path.insert(0, {str(root)!r})", silent=True, user_expressions={}
    )
    assert content["status"] == "ok"
    return "pxh_src.main"


def test_call_handler_sync_and_state_persists(kc, handler_pkg):
    content, out, seen = run(kc, handler_cell(handler_pkg, "handler", {"a": 1}), silent=True)
    first = collected(content)
    assert first == {
        "has_result": True,
        "result": {"echo": {"a": 1}, "calls": 1, "nan": None},
        "result_source": "handler",
    }
    assert "execute_input" not in seen and "execute_result" not in seen
    content, _, _ = run(kc, handler_cell(handler_pkg, "handler", {"a": 2}), silent=True)
    assert collected(content)["result"]["calls"] == 2  # module state kept via sys.modules


def test_call_handler_async_under_silent(kc, handler_pkg):
    content, _, _ = run(kc, handler_cell(handler_pkg, "ahandler", {"a": 21}), silent=True)
    assert collected(content) == {
        "has_result": True,
        "result": {"async": True, "a": 42},
        "result_source": "handler",
    }


def test_call_handler_exception_propagates(kc, handler_pkg):
    content, _, _ = run(kc, handler_cell(handler_pkg, "failing", {"a": 3}), silent=True)
    assert content["status"] == "error"
    assert content["ename"] == "ValueError" and content["evalue"] == "bad input: 3"
    content, _, _ = run(kc, handler_cell("pxh_src.missing", "handler", {}), silent=True)
    assert content["status"] == "error" and content["ename"] == "ModuleNotFoundError"


def test_handler_result_never_leaks(kc, handler_pkg):
    content, _, _ = run(kc, handler_cell(handler_pkg, "nothing", {}), silent=True)
    assert collected(content) == {"has_result": True, "result": None, "result_source": "handler"}
    # Stored but not collected: the next cell must not see it.
    run(kc, handler_cell(handler_pkg, "handler", {"a": 9}), silent=True, user_expressions={})
    assert collect_after(kc, "z = 1")["has_result"] is False
    # Collected once: a second collect does not repeat it.
    content, _, _ = run(kc, handler_cell(handler_pkg, "handler", {}), silent=True)
    assert collected(content)["result_source"] == "handler"
    content, _, _ = run(kc, "pass", silent=True)
    assert collected(content)["result_source"] != "handler"
    # A failed call after a stored-but-uncollected result does not resurrect it.
    run(kc, handler_cell(handler_pkg, "handler", {}), silent=True, user_expressions={})
    run(kc, handler_cell(handler_pkg, "failing", {}), silent=True, user_expressions={})
    content, _, _ = run(kc, "pass", silent=True)
    assert collected(content)["result_source"] != "handler"


def test_variables(kc):
    code = textwrap.dedent(
        """
        import pandas as pd, numpy as np, os
        vdf = pd.DataFrame({"a": [1, 2, 3], "b": [4.0, 5.0, 6.0]})
        vlist = [1, 2, 3, 4]
        vfunc = lambda x: x
        varr = np.zeros((2, 5))
        _private = 1
        """
    )
    content, _, _ = run(kc, code, user_expressions={"v": "__pixell__.variables()"})
    data = expr_data(content, "v")
    payload = data["application/json"]
    assert json.loads(data["text/plain"]) == payload
    entries = {v["name"]: v for v in payload["variables"]}
    names = [v["name"] for v in payload["variables"]]
    assert names == sorted(names) and payload["truncated"] is False
    for hidden in ("_private", "In", "Out", "exit", "quit", "get_ipython", "__pixell__", "os"):
        assert hidden not in entries
    assert entries["vdf"]["type"].endswith("DataFrame")
    assert entries["vdf"]["shape"] == [3, 2] and entries["vdf"]["length"] is None
    assert entries["vdf"]["size_bytes"] >= 48
    assert entries["vlist"] == {
        "name": "vlist",
        "type": "list",
        "shape": None,
        "length": 4,
        "size_bytes": entries["vlist"]["size_bytes"],
    }
    assert entries["vfunc"]["type"] == "function" and entries["vfunc"]["length"] is None
    assert entries["varr"]["type"] == "numpy.ndarray" and entries["varr"]["shape"] == [2, 5]
    assert entries["varr"]["size_bytes"] == 80


@pytest.fixture
def own_kernel():
    """A kernel of its own: a broken exit() must not take the module's kernel down."""
    km, client = start_new_kernel(kernel_name="python3", startup_timeout=60)
    try:
        content, _, _ = run(client, bootstrap_code(), silent=True, user_expressions={})
        assert content["status"] == "ok", content
        yield km, client
    finally:
        client.stop_channels()
        km.shutdown_kernel(now=True)


@pytest.mark.parametrize(
    "code",
    ["exit()", "quit()", "exit", "quit", "exit(keep_kernel=False)", "get_ipython().ask_exit()"],
)
def test_exit_asks_front_ends_to_leave_and_keeps_the_kernel(own_kernel, code):
    km, kc = own_kernel
    kc.execute_interactive("survivor = 42", timeout=TIMEOUT)
    stderr = []

    def hook(msg):
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stderr":
            stderr.append(msg["content"]["text"])

    reply = kc.execute_interactive(code, timeout=TIMEOUT, output_hook=hook)["content"]
    assert reply["status"] == "ok", reply
    # What jupyter console leaves on, keeping the kernel (ipykernel's own payload shape).
    assert reply["payload"] == [{"source": "ask_exit", "keepkernel": True}], reply
    assert "exit() does not end a runtime session" in "".join(stderr), stderr
    # ipykernel stops its loop 0.1 s after exit_now turns true: it must not have.
    expressions = {**COLLECT, "n": "get_ipython().exit_now"}
    content, _, _ = run(kc, "survivor", user_expressions=expressions)
    assert expr_data(content, "n")["text/plain"] == "False"
    assert collected(content)["result"] == 42
    assert km.is_alive()
    # A later cell carries no stale payload.
    assert kc.execute_interactive("1", timeout=TIMEOUT)["content"]["payload"] == []


def test_exit_in_a_silent_cell_keeps_the_kernel(own_kernel):
    """The runtime's handler cells are silent: an exit() inside a handler ends nothing."""
    km, kc = own_kernel
    content, _, _ = run(kc, "exit()", silent=True, user_expressions={})
    assert content["status"] == "ok", content
    assert collect_after(kc, "result = 'alive'")["result"] == "alive"
    assert km.is_alive()
