"""Host-accelerated inference (ap.nn_run): the compiled model's native twin gives the same bits
as the module's wasm code, both match onnxruntime, the module falls back to its own code when
the library is missing, tampered with or switched off, and the log and the features say which
path ran: in this process, through the real worker, and through the supervisor."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import onnx  # noqa: E402
import onnxruntime  # noqa: E402,F401
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static  # noqa: E402

from appliance_tools.nn import compile_model  # noqa: E402
from appliance.runtime.hostcalls.nn import machine_arch  # noqa: E402
from appliance_tools.nn.parity import float_mismatch, ort_session, quant_mismatch  # noqa: E402
from appliance_tools.nn.run import ModelModule  # noqa: E402
from appliance.runtime.wire import HEADER, load_message, pack_header  # noqa: E402
from appliance.runtime.process import WorkerProcess  # noqa: E402
from conftest import REPO  # noqa: E402

pytestmark = pytest.mark.skipif(machine_arch() is None, reason="no native libraries for this machine")

LABELS = ["normal", "inner", "outer", "ball"]


def vib_model(tmp_path):
    """A 1-D CNN on one channel x 512 samples with four classes."""
    rng = np.random.default_rng(3)
    init = lambda n, a: numpy_helper.from_array(np.asarray(a, np.float32), n)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], strides=[2], pads=[4, 4]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("MaxPool", ["r0"], ["p0"], kernel_shape=[4], strides=[4]),
             helper.make_node("Conv", ["p0", "w1", "b1"], ["c1"], pads=[1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("GlobalAveragePool", ["r1"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["l"], transB=1),
             helper.make_node("Softmax", ["l"], ["y"], axis=1)]
    inits = [init("w0", rng.normal(size=(8, 1, 9)) * .4), init("b0", rng.normal(size=8) * .1),
             init("w1", rng.normal(size=(8, 8, 3)) * .3), init("b1", rng.normal(size=8) * .1),
             init("wf", rng.normal(size=(4, 8)) * 3), init("bf", rng.normal(size=4) * .1)]
    g = helper.make_graph(nodes, "vib", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 512])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    path = tmp_path / "vib.onnx"
    onnx.save(m, str(path))
    return path


def quantized(tmp_path, path):
    rng = np.random.default_rng(4)

    class Reader:
        def __init__(self):
            self.it = iter([{"x": rng.normal(size=(1, 1, 512)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.it, None)

    out = tmp_path / "vib_int8.onnx"
    quantize_static(str(path), str(out), Reader(), quant_format=QuantFormat.QOperator,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nnhost")
    f = vib_model(tmp)
    q = quantized(tmp, f)
    out = {}
    for name, path in (("float", f), ("int8", q)):
        r = compile_model(path, tmp / name / "vib.wasm", labels=LABELS, threshold=0.6, consecutive=1)
        out[name] = (path, r)
    return out


def windows(n, seed=5):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(1, 512)).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("kind", ["float", "int8"])
def test_native_and_wasm_paths_give_the_same_bits_and_match_onnxruntime(models, kind):
    path, r = models[kind]
    assert machine_arch() in {lib.arch for lib in r.native}
    wasm_path, host_path = ModelModule(r.wasm), ModelModule(r.wasm, host_nn=True)
    sess = ort_session(path)
    lsb = None
    if kind == "int8":
        m = onnx.load(str(path))
        inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        lsb = float(inits[[n for n in m.graph.node if n.output[0] == "y"][0].input[1]])
    for w in windows(8):
        a, b = wasm_path.process(w), host_path.process(w)
        assert a.rc == b.rc == 0
        assert a.outputs.tobytes() == b.outputs.tobytes()          # bit-identical
        assert a.features["nn.host"] == 0.0 and b.features["nn.host"] == 1.0
        assert {k: v for k, v in a.features.items() if k != "nn.host"} == \
               {k: v for k, v in b.features.items() if k != "nn.host"}
        assert a.events == b.events
        ref = sess.run(None, {"x": w[None]})[0]
        assert (quant_mismatch(a.outputs, ref, lsb) if lsb else float_mismatch(a.outputs, ref)) == ""
    assert host_path.host.native_calls == 8
    assert any("sha256 verified) runs the model natively" in t for _, t in
               ModelModule(r.wasm, host_nn=True).process(windows(1)[0]).logs)


def _copy_module(r, dst):
    dst.mkdir()
    shutil.copy(r.wasm, dst / r.wasm.name)
    for lib in r.native:
        shutil.copy(lib.path, dst / lib.path.name)
    return dst / r.wasm.name


def test_missing_or_tampered_library_falls_back_to_the_wasm_code(models, tmp_path):
    _, r = models["float"]
    w = windows(1)[0]
    expected = ModelModule(r.wasm).process(w).outputs

    missing = _copy_module(r, tmp_path / "missing")
    lib = missing.parent / [x for x in r.native if x.arch == machine_arch()][0].path.name
    lib.unlink()
    res = ModelModule(missing, host_nn=True).process(w)
    assert res.features["nn.host"] == 0.0 and res.outputs.tobytes() == expected.tobytes()
    assert any("is missing next to the module; running the module's wasm code" in t for _, t in res.logs)

    tampered = _copy_module(r, tmp_path / "tampered")
    lib = tampered.parent / lib.name
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0x01
    lib.write_bytes(bytes(data))
    m = ModelModule(tampered, host_nn=True)
    res = m.process(w)
    assert res.features["nn.host"] == 0.0 and res.outputs.tobytes() == expected.tobytes()
    assert any("does not have the sha256 the module expects" in t for _, t in res.logs)
    assert m.host.native_calls == 0
    res = m.process(w)   # decided once: no second attempt, no second log line
    assert res.logs == [] and res.features["nn.host"] == 0.0

    off = ModelModule(r.wasm, host_nn=False)
    res = off.process(w)
    assert res.features["nn.host"] == 0.0 and off.host.native_calls == 0 and off.host.last_code is None


def test_guest_pointers_are_bounds_checked(models):
    _, r = models["float"]
    m = ModelModule(r.wasm, host_nn=True)
    size = len(m.inst.memory())
    from appliance_tools.nn.run import ModuleCallError
    with pytest.raises(ModuleCallError, match="output .* is outside linear memory"):
        m.host.nn_run(0, 40, 0, 4, size - 8, 16)
    with pytest.raises(ModuleCallError, match="descriptor of 12 bytes"):
        m.host.nn_run(0, 12, 0, 4, 0, 4)
    with pytest.raises(ModuleCallError, match="malformed model descriptor"):
        m.host.nn_run(0, 40, 0, 4, 0, 4)   # memory at 0 holds no descriptor


def _worker(r, host_nn: int):
    params = f"consecutive=1\nhost.dsp=1\nhost.nn={host_nn}\n"
    return WorkerProcess("vib", r.wasm.read_bytes(), HEADER.size + 4 * 512,
                         load_message(r.wasm.name, params, module_dir=str(r.wasm.parent), host_nn=bool(host_nn)))


def test_through_the_real_worker(models):
    _, r = models["int8"]
    out = {}
    for host_nn in (0, 1):
        worker = _worker(r, host_nn)
        try:
            replies = [worker.process(pack_header(1, 512, 12000.0, seq), w, 10.0)
                       for seq, w in enumerate(windows(4))]
        finally:
            worker.stop()
        assert all(rep["rc"] == 0 for rep in replies)
        assert [rep["f"]["nn.host"] for rep in replies] == [float(host_nn)] * 4
        logs = [t for rep in replies for _, t in rep["l"]]
        assert any("runs the model natively" in t for t in logs) == bool(host_nn)
        out[host_nn] = [{k: v for k, v in rep["f"].items() if k != "nn.host"} for rep in replies]
    assert out[0] == out[1]


def test_through_the_supervisor_with_host_nn(models, tmp_path, caplog):
    """A replay recording -> windows -> the compiled module in its worker; the module's log says
    the native library ran, every window was processed, and events reached the spool."""
    from appliance.events.spool import Spool
    from appliance.core.supervisor import Supervisor
    from support import write_config

    _, r = models["float"]
    rng = np.random.default_rng(9)
    rec = tmp_path / "rec.npy"
    np.save(rec, rng.normal(size=(512 * 12,)).astype(np.float32))
    cfg = write_config(tmp_path, {"rec": {"type": "replay", "realtime": False, "block_frames": 512,
                                          "segments": [{"path": str(rec), "sample_rate": 12000}]}},
                       {"vib": {"wasm": str(r.wasm), "source": "rec", "window": {"size": 512, "hop": 512},
                                "overflow": "block", "host_nn": True,
                                "params": {"consecutive": 1, "threshold": 0.0, "normal": ["ball"]}}})
    caplog.set_level(logging.INFO, logger="appliance.module")
    sup = Supervisor(cfg)
    sup.start()
    try:
        assert sup.wait_until_done(timeout_s=60)
    finally:
        sup.stop()
    host = sup.modules["vib"]
    assert host.processed == 12
    assert host.last_features["nn.host"] == 1.0
    assert any("module vib: host nn: nn-" in rec.getMessage() and "runs the model natively" in rec.getMessage()
               for rec in caplog.records)
    spool = Spool(cfg.gateway.data_dir / "spool.db", 1 << 24)
    events = spool.tail(100)
    spool.close()
    assert events, "threshold 0 and consecutive 1: the first non-'ball' window raises an event"
    first = min(events, key=lambda e: e["window"]["seq"])
    assert first["features"]["nn.host"] == 1.0 and "model vib.onnx: class '" in first["message"]
    # The event's evidence is what the wasm code computes for that window, to the bit.
    seq = first["window"]["seq"]
    samples = np.load(rec)[seq * 512:(seq + 1) * 512]
    own = ModelModule(r.wasm).process(samples[None]).features
    assert {k: first["features"][k] for k in own if k.startswith("p.")} == {k: v for k, v in own.items()
                                                                          if k.startswith("p.")}


HARNESS = r"""
/* The network with no libc: float32 input on stdin, the output block's bytes on stdout. */
#include "net.c"
static long sys3(long n, long a, long b, long c) {
#if defined(__x86_64__)
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
#else
    register long x8 __asm__("x8") = n, x0 __asm__("x0") = a, x1 __asm__("x1") = b, x2 __asm__("x2") = c;
    __asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2) : "memory");
    return x0;
#endif
}
#if defined(__x86_64__)
enum { SYS_READ = 0, SYS_WRITE = 1, SYS_EXIT = 60 };
__attribute__((force_align_arg_pointer))
#else
enum { SYS_READ = 63, SYS_WRITE = 64, SYS_EXIT = 93 };
#endif
void _start(void) {
    static float in[NN_INPUT_FLOATS], out[NN_OUTPUT_FLOATS];
    long got = 0, n;
    while (got < (long)sizeof in && (n = sys3(SYS_READ, 0, (long)((char *)in + got), (long)sizeof in - got)) > 0)
        got += n;
    if (got == (long)sizeof in) {
        ap_nn_copy(nn_input(), in, sizeof in);
        nn_forward();
        nn_collect(out);
        sys3(SYS_WRITE, 1, (long)out, (long)sizeof out);
    }
    sys3(SYS_EXIT, got == (long)sizeof in ? 0 : 2, 0, 0);
    for (;;) {}
}
"""


def odd_conv_model(tmp_path):
    """Convolutions whose shapes reach every edge of the blocked kernels: output channels that are
    not a multiple of 4, output planes that are not a multiple of 8, dilation, groups (depthwise),
    a 1x1 convolution that reads its input as the matrix, stride 2, and taps per output (K) that
    leave every remainder of the kernels' passes of four taps (9, 54, 7, 45, 5), fewer than four (3,
    on a row left over from the blocks of four too) and none (8)."""
    rng = np.random.default_rng(8)
    init = lambda n, a: numpy_helper.from_array(np.asarray(a, np.float32), n)  # noqa: E731
    layers = [("w0", (6, 1, 3, 3), dict(pads=[1, 1, 1, 1])),
              ("w1", (7, 6, 3, 3), dict(pads=[2, 2, 2, 2], dilations=[2, 2])),
              ("w2", (7, 1, 3, 3), dict(pads=[1, 1, 1, 1], group=7)),
              ("w3", (5, 7, 1, 1), {}),
              ("w4", (3, 5, 3, 3), dict(pads=[1, 0, 1, 0], strides=[2, 2])),
              ("w5", (5, 3, 1, 1), {}),
              ("w6", (8, 5, 1, 1), {}),
              ("w7", (5, 8, 1, 1), {})]
    nodes, inits, x = [], [], "x"
    for k, (w, shape, attrs) in enumerate(layers):
        nodes += [helper.make_node("Conv", [x, w, f"b{k}"], [f"c{k}"], **attrs),
                  helper.make_node("Relu", [f"c{k}"], [f"r{k}"])]
        inits += [init(w, rng.normal(size=shape) * np.sqrt(2 / np.prod(shape[1:]))),
                  init(f"b{k}", rng.normal(size=shape[0]) * .1)]
        x = f"r{k}"
    nodes.append(helper.make_node("Flatten", [x], ["y"]))
    g = helper.make_graph(nodes, "odd", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 13, 11])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5 * 7 * 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    path = tmp_path / "odd.onnx"
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("kind", ["float", "int8"])
def test_every_edge_of_the_blocked_kernels_gives_the_same_bits(tmp_path, kind):
    """The native twin's im2col and blocked kernels against wasm3's direct ones, bit for bit, on
    shapes that leave remainders everywhere (and the SIMD128 build where wasmtime is installed)."""
    path = odd_conv_model(tmp_path)
    if kind == "int8":
        rng = np.random.default_rng(9)

        class Reader:
            def __init__(self):
                self.it = iter([{"x": rng.normal(size=(1, 1, 13, 11)).astype(np.float32)} for _ in range(4)])

            def get_next(self):
                return next(self.it, None)

        quantize_static(str(path), str(tmp_path / "odd_int8.onnx"), Reader(), quant_format=QuantFormat.QOperator,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        path = tmp_path / "odd_int8.onnx"
    r = compile_model(path, tmp_path / kind / "odd.wasm", window=(1, 143), rule="none")
    engines = [ModelModule(r.wasm), ModelModule(r.wasm, host_nn=True)]
    try:
        engines.append(ModelModule(r.simd_wasm, engine="wasmtime", validated=True))
    except ImportError:
        pass                    # the SIMD128 build's own test says it is skipped
    sess = ort_session(path)
    rng = np.random.default_rng(10)
    for _ in range(6):
        w = rng.normal(size=(1, 143)).astype(np.float32)
        results = [e.process(w) for e in engines]
        assert results[1].features["nn.host"] == 1.0
        assert len({res.outputs.tobytes() for res in results}) == 1
        ref = sess.run(None, {"x": w.reshape(1, 1, 13, 11)})[0]
        if kind == "float":
            assert float_mismatch(results[0].outputs, ref) == ""
    if machine_arch() == "x86_64":
        # Every vector width this CPU has (SSE2, AVX2, AVX-512F), called directly: the same bits.
        import ctypes
        lib = ctypes.CDLL(str(next(x.path for x in r.native if x.arch == "x86_64")))
        lib.ap_nn_native_x86_level.restype = ctypes.c_int32
        lib.ap_nn_native_run.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32]
        have = lib.ap_nn_native_x86_level(-1)
        w = rng.normal(size=143).astype(np.float32)
        want = ModelModule(r.wasm).process(w[None]).outputs.tobytes()
        for level in range(have + 1):
            assert lib.ap_nn_native_x86_level(level) == level
            out = np.zeros(len(want) // 4, np.float32)
            assert lib.ap_nn_native_run(w.ctypes.data, 4 * 143, out.ctypes.data, out.nbytes) == 0
            assert out.tobytes() == want, f"x86 level {level}"


@pytest.mark.parametrize("kind", ["float", "int8"])
def test_the_simd128_build_gives_the_same_bits_as_wasm3_and_the_native_twin(models, kind):
    """x.simd.wasm (the im2col and vector kernels, for wasmtime) against x.wasm in wasm3 (the
    direct kernels) and the native twin (the vector kernels in SSE2 or NEON): one set of bits."""
    pytest.importorskip("wasmtime", reason="wasmtime (issue 19) is not installed: the SIMD128 build cannot run")
    _, r = models[kind]
    assert r.simd_wasm == r.wasm.with_suffix(".simd.wasm") and r.simd_wasm.exists()
    simd = ModelModule(r.simd_wasm, engine="wasmtime", validated=True)
    scalar, host = ModelModule(r.wasm), ModelModule(r.wasm, host_nn=True)
    for w in windows(8, seed=21):
        a, b, c = scalar.process(w), simd.process(w), host.process(w)
        assert c.features["nn.host"] == 1.0
        assert a.outputs.tobytes() == b.outputs.tobytes() == c.outputs.tobytes()
        assert a.events == b.events


@pytest.mark.skipif(machine_arch() != "aarch64" and not __import__("os").path.exists(
    "/proc/sys/fs/binfmt_misc/qemu-aarch64"), reason="no aarch64 machine and no qemu-aarch64 binfmt to run one")
@pytest.mark.parametrize("kind", ["float", "int8"])
def test_aarch64_build_of_the_network_gives_the_same_bits(models, tmp_path, kind):
    """The network's C with the native libraries' flags, for aarch64 (run under qemu on x86-64)
    and x86-64, against the wasm module: the same output bits."""
    import subprocess
    import sys
    from appliance_tools.modbuild import SDK_DIR
    from appliance_tools.nn import toolchain
    path, _ = models[kind]
    r = compile_model(path, tmp_path / "m.wasm", labels=LABELS, keep_c=tmp_path / "c", native=False)
    (tmp_path / "c" / "harness.c").write_text(HARNESS)
    runs = {}
    for arch, (target, cpu) in toolchain.NATIVE_ARCHES.items():
        exe = tmp_path / "c" / f"h-{arch}"
        subprocess.run([sys.executable, "-m", "ziglang", "cc", f"--target={target}", f"-mcpu={cpu}",
                        *toolchain.COMMON_FLAGS, "-DAP_NN_NATIVE", f"-I{SDK_DIR}", "-static", "harness.c",
                        "-o", exe.name], cwd=exe.parent, check=True, capture_output=True, timeout=300)
        runs[arch] = exe
    module = ModelModule(r.wasm)
    for w in windows(3, seed=12):
        want = [f"{u:08x}" for u in module.process(w).outputs.view(np.uint32)]
        for arch, exe in runs.items():
            out = subprocess.run([str(exe)], input=w.astype(np.float32).tobytes(), capture_output=True, timeout=60)
            assert out.returncode == 0, (arch, out.stderr)
            assert [f"{u:08x}" for u in np.frombuffer(out.stdout, np.uint32)] == want, arch


def test_a_module_cycling_through_descriptors_cannot_exhaust_the_worker(models):
    """Each new descriptor used to cost a file read, a hash and a dlopen from a fresh memfd that
    stays open: a hostile module could vary an unused entry and open fds until the worker ran
    out. The same library bytes now load once, and a fifth distinct descriptor is a violation."""
    import os
    from appliance.runtime.hostcalls.nn import MAX_DESCRIPTORS, pack_descriptor
    from appliance_tools.nn.run import ModuleCallError
    _, r = models["float"]
    m = ModelModule(r.wasm, host_nn=True)
    mem = m.inst.memory()
    libs = [(lib.arch, bytes.fromhex(lib.sha256)) for lib in r.native]
    at = len(mem) - 8192
    fds = len(os.listdir("/proc/self/fd"))
    codes = []
    with pytest.raises(ModuleCallError, match=f"more than {MAX_DESCRIPTORS} different model descriptors"):
        for i in range(64):
            desc = pack_descriptor(bytes.fromhex(r.model_hash), libs + [(f"junk{i}", bytes(32))])
            mem[at:at + len(desc)] = desc
            codes.append(m.host.nn_run(at, len(desc), 0, 4 * 512, 4096, 16))
    assert codes == [0] * MAX_DESCRIPTORS              # every one of them verified and ran natively
    assert m.host.libraries_loaded == 1 and len(os.listdir("/proc/self/fd")) <= fds + 1


CTRL_C = """
import os, signal, sys, threading
import numpy as np
from appliance_tools.nn.run import ModelModule
m = ModelModule(sys.argv[1], engine="wasmtime", validated=True)
x = np.random.default_rng(0).normal(size=(1, 1024)).astype(np.float32)
def tools_own(signum, frame):
    raise KeyboardInterrupt
for k in range(20):   # Ctrl-C at 20 moments of the calls (host calls among them)
    if k == 10:       # a handler of the tool's own, set after calls ran (as a notebook does per cell)
        signal.signal(signal.SIGINT, tools_own)
    threading.Timer(0.01 + 0.007 * k, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    try:
        while True:
            m.process(x)
    except KeyboardInterrupt:
        pass
print("clean")
"""


def test_ctrl_c_during_an_in_process_wasmtime_call_is_a_keyboard_interrupt_not_a_crash(tmp_path):
    """A tool running a model on wasmtime in its own process (bench_nn, the parity tests): Ctrl-C
    raised inside the host-call trampoline, a ctypes callback, crashed the process (SIGSEGV: ctypes
    returned junk that wasmtime took for a trap). It is held back until the call returns, also
    after the tool sets a SIGINT handler of its own between calls."""
    pytest.importorskip("wasmtime", reason="wasmtime (issue 19) is not installed")
    simd = REPO / "modules" / "build" / "bearing_cnn.simd.wasm"
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tools'}"}
    run = subprocess.run([sys.executable, "-c", CTRL_C, str(simd)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "clean", (run.returncode, run.stderr[-2000:])
