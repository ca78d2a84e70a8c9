"""Compiler graph -> C: weights as const arrays, one function per operator, one static arena
for the activations (liveness-based reuse), and nn_forward() calling the operators in order.

The kernels are written for an interpreter (wasm3): every loop bound and every tap offset is a
literal, the innermost loops run over contiguous memory, a convolution keeps a chunk of its
weights in locals and reads its input taps through one pointer with constant offsets (one wasm
load with an immediate offset per tap), and nothing calls a function per element.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from math import prod

import numpy as np

from appliance_tools.nn.ir import C_TYPES, ITEM_BYTES, Graph, ModelError, Op, Q_RANGE

ALIGN = 16
MAX_TAPS = 24        # weights a convolution keeps in locals per inner loop
TYPE_MIN = {"float32": "(-1.0f/0.0f)", "uint8": "0", "int8": "(-128)"}


@dataclass
class Buffer:
    name: str
    nbytes: int
    first: int
    last: int
    offset: int = -1


@dataclass
class Program:
    net_c: str                 # the network: self-contained C (includes ap_nn.h only)
    arena_bytes: int           # the wasm3 build's (direct kernels)
    const_bytes: int
    input_floats: int
    output_floats: int
    output_slices: list[tuple[str, int, int, tuple]]   # (tensor, offset, count, shape) in the output block
    op_summary: list[str]
    arena_bytes_vector: int = 0   # the native and SIMD128 builds' (im2col scratch)


def c_comment(text: str) -> str:
    """Text from the model (node names, file names) made safe inside a C comment."""
    return "".join(c if " " <= c <= "~" else "?" for c in text).replace("*/", "* /")


def c_float(v: float) -> str:
    f = np.float32(v)
    if not np.isfinite(f):
        return "(1.0f/0.0f)" if f > 0 else "(-1.0f/0.0f)" if f < 0 else "(0.0f/0.0f)"
    s = str(f)
    if "e" not in s and "." not in s and "inf" not in s:
        s += ".0"
    return s + "f"


class Emitter:
    def __init__(self, graph: Graph) -> None:
        self.g = graph
        self.consts: list[str] = []
        self.const_bytes = 0
        self.funcs: list[str] = []
        self.scratch: dict[int, list[tuple[str, int, str | None]]] = {}   # op -> [(buffer, bytes, build)]
        self.build: str | None = None     # "scalar" or "vector" while emitting one form of an operator
        self.names: dict[str, str] = {}
        self._n = 0
        self.current = 0

    # ---- constants -------------------------------------------------------------------------

    def const(self, prefix: str, arr: np.ndarray, dtype: str, where: str) -> str:
        arr = np.ascontiguousarray(np.asarray(arr).reshape(-1))
        # The same values once (both forms of a float convolution read its weights in one layout).
        key = f"const:{dtype}:{arr.dtype}:{arr.size}:" + hashlib.sha256(arr.tobytes()).hexdigest()
        if key in self.names:
            return self.names[key]
        name = f"K{self._n}_{prefix}"
        self._n += 1
        if dtype == "float32":
            a32 = arr.astype(np.float32)
            if not np.all(np.isfinite(a32)):
                raise ModelError(f"{self.g.model}: {where}: a constant ({prefix}) holds inf or NaN")
            body = ",".join(c_float(v) for v in a32)
        else:
            info = np.iinfo(dtype)
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                raise ModelError(f"{self.g.model}: {where}: constant {prefix} does not fit {dtype}")
            body = ",".join(f"{int(v)}ull" for v in arr) if dtype == "uint64" else \
                ",".join(str(int(v)) for v in arr.astype(np.int64))
        n = max(arr.size, 1)
        if not arr.size:
            body = "0"
        # Lines of ~16 values keep the file readable and the compiler's diagnostics short.
        parts = body.split(",")
        lines = [",".join(parts[i:i + 16]) for i in range(0, len(parts), 16)]
        self.consts.append(f"static const {C_TYPES[dtype]} {name}[{n}] __attribute__((aligned(16))) = {{\n  "
                           + ",\n  ".join(lines) + "\n};")
        self.const_bytes += n * ITEM_BYTES[dtype]
        self.names[key] = name
        return name

    # ---- tensors ----------------------------------------------------------------------------

    def ptr(self, name: str) -> str:
        t = self.g.tensors[name]
        if t.is_const:
            key = f"tensor:{name}"
            if key not in self.names:
                self.names[key] = self.const("t", t.const, t.dtype, f"tensor {name!r}")
            return self.names[key]
        root = self.g.storage(name)
        return f"(({C_TYPES[t.dtype]} *)(nn_arena + NN_OFF_{self.buffer_id(root)}))"

    def buffer_id(self, root: str) -> int:
        key = f"id:{root}"
        if key not in self.names:
            self.names[key] = str(len([k for k in self.names if k.startswith("id:")]))
        return int(self.names[key])

    def scratch_buf(self, ctype: str, count: int, tag: str) -> str:
        name = f"S{self.current}_{tag}"
        self.scratch.setdefault(self.current, []).append((name, count * (8 if ctype == "uint64_t" else
                                                                          4 if ctype in ("float", "int32_t") else
                                                                          2 if ctype == "int16_t" else 1),
                                                          self.build))
        return f"(({ctype} *)(nn_arena + NN_OFF_{name}))"

    # ---- operators --------------------------------------------------------------------------

    def emit(self, index: int, op: Op) -> str:
        self.current = index
        body = getattr(self, f"_{op.kind}")(op)
        fname = f"nn_op{index}"
        comment = "/* " + c_comment(f"{op.where}: {op.attrs.get('label', op.kind)} -> "
                                    f"{' '.join(self.shape_text(o) for o in op.outputs)}") + " */"
        self.funcs.append(f"{comment}\nstatic void {fname}(void) {{\n{body}\n}}")
        return fname

    def shape_text(self, name: str) -> str:
        t = self.g.tensors[name]
        return f"{t.dtype}[{'x'.join(map(str, t.shape))}]"

    def _conv(self, op: Op) -> str:
        """Both forms (ap_nn.h, "convolution and matrix products"): direct kernels for wasm3,
        im2col and blocked matrix products elsewhere; the same result bits."""
        self.build = "scalar"
        direct = self._conv_direct(op) if op.attrs["quant"] is None else self._qconv_pairs(op)
        self.build = "vector"
        gemm = self._conv_gemm(op)
        self.build = None
        return "\n".join(["#if AP_NN_SCALAR", direct, "#else", gemm, "#endif"])

    def _padded_source(self, xt: str, fill, C: int, H: int, W: int, HP: int, WP: int, pt: int, pl: int) -> list[str]:
        """C lines that set src0: the input x itself, or (fill not None) a copy of it in a scratch
        buffer of HP x WP per channel, padded with `fill` (0 or the input's zero point)."""
        if fill is None:
            return [f"  const {xt} *src0 = x;"]
        xp = self.scratch_buf(xt, C * HP * WP, "pad")
        return [f"  {xt} *xp = {xp};",
                f"  for (int32_t i = 0; i < {C * HP * WP}; i++) xp[i] = ({xt}){fill};",
                f"  for (int32_t c = 0; c < {C}; c++)",
                f"    for (int32_t r = 0; r < {H}; r++) {{",
                f"      const {xt} *s = x + c * {H * W} + r * {W};",
                f"      {xt} *d = xp + c * {HP * WP} + (r + {pt}) * {WP} + {pl};",
                f"      for (int32_t i = 0; i < {W}; i++) d[i] = s[i];",
                "    }",
                f"  const {xt} *src0 = xp;"]

    def _conv_gemm(self, op: Op) -> str:
        a = op.attrs
        q = a["quant"]
        H, W, M, G, Cg = a["H"], a["W"], a["M"], a["G"], a["Cg"]
        KH, KW, OH, OW = a["KH"], a["KW"], a["OH"], a["OW"]
        sh, sw, dh, dw = a["sh"], a["sw"], a["dh"], a["dw"]
        pt, pl, pb, pr = a["pt"], a["pl"], a["pb"], a["pr"]
        xt = C_TYPES[a["dtype"]]
        x, y = self.ptr(op.inputs[0]), self.ptr(op.outputs[0])
        MG, KC, N = M // G, Cg * KH * KW, OH * OW
        pad = bool(pt or pl or pb or pr)
        lines = [f"  const {xt} *x = {x};"]
        if q is None:
            lines.append(f"  float *y = {y};")
            wname = self.const("w", a["w"].reshape(M, KC), "float32", op.where)
            bias = a["b"] if a["b"] is not None else np.zeros(M, np.float32)
            bname = self.const("b", bias, "float32", op.where)
            pt_c = "float"
        else:
            yt = C_TYPES[q["ytype"]]
            lines.append(f"  {yt} *y = {y};")
            wz = q["wz"].astype(np.int64)
            w16 = a["w"].reshape(M, KC).astype(np.int64) - wz[:, None]
            wname = self.const("w16", w16, "int16", op.where)
            bias = q["bias"].astype(np.int64) if q["bias"] is not None else np.zeros(M, np.int64)
            init = bias - q["xz"] * w16.sum(axis=1)   # sum (x - xz)(w - wz) = sum x (w - wz) - xz sum (w - wz)
            if np.abs(init).max(initial=0) >= 2 ** 31:
                raise ModelError(f"{self.g.model}: {op.where}: bias and zero point overflow int32")
            bname = self.const("init", init, "int32", op.where)
            sname = self.const("scale", q["scales"], "float32", op.where)
            pt_c = "int16_t"
            acc = self.scratch_buf("int32_t", MG * N, "gacc")
            lines.append(f"  int32_t *acc = {acc};")
        fill = "0.0f" if q is None else str(q["xz"])   # the padding's value (the input's zero point)
        # A 1x1, stride 1 float convolution reads its input as the matrix; the others gather it.
        direct = q is None and KH == KW == 1 and sh == sw == 1 and not pad
        if not direct:
            pm = self.scratch_buf(pt_c, KC * N, "cols")
            lines.append(f"  {pt_c} *cols = {pm};")
        lines.append(f"  for (int32_t g = 0; g < {G}; g++) {{")
        lines.append(f"    const {xt} *src = x + g * {Cg * H * W};")
        if direct:
            lines.append("    const float *cols = src;")
        else:
            # The taps gathered straight from the input, the padding written where a tap falls
            # outside it: per (ky, kx) the rows and columns inside are a range, found once.
            lines += [f"    for (int32_t c = 0; c < {Cg}; c++)",
                      f"      for (int32_t ky = 0; ky < {KH}; ky++)",
                      f"        for (int32_t kx = 0; kx < {KW}; kx++) {{",
                      f"          {pt_c} *d = cols + ((c * {KH} + ky) * {KW} + kx) * {N};",
                      f"          const int32_t xlo = {pl} - kx * {dw}, xhi = {W - 1 + pl} - kx * {dw};",
                      f"          const int32_t ox0 = xlo <= 0 ? 0 : (xlo + {sw - 1}) / {sw} < {OW} ? (xlo + {sw - 1}) / {sw} : {OW};",
                      f"          const int32_t ox1 = xhi < 0 ? 0 : xhi / {sw} + 1 < {OW} ? xhi / {sw} + 1 : {OW};",
                      f"          for (int32_t oy = 0; oy < {OH}; oy++, d += {OW}) {{",
                      f"            const int32_t iy = oy * {sh} + ky * {dh} - {pt};",
                      f"            if (iy < 0 || iy >= {H}) {{",
                      f"              for (int32_t ox = 0; ox < {OW}; ox++) d[ox] = ({pt_c}){fill};",
                      "              continue;",
                      "            }",
                      f"            const {xt} *s = src + c * {H * W} + iy * {W};",
                      "            int32_t ox = 0;",
                      f"            for (; ox < ox0; ox++) d[ox] = ({pt_c}){fill};",
                      f"            for (; ox < ox1; ox++) d[ox] = ({pt_c})s[ox * {sw} + kx * {dw} - {pl}];",
                      f"            for (; ox < {OW}; ox++) d[ox] = ({pt_c}){fill};",
                      "          }",
                      "        }"]
        if q is None:
            lines.append(f"    ap_nn_gemm_f32({wname} + g * {MG * KC}, {bname} + g * {MG}, cols, y + g * {MG * N}, "
                         f"{MG}, {N}, {KC});")
            lines += ["  }"] + self._act_lines(a.get("act"), "y", M * N, "  ")
        else:
            lo, hi = Q_RANGE[q["ytype"]]
            yz = q["yz"]
            lines += [f"    ap_nn_gemm_i16({wname} + g * {MG * KC}, {bname} + g * {MG}, cols, acc, {MG}, {N}, {KC});",
                      f"    for (int32_t m = 0; m < {MG}; m++) {{",
                      f"      const float sc = {sname}[g * {MG} + m];",
                      f"      {yt} *d = y + (g * {MG} + m) * {N};",
                      f"      const int32_t *o = acc + m * {N};",
                      f"      for (int32_t i = 0; i < {N}; i++)",
                      f"        d[i] = ({yt})(ap_nn_quant((float)o[i] * sc, {c_float(lo - yz)}, "
                      f"{c_float(hi - yz)}) + {yz});",
                      "    }", "  }"]
        return "\n".join(lines)

    def _qconv_pairs(self, op: Op) -> str:
        """The integer convolution for wasm3: two output channels per multiply. A uint64 weight holds
        (w0 - wz0) + (w1 - wz1) * 2^32; summing weight * x over the taps gives S0 + S1 * 2^32 modulo
        2^64, from which both int32 sums come back exactly (|S| < 2^31, as int32 needs anyway). One
        i64.load8, i64.mul and i64.add per tap and pair: half the interpreted operations."""
        a = op.attrs
        q = a["quant"]
        C, H, W, M, G, Cg = a["C"], a["H"], a["W"], a["M"], a["G"], a["Cg"]
        KH, KW, OH, OW = a["KH"], a["KW"], a["OH"], a["OW"]
        sh, sw, dh, dw = a["sh"], a["sw"], a["dh"], a["dw"]
        pt, pl, pb, pr = a["pt"], a["pl"], a["pb"], a["pr"]
        xt, yt = C_TYPES[a["dtype"]], C_TYPES[q["ytype"]]
        x, y = self.ptr(op.inputs[0]), self.ptr(op.outputs[0])
        K, MG, N = KH * KW, M // G, OH * OW
        pad = bool(pt or pl or pb or pr)
        HP, WP = H + pt + pb, W + pl + pr
        wz = q["wz"].astype(np.int64)
        w16 = a["w"].reshape(M, Cg * K).astype(np.int64) - wz[:, None]
        bias = q["bias"].astype(np.int64) if q["bias"] is not None else np.zeros(M, np.int64)
        init = bias - q["xz"] * w16.sum(axis=1)   # sum (x - xz)(w - wz) = sum x (w - wz) - xz sum (w - wz)
        if np.abs(init).max(initial=0) >= 2 ** 31:
            raise ModelError(f"{self.g.model}: {op.where}: bias and zero point overflow int32")
        # Pairs of output channels within a group; an odd last channel pairs with nothing (zeros).
        pairs = [(g * MG + i, g * MG + i + 1 if i + 1 < MG else -1) for g in range(G) for i in range(0, MG, 2)]
        mask = (1 << 64) - 1

        def pack(lo, hi) -> int:
            return ((int(lo) & mask) + ((int(hi) & mask) << 32)) & mask
        wp = np.array([[pack(w16[m0, t], w16[m1, t] if m1 >= 0 else 0) for t in range(Cg * K)] for m0, m1 in pairs],
                      dtype=np.uint64)
        ip = np.array([pack(init[m0], init[m1] if m1 >= 0 else 0) for m0, m1 in pairs], dtype=np.uint64)
        wname = self.const("wpair", wp, "uint64", op.where)
        iname = self.const("ipair", ip, "uint64", op.where)
        m0name = self.const("m0", np.array([p[0] for p in pairs]), "int32", op.where)
        m1name = self.const("m1", np.array([p[1] for p in pairs]), "int32", op.where)
        sname = self.const("scale", q["scales"], "float32", op.where)
        acc = self.scratch_buf("uint64_t", N, "acc64")
        lines = [f"  const {xt} *x = {x};", f"  {yt} *y = {y};", f"  uint64_t *acc = {acc};"]
        lines += self._padded_source(xt, q["xz"] if pad else None, C, H, W, HP, WP, pt, pl)
        lines += [f"  for (int32_t pi = 0; pi < {len(pairs)}; pi++) {{",
                  f"    const int32_t m0 = {m0name}[pi], m1 = {m1name}[pi];",
                  f"    const {xt} *src = src0 + (m0 / {MG}) * {Cg * HP * WP};",
                  f"    const uint64_t *wm = {wname} + pi * {Cg * K};",
                  "    uint64_t *o = acc;",
                  f"    {{ const uint64_t b = {iname}[pi]; for (int32_t i = 0; i < {N}; i++) o[i] = b; }}"]

        def body(nq: int, t0: int, t1: int) -> list[str]:
            taps = [(qq, t // KW, t % KW) for qq in range(nq) for t in range(t0, t1)]
            out = [f"      const uint64_t w{i} = w[{qq * K + ky * KW + kx}];" for i, (qq, ky, kx) in enumerate(taps)]
            terms = " + ".join(f"w{i} * (uint64_t)(int64_t)p[{qq * HP * WP + ky * dh * WP + kx * dw}]"
                               for i, (qq, ky, kx) in enumerate(taps))
            out += [f"      for (int32_t oy = 0; oy < {OH}; oy++) {{",
                    f"        const {xt} *p = s + oy * {sh * WP};",
                    f"        uint64_t *r = o + oy * {OW};",
                    f"        for (int32_t ox = 0; ox < {OW}; ox++, p += {sw}) r[ox] = r[ox] + {terms};",
                    "      }"]
            return out

        if K <= MAX_TAPS:
            step_c = max(1, min(Cg, MAX_TAPS // K))
            full = Cg - Cg % step_c
        else:
            step_c, full = 1, Cg
        lines += ["    int32_t c = 0;", f"    for (; c < {full}; c += {step_c}) {{",
                  f"      const {xt} *s = src + c * {HP * WP};", f"      const uint64_t *w = wm + c * {K};"]
        if K <= MAX_TAPS:
            lines += body(step_c, 0, K)
        else:
            for t0 in range(0, K, MAX_TAPS):
                lines.append("      {")
                lines += ["  " + ln for ln in body(1, t0, min(K, t0 + MAX_TAPS))]
                lines.append("      }")
        lines.append("    }")
        if K <= MAX_TAPS and Cg % step_c:
            lines += ["    {", f"      const {xt} *s = src + c * {HP * WP};", f"      const uint64_t *w = wm + c * {K};"]
            lines += body(Cg % step_c, 0, K)
            lines.append("    }")
        lo, hi = Q_RANGE[q["ytype"]]
        yz = q["yz"]
        lines += [f"    const float sc0 = {sname}[m0], sc1 = m1 >= 0 ? {sname}[m1] : 0.0f;",
                  f"    {yt} *d0 = y + m0 * {N}, *d1 = y + (m1 >= 0 ? m1 : m0) * {N};",
                  f"    for (int32_t i = 0; i < {N}; i++) {{",
                  "      const uint64_t v = o[i];",
                  "      const int32_t s0 = (int32_t)(uint32_t)v;",
                  f"      d0[i] = ({yt})(ap_nn_quant((float)s0 * sc0, {c_float(lo - yz)}, {c_float(hi - yz)}) + {yz});",
                  "      if (m1 >= 0) {",
                  "        const int32_t s1 = (int32_t)(uint32_t)((v - (uint64_t)(int64_t)s0) >> 32);",
                  f"        d1[i] = ({yt})(ap_nn_quant((float)s1 * sc1, {c_float(lo - yz)}, {c_float(hi - yz)}) + {yz});",
                  "      }",
                  "    }",
                  "  }"]
        return "\n".join(lines)

    def _conv_direct(self, op: Op) -> str:
        a = op.attrs
        q = a["quant"]
        C, H, W, M, G, Cg = a["C"], a["H"], a["W"], a["M"], a["G"], a["Cg"]
        KH, KW, OH, OW = a["KH"], a["KW"], a["OH"], a["OW"]
        sh, sw, dh, dw = a["sh"], a["sw"], a["dh"], a["dw"]
        pt, pl, pb, pr = a["pt"], a["pl"], a["pb"], a["pr"]
        xt = C_TYPES[a["dtype"]]
        x, y = self.ptr(op.inputs[0]), self.ptr(op.outputs[0])
        K = KH * KW
        pad = bool(pt or pl or pb or pr)
        HP, WP = H + pt + pb, W + pl + pr
        lines = [f"  const {xt} *x = {x};"]
        if q is None:
            lines.append(f"  float *y = {y};")
            wname = self.const("w", a["w"], "float32", op.where)
            bname = self.const("b", a["b"], "float32", op.where) if a["b"] is not None else None
            acc_t = "float"
        else:
            yt = C_TYPES[q["ytype"]]
            lines.append(f"  {yt} *y = {y};")
            wname = self.const("w", a["w"], str(a["w"].dtype), op.where)
            wz = q["wz"].astype(np.int64)
            wsum = (a["w"].reshape(M, -1).astype(np.int64) - wz[:, None]).sum(axis=1)
            bias = q["bias"].astype(np.int64) if q["bias"] is not None else np.zeros(M, np.int64)
            init = bias - q["xz"] * wsum          # sum (x - xz)(w - wz) = sum x (w - wz) - xz sum (w - wz)
            if np.abs(init).max(initial=0) >= 2 ** 31:
                raise ModelError(f"{self.g.model}: {op.where}: bias and zero point overflow int32")
            bname = self.const("init", init, "int32", op.where)
            sname = self.const("scale", q["scales"], "float32", op.where)
            wzname = self.const("wz", wz, "int32", op.where) if np.any(wz) else None
            acc_t = "int32_t"
            acc = self.scratch_buf("int32_t", OH * OW, "acc")
            lines.append(f"  int32_t *acc = {acc};")
        lines += self._padded_source(xt, ("0.0f" if q is None else q["xz"]) if pad else None, C, H, W, HP, WP, pt, pl)
        MG = M // G
        lines += [f"  for (int32_t m = 0; m < {M}; m++) {{",
                  f"    const {xt} *src = src0 + (m / {MG}) * {Cg * HP * WP};",
                  f"    const {C_TYPES[str(a['w'].dtype)] if q else 'float'} *wm = {wname} + m * {Cg * K};"]
        if q is None:
            lines.append(f"    float *o = y + m * {OH * OW};")
            init = f"{bname}[m]" if bname else "0.0f"
            lines.append(f"    {{ const float b = {init}; for (int32_t i = 0; i < {OH * OW}; i++) o[i] = b; }}")
        else:
            lines.append("    int32_t *o = acc;")
            lines.append(f"    {{ const int32_t b = {bname}[m]; for (int32_t i = 0; i < {OH * OW}; i++) o[i] = b; }}")
            if wzname:
                lines.append(f"    const int32_t wz = {wzname}[m];")
        # Taps: (channel within the chunk, ky, kx) -> constant offset from the window's corner.
        if K <= MAX_TAPS:
            Q = max(1, min(Cg, MAX_TAPS // K))
            chunks = [(Q, 0, K)]
            if Cg % Q:
                chunks.append((Cg % Q, 0, K))
        else:
            Q = 1
            chunks = [(1, t0, min(K, t0 + MAX_TAPS)) for t0 in range(0, K, MAX_TAPS)]

        def body(nq: int, t0: int, t1: int) -> list[str]:
            taps = [(qq, t // KW, t % KW) for qq in range(nq) for t in range(t0, t1)]
            out = []
            for i, (qq, ky, kx) in enumerate(taps):
                widx = qq * K + ky * KW + kx
                if q is None:
                    out.append(f"      const float w{i} = w[{widx}];")
                else:
                    out.append(f"      const int32_t w{i} = (int32_t)w[{widx}]{' - wz' if wzname else ''};")
            terms = " + ".join(f"w{i} * {'' if q is None else '(int32_t)'}p[{qq * HP * WP + ky * dh * WP + kx * dw}]"
                               for i, (qq, ky, kx) in enumerate(taps))
            out += [f"      for (int32_t oy = 0; oy < {OH}; oy++) {{",
                    f"        const {xt} *p = s + oy * {sh * WP};",
                    f"        {acc_t} *r = o + oy * {OW};",
                    f"        for (int32_t ox = 0; ox < {OW}; ox++, p += {sw}) r[ox] = r[ox] + {terms};",
                    "      }"]
            return out

        step_c = chunks[0][0] if K <= MAX_TAPS else 1
        full = Cg - (Cg % step_c if K <= MAX_TAPS else 0)
        lines.append("    int32_t c = 0;")
        lines.append(f"    for (; c < {full}; c += {step_c}) {{")
        lines.append(f"      const {xt} *s = src + c * {HP * WP};")
        wtype = C_TYPES[str(a['w'].dtype)] if q else "float"
        lines.append(f"      const {wtype} *w = wm + c * {K};")
        if K <= MAX_TAPS:
            lines += body(step_c, 0, K)
        else:
            for (_, t0, t1) in chunks:
                lines.append("      {")
                lines += ["  " + ln for ln in body(1, t0, t1)]
                lines.append("      }")
        lines.append("    }")
        if K <= MAX_TAPS and Cg % step_c:
            lines.append("    {")
            lines.append(f"      const {xt} *s = src + c * {HP * WP};")
            lines.append(f"      const {wtype} *w = wm + c * {K};")
            lines += body(Cg % step_c, 0, K)
            lines.append("    }")
        if q is None:
            lines += self._act_lines(a.get("act"), "o", OH * OW, "    ")
        else:
            lo, hi = Q_RANGE[q["ytype"]]
            yz = q["yz"]
            lines += [f"    const float sc = {sname}[m];",
                      f"    {C_TYPES[q['ytype']]} *d = y + m * {OH * OW};",
                      f"    for (int32_t i = 0; i < {OH * OW}; i++)",
                      f"      d[i] = ({C_TYPES[q['ytype']]})(ap_nn_quant((float)o[i] * sc, {c_float(lo - yz)}, "
                      f"{c_float(hi - yz)}) + {yz});"]
        lines.append("  }")
        return "\n".join(lines)

    def _act_lines(self, act, v: str, n: int, ind: str) -> list[str]:
        if not act:
            return []
        # Selects, not conditional stores: the compilers vectorise these (NaN and -0.0 pass as before).
        if act[0] == "relu":
            return [f"{ind}for (int32_t i = 0; i < {n}; i++) {v}[i] = {v}[i] < 0.0f ? 0.0f : {v}[i];"]
        lo, hi = act[1], act[2]
        out = [f"{ind}for (int32_t i = 0; i < {n}; i++) {{"]
        if lo != -np.inf:
            out.append(f"{ind}  {v}[i] = {v}[i] < {c_float(lo)} ? {c_float(lo)} : {v}[i];")
        if hi != np.inf:
            out.append(f"{ind}  {v}[i] = {v}[i] > {c_float(hi)} ? {c_float(hi)} : {v}[i];")
        out.append(f"{ind}}}")
        return out

    def _gemm(self, op: Op) -> str:
        a = op.attrs
        batch, M, K, N = a["batch"], a["M"], a["K"], a["N"]
        ar, ak = a["a_strides"]
        A, Y = self.ptr(op.inputs[0]), self.ptr(op.outputs[0])
        lines = [f"  const float *A = {A};", f"  float *Y = {Y};"]
        if a["bt"] is not None:
            bt = self.const("bt", a["bt"], "float32", op.where)
            lines.append(f"  const float *BT = {bt};")
            bk, bn, bb = 1, K, 0
        else:
            lines.append(f"  const float *BT = {self.ptr(a['b'])};")
            bk, bn = a["b_strides"]
            bb = a["b_batch"]
        c = self.const("c", a["c"], "float32", op.where) if a["c"] is not None else None
        alpha, beta = a["alpha"], a["beta"]
        lines += [f"  for (int32_t bi = 0; bi < {batch}; bi++)",
                  f"    for (int32_t m = 0; m < {M}; m++) {{",
                  f"      const float *a = A + bi * {a['a_batch']} + m * {ar};",
                  f"      float *y = Y + (bi * {M} + m) * {N};",
                  f"      for (int32_t n = 0; n < {N}; n++) {{",
                  f"        const float *b = BT + bi * {bb} + n * {bn};",
                  "        float acc = 0.0f;",
                  "        int32_t k = 0;"]
        if ak == 1 and bk == 1:
            lines += [f"        for (; k + 4 <= {K}; k += 4) {{",
                      "          acc += a[k] * b[k]; acc += a[k + 1] * b[k + 1];",
                      "          acc += a[k + 2] * b[k + 2]; acc += a[k + 3] * b[k + 3];",
                      "        }"]
        lines.append(f"        for (; k < {K}; k++) acc += a[k * {ak}] * b[k * {bk}];")
        expr = "acc" if alpha == 1.0 else f"{c_float(alpha)} * acc"
        if c is not None:
            cterm = f"{c}[m * {N} + n]" if beta == 1.0 else f"{c_float(beta)} * {c}[m * {N} + n]"
            expr = f"{expr} + {cterm}"
        lines.append(f"        y[n] = {expr};")
        lines += ["      }"] + self._act_lines(a.get("act"), "y", N, "      ") + ["    }"]
        return "\n".join(lines)

    def _qgemm(self, op: Op) -> str:
        a = op.attrs
        batch, M, K, N = a["batch"], a["M"], a["K"], a["N"]
        ar, ak = a["a_strides"]
        at = C_TYPES[a["atype"]]
        bt = self.const("bt", a["bt"], str(a["bt"].dtype), op.where)
        az = a["az"]
        bz = a["bz"].astype(np.int64)
        # acc = sum a b - bz sum a - az sum b + K az bz (+ bias): the zero points leave the inner loop.
        corr = (-az * a["bsum"].astype(np.int64) + K * az * bz)
        bias = a["bias"]
        if bias is not None:
            corr_full = bias.astype(np.int64) + corr[None, :]
            if np.abs(corr_full).max(initial=0) >= 2 ** 31:
                raise ModelError(f"{self.g.model}: {op.where}: bias and zero points overflow int32")
            cname = self.const("corr", corr_full, "int32", op.where)
            cidx = f"m * {N} + n"
        else:
            cname = self.const("corr", corr, "int32", op.where)
            cidx = "n"
        sname = self.const("scale", a["scales"], "float32", op.where)
        bzname = self.const("bz", bz, "int32", op.where) if np.any(bz) else None
        yt = C_TYPES[a["ytype"]] if a["ytype"] else "float"
        lines = [f"  const {at} *A = {self.ptr(op.inputs[0])};", f"  {yt} *Y = {self.ptr(op.outputs[0])};",
                 f"  for (int32_t bi = 0; bi < {batch}; bi++)",
                 f"    for (int32_t m = 0; m < {M}; m++) {{",
                 f"      const {at} *a = A + bi * {a['a_batch']} + m * {ar};",
                 f"      {yt} *y = Y + (bi * {M} + m) * {N};"]
        if bzname:
            lines += ["      int32_t asum = 0;", f"      for (int32_t k = 0; k < {K}; k++) asum += a[k * {ak}];"]
        lines += [f"      for (int32_t n = 0; n < {N}; n++) {{",
                  f"        const {C_TYPES[str(a['bt'].dtype)]} *b = {bt} + n * {K};",
                  f"        int32_t acc = {cname}[{cidx}];",
                  "        int32_t k = 0;"]
        if ak == 1:
            lines += [f"        for (; k + 4 <= {K}; k += 4)",
                      "          acc += (int32_t)a[k] * b[k] + (int32_t)a[k + 1] * b[k + 1]"
                      " + (int32_t)a[k + 2] * b[k + 2] + (int32_t)a[k + 3] * b[k + 3];"]
        lines.append(f"        for (; k < {K}; k++) acc += (int32_t)a[k * {ak}] * b[k];")
        if bzname:
            lines.append(f"        acc -= {bzname}[n] * asum;")
        if a["ytype"]:
            lo, hi = Q_RANGE[a["ytype"]]
            yz = a["yz"]
            lines.append(f"        y[n] = ({yt})(ap_nn_quant((float)acc * {sname}[n], {c_float(lo - yz)}, "
                         f"{c_float(hi - yz)}) + {yz});")
        else:
            lines.append(f"        y[n] = (float)acc * {sname}[n];")
        lines += ["      }", "    }"]
        return "\n".join(lines)

    # -- broadcasting elementwise ops --

    def _bcast_loops(self, shape: tuple, shapes: list[tuple], body, ind: str = "  ") -> list[str]:
        """Nested loops over `shape`; body(index expressions per operand, output index) -> lines.
        Dimensions where every operand is contiguous or broadcast alike are merged first."""
        r = len(shape)
        strides = []
        for s in shapes:
            s = (1,) * (r - len(s)) + tuple(s)
            st, acc = [0] * r, 1
            for i in range(r - 1, -1, -1):
                st[i] = 0 if s[i] == 1 and shape[i] != 1 else acc
                acc *= s[i]
            strides.append(st)
        dims = list(shape)
        sts = [list(s) for s in strides]
        i = len(dims) - 1
        while i > 0:   # merge dim i-1 into i when every operand steps through both as one
            if all(st[i - 1] == st[i] * dims[i] for st in sts):
                dims[i - 1] *= dims[i]
                for st in sts:
                    st[i - 1] = st[i]
                del dims[i]
                for st in sts:
                    del st[i]
            i -= 1
        dims = dims or [1]
        sts = [s or [0] for s in sts]
        lines, idx = [], [[] for _ in shapes]
        for d, n in enumerate(dims):
            v = f"i{d}"
            lines.append(f"{ind}{'  ' * d}for (int32_t {v} = 0; {v} < {n}; {v}++)")
            for k, st in enumerate(sts):
                if st[d]:
                    idx[k].append(f"{v} * {st[d]}" if st[d] != 1 else v)
        out_idx, acc = [], 1
        for d in range(len(dims) - 1, -1, -1):
            out_idx.append(f"i{d} * {acc}" if acc != 1 else f"i{d}")
            acc *= dims[d]
        exprs = [" + ".join(ix) if ix else "0" for ix in idx]
        inner = body(exprs, " + ".join(reversed(out_idx)))
        lines.append(f"{ind}{'  ' * len(dims)}{inner}")
        return lines

    def _operand(self, op: Op, which: str) -> str:
        a = op.attrs
        const = a[f"{which}_const"]
        if const is not None:
            return self.const(which, const, str(const.dtype) if const.dtype != np.float64 else "float32", op.where)
        return self.ptr(a[which])

    def _binary(self, op: Op) -> str:
        a = op.attrs
        A, B, Y = self._operand(op, "a"), self._operand(op, "b"), self.ptr(op.outputs[0])
        sym = {"add": "+", "sub": "-", "mul": "*", "div": "/"}[a["fn"]]
        lines = [f"  const float *A = {A};", f"  const float *B = {B};", f"  float *Y = {Y};"]
        lines += self._bcast_loops(a["shape"], [a["a_shape"], a["b_shape"]],
                                   lambda ix, o: f"Y[{o}] = A[{ix[0]}] {sym} B[{ix[1]}];")
        return "\n".join(lines)

    def _qbinary(self, op: Op) -> str:
        a = op.attrs
        A, B, Y = self._operand(op, "a"), self._operand(op, "b"), self.ptr(op.outputs[0])
        lo, hi = Q_RANGE[a["ytype"]]
        cz = a["cz"]
        lines = [f"  const {C_TYPES[a['atype']]} *A = {A};", f"  const {C_TYPES[a['btype']]} *B = {B};",
                 f"  {C_TYPES[a['ytype']]} *Y = {Y};"]
        fa = f"{c_float(a['as_'])} * (float)((int32_t)A[{{0}}] - {a['az']})"
        fb = f"{c_float(a['bs'])} * (float)((int32_t)B[{{1}}] - {a['bz']})"
        op_sym = "+" if a["fn"] == "add" else "*"

        def body(ix, o):
            v = f"({fa.format(ix[0], ix[1])} {op_sym} {fb.format(ix[0], ix[1])}) / {c_float(a['cs'])}"
            return (f"Y[{o}] = ({C_TYPES[a['ytype']]})(ap_nn_quant({v}, {c_float(lo - cz)}, {c_float(hi - cz)}) "
                    f"+ {cz});")
        lines += self._bcast_loops(a["shape"], [a["a_shape"], a["b_shape"]], body)
        return "\n".join(lines)

    def _unary(self, op: Op) -> str:
        a = op.attrs
        n = a["n"]
        lines = [f"  const float *x = {self.ptr(op.inputs[0])};", f"  float *y = {self.ptr(op.outputs[0])};",
                 f"  for (int32_t i = 0; i < {n}; i++) {{", "    const float v = x[i];"]
        fn = a["fn"]
        if fn == "relu":
            lines.append("    y[i] = v < 0.0f ? 0.0f : v;")
        elif fn == "leakyrelu":
            lines.append(f"    y[i] = v >= 0.0f ? v : v * {c_float(a['alpha'])};")
        elif fn == "sigmoid":
            lines.append("    y[i] = ap_nn_sigmoid(v);")
        elif fn == "tanh":
            lines.append("    y[i] = ap_nn_tanh(v);")
        elif fn == "clip":
            e = "v"
            if a["lo"] != -np.inf:
                e = f"({e} < {c_float(a['lo'])} ? {c_float(a['lo'])} : {e})"
            if a["hi"] != np.inf:
                e = f"({e} > {c_float(a['hi'])} ? {c_float(a['hi'])} : {e})"
            lines.append(f"    y[i] = {e};")
        lines.append("  }")
        return "\n".join(lines)

    def _lut(self, op: Op) -> str:
        a = op.attrs
        table = self.const("lut", a["table"], a["ytype"], op.where)
        return "\n".join([f"  const {C_TYPES[a['xtype']]} *x = {self.ptr(op.inputs[0])};",
                          f"  {C_TYPES[a['ytype']]} *y = {self.ptr(op.outputs[0])};",
                          f"  for (int32_t i = 0; i < {a['n']}; i++) y[i] = {table}[(uint8_t)x[i]];"])

    def _pool(self, op: Op) -> str:
        a = op.attrs
        C, H, W, OH, OW = a["C"], a["H"], a["W"], a["OH"], a["OW"]
        KH, KW, sh, sw, dh, dw = a["KH"], a["KW"], a["sh"], a["sw"], a["dh"], a["dw"]
        pt, pl, pb, pr = a["pt"], a["pl"], a["pb"], a["pr"]
        q = a["quant"]
        xt = C_TYPES[a["dtype"]]
        yt = C_TYPES[q["ytype"]] if q else xt
        lines = [f"  const {xt} *X = {self.ptr(op.inputs[0])};", f"  {yt} *Y = {self.ptr(op.outputs[0])};",
                 f"  for (int32_t c = 0; c < {C}; c++) {{",
                 f"    const {xt} *x = X + c * {H * W};",
                 f"    {yt} *y = Y + c * {OH * OW};",
                 f"    for (int32_t oy = 0; oy < {OH}; oy++) {{",
                 f"      const int32_t hs = oy * {sh} - {pt};",
                 f"      for (int32_t ox = 0; ox < {OW}; ox++) {{",
                 f"        const int32_t ws = ox * {sw} - {pl};"]
        if a["pool"] == "max":
            acc_t = "float" if a["dtype"] == "float32" else "int32_t"
            lines += [f"        {acc_t} v = {TYPE_MIN[a['dtype']]};",
                      f"        for (int32_t ky = 0; ky < {KH}; ky++) {{",
                      f"          const int32_t iy = hs + ky * {dh};",
                      f"          if (iy < 0 || iy >= {H}) continue;",
                      f"          for (int32_t kx = 0; kx < {KW}; kx++) {{",
                      f"            const int32_t ix = ws + kx * {dw};",
                      f"            if (ix >= 0 && ix < {W} && x[iy * {W} + ix] > v) v = x[iy * {W} + ix];",
                      "          }", "        }",
                      f"        y[oy * {OW} + ox] = ({yt})v;"]
        else:
            # Divisor: with count_include_pad the window clipped to the padded input (onnxruntime's
            # float AveragePool), or for QLinearAveragePool the whole kernel as onnxruntime does.
            lines += [f"        const int32_t he = hs + {KH} < {H + pb} ? hs + {KH} : {H + pb};",
                      f"        const int32_t we = ws + {KW} < {W + pr} ? ws + {KW} : {W + pr};",
                      "        const int32_t y0 = hs < 0 ? 0 : hs, x0 = ws < 0 ? 0 : ws;",
                      f"        const int32_t y1 = he < {H} ? he : {H}, x1 = we < {W} ? we : {W};",
                      "        float sum = 0.0f;",
                      "        for (int32_t iy = y0; iy < y1; iy++)",
                      "          for (int32_t ix = x0; ix < x1; ix++)"]
            if q:
                lines.append(f"            sum += {c_float(q['xs'])} * "
                             f"(float)((int32_t)x[iy * {W} + ix] - {q['xz']});")
                count = str(KH * KW) if a["count_include_pad"] else "(y1 - y0) * (x1 - x0)"
                lo, hi = Q_RANGE[q["ytype"]]
                lines += [f"        const float v = (sum / (float)({count})) / {c_float(q['ys'])} + (float){q['yz']};",
                          f"        y[oy * {OW} + ox] = ({yt})ap_nn_quant(v, {c_float(lo)}, {c_float(hi)});"]
            else:
                lines.append(f"            sum += x[iy * {W} + ix];")
                count = "(he - hs) * (we - ws)" if a["count_include_pad"] else "(y1 - y0) * (x1 - x0)"
                lines.append(f"        y[oy * {OW} + ox] = sum / (float)({count});")
        lines += ["      }", "    }", "  }"]
        return "\n".join(lines)

    def _gpool(self, op: Op) -> str:
        a = op.attrs
        C, n = a["C"], a["n"]
        q = a["quant"]
        xt = C_TYPES[a["dtype"]]
        yt = C_TYPES[q["ytype"]] if q else xt
        lines = [f"  const {xt} *X = {self.ptr(op.inputs[0])};", f"  {yt} *Y = {self.ptr(op.outputs[0])};",
                 f"  for (int32_t c = 0; c < {C}; c++) {{", f"    const {xt} *x = X + c * {n};"]
        if q:
            lo, hi = Q_RANGE[q["ytype"]]
            yz = q["yz"]
            lines += ["    int32_t acc = 0;", f"    for (int32_t i = 0; i < {n}; i++) acc += x[i];",
                      f"    acc -= {q['xz'] * n};",
                      f"    Y[c] = ({yt})(ap_nn_quant((float)acc * {c_float(q['scale'])}, {c_float(lo - yz)}, "
                      f"{c_float(hi - yz)}) + {yz});"]
        elif a["pool"] == "avg":
            lines += ["    float sum = 0.0f;", f"    for (int32_t i = 0; i < {n}; i++) sum += x[i];",
                      f"    Y[c] = sum / {c_float(n)};"]
        else:
            lines += ["    float v = x[0];", f"    for (int32_t i = 1; i < {n}; i++) if (x[i] > v) v = x[i];",
                      "    Y[c] = v;"]
        lines.append("  }")
        return "\n".join(lines)

    def _softmax(self, op: Op) -> str:
        a = op.attrs
        outer, n, inner = a["outer"], a["n"], a["inner"]
        return "\n".join([
            f"  const float *X = {self.ptr(op.inputs[0])};", f"  float *Y = {self.ptr(op.outputs[0])};",
            f"  for (int32_t o = 0; o < {outer}; o++)",
            f"    for (int32_t j = 0; j < {inner}; j++) {{",
            f"      const float *x = X + o * {n * inner} + j;",
            f"      float *y = Y + o * {n * inner} + j;",
            "      float mx = x[0];",
            f"      for (int32_t i = 1; i < {n}; i++) if (x[i * {inner}] > mx) mx = x[i * {inner}];",
            "      float sum = 0.0f;",
            f"      for (int32_t i = 0; i < {n}; i++) {{ y[i * {inner}] = ap_nn_expf(x[i * {inner}] - mx); "
            f"sum += y[i * {inner}]; }}",
            f"      for (int32_t i = 0; i < {n}; i++) y[i * {inner}] = y[i * {inner}] / sum;",
            "    }"])

    def _reduce(self, op: Op) -> str:
        a = op.attrs
        outer, n, inner = a["outer"], a["n"], a["inner"]
        if a["fn"] == "max":
            init, step, fin = "x[0]", f"if (x[i * {inner}] > v) v = x[i * {inner}];", "v"
            start = 1
        else:
            init, step, start = "0.0f", f"v += x[i * {inner}];", 0
            fin = f"v / {c_float(n)}" if a["fn"] == "mean" else "v"
        return "\n".join([
            f"  const float *X = {self.ptr(op.inputs[0])};", f"  float *Y = {self.ptr(op.outputs[0])};",
            f"  for (int32_t o = 0; o < {outer}; o++)",
            f"    for (int32_t j = 0; j < {inner}; j++) {{",
            f"      const float *x = X + o * {n * inner} + j;",
            f"      float v = {init};",
            f"      for (int32_t i = {start}; i < {n}; i++) {step}",
            f"      Y[o * {inner} + j] = {fin};",
            "    }"])

    def _qsoftmax(self, op: Op) -> str:
        """onnxruntime's QLinearSoftmax: a table of exp per distance from the row maximum."""
        a = op.attrs
        outer, n, inner = a["outer"], a["n"], a["inner"]
        table = self.const("exp", a["table"], "float32", op.where)
        xt, yt = C_TYPES[a["xtype"]], C_TYPES[a["ytype"]]
        lo, hi = Q_RANGE[a["ytype"]]
        return "\n".join([
            f"  const {xt} *X = {self.ptr(op.inputs[0])};", f"  {yt} *Y = {self.ptr(op.outputs[0])};",
            f"  for (int32_t o = 0; o < {outer}; o++)",
            f"    for (int32_t j = 0; j < {inner}; j++) {{",
            f"      const {xt} *x = X + o * {n * inner} + j;",
            f"      {yt} *y = Y + o * {n * inner} + j;",
            "      int32_t mx = x[0];",
            f"      for (int32_t i = 1; i < {n}; i++) if (x[i * {inner}] > mx) mx = x[i * {inner}];",
            "      float sum = 0.0f;",
            f"      for (int32_t i = 0; i < {n}; i++) sum += {table}[255 - (mx - (int32_t)x[i * {inner}])];",
            "      if (sum == 0.0f) sum = 1.0f;",
            f"      for (int32_t i = 0; i < {n}; i++) {{",
            f"        float r = ({table}[255 - (mx - (int32_t)x[i * {inner}])] * {c_float(a['yscale'])}) / sum;",
            # table * yscale overflows to inf when the row is short (the table is scaled so that n
            # entries sum to nearly FLT_MAX): saturate, not an undefined float -> int conversion.
            "        if (!(r < 65536.0f)) r = 65536.0f;",
            "        const float v = ap_nn_rint(r);",
            f"        int32_t q = (int32_t)v + {a['yz']};",
            f"        y[i * {inner}] = ({yt})(q < {lo} ? {lo} : q > {hi} ? {hi} : q);",
            "      }",
            "    }"])

    def _quantize(self, op: Op) -> str:
        a = op.attrs
        outer, n, inner = a["outer"], a["n"], a["inner"]
        lo, hi = Q_RANGE[a["ytype"]]
        yt = C_TYPES[a["ytype"]]
        s = self.const("scale", a["scale"], "float32", op.where)
        z = self.const("zp", a["zp"], "int32", op.where)
        return "\n".join([
            f"  const float *X = {self.ptr(op.inputs[0])};", f"  {yt} *Y = {self.ptr(op.outputs[0])};",
            f"  for (int32_t o = 0; o < {outer}; o++)",
            f"    for (int32_t c = 0; c < {n}; c++) {{",
            f"      const float s = {s}[c];",
            f"      const int32_t z = {z}[c];",
            f"      const float lo = (float)({lo} - z), hi = (float)({hi} - z);",
            f"      const float *x = X + (o * {n} + c) * {inner};",
            f"      {yt} *y = Y + (o * {n} + c) * {inner};",
            f"      for (int32_t i = 0; i < {inner}; i++) y[i] = ({yt})(ap_nn_quant(x[i] / s, lo, hi) + z);",
            "    }"])

    def _dequantize(self, op: Op) -> str:
        a = op.attrs
        outer, n, inner = a["outer"], a["n"], a["inner"]
        s = self.const("scale", a["scale"], "float32", op.where)
        z = self.const("zp", a["zp"], "int32", op.where)
        xt = C_TYPES[a["xtype"]]
        return "\n".join([
            f"  const {xt} *X = {self.ptr(op.inputs[0])};", f"  float *Y = {self.ptr(op.outputs[0])};",
            f"  for (int32_t o = 0; o < {outer}; o++)",
            f"    for (int32_t c = 0; c < {n}; c++) {{",
            f"      const float s = {s}[c];",
            f"      const int32_t z = {z}[c];",
            f"      const {xt} *x = X + (o * {n} + c) * {inner};",
            f"      float *y = Y + (o * {n} + c) * {inner};",
            f"      for (int32_t i = 0; i < {inner}; i++) y[i] = (float)((int32_t)x[i] - z) * s;",
            "    }"])

    def _transpose(self, op: Op) -> str:
        a = op.attrs
        shape, perm = a["in_shape"], a["perm"]
        out_shape = tuple(shape[p] for p in perm)
        in_strides = [prod(shape[i + 1:]) for i in range(len(shape))]
        t = C_TYPES[a["dtype"]]
        lines = [f"  const {t} *X = {self.ptr(op.inputs[0])};", f"  {t} *Y = {self.ptr(op.outputs[0])};",
                 "  int32_t o = 0;"]
        for d, n in enumerate(out_shape):
            lines.append(f"  {'  ' * d}for (int32_t i{d} = 0; i{d} < {n}; i{d}++)")
        src = " + ".join(f"i{d} * {in_strides[perm[d]]}" for d in range(len(perm)))
        lines.append(f"  {'  ' * len(out_shape)}Y[o++] = X[{src}];")
        return "\n".join(lines)

    def _slice(self, op: Op) -> str:
        a = op.attrs
        shape, first, step, out = a["in_shape"], a["first"], a["step"], a["shape"]
        strides = [prod(shape[i + 1:]) for i in range(len(shape))]
        t = C_TYPES[a["dtype"]]
        base = sum(f * s for f, s in zip(first, strides))
        lines = [f"  const {t} *X = {self.ptr(op.inputs[0])} + {base};", f"  {t} *Y = {self.ptr(op.outputs[0])};",
                 "  int32_t o = 0;"]
        for d, n in enumerate(out):
            lines.append(f"  {'  ' * d}for (int32_t i{d} = 0; i{d} < {n}; i{d}++)")
        src = " + ".join(f"i{d} * {step[d] * strides[d]}" for d in range(len(out))) or "0"
        lines.append(f"  {'  ' * len(out)}Y[o++] = X[{src}];")
        return "\n".join(lines)

    def _concat(self, op: Op) -> str:
        a = op.attrs
        t = C_TYPES[a["dtype"]]
        lines = [f"  {t} *Y = {self.ptr(op.outputs[0])};", f"  for (int32_t o = 0; o < {a['outer']}; o++) {{",
                 f"    {t} *y = Y + o * {a['total']};"]
        off = 0
        for name, count, const in a["parts"]:
            src = self.const("part", const, a["dtype"], op.where) if const is not None else self.ptr(name)
            lines.append(f"    {{ const {t} *x = {src} + o * {count}; "
                         f"for (int32_t i = 0; i < {count}; i++) y[{off} + i] = x[i]; }}")
            off += count
        lines.append("  }")
        return "\n".join(lines)

    def _affine(self, op: Op) -> str:
        a = op.attrs
        s = self.const("s", a["s"], "float32", op.where)
        t = self.const("t", a["t"], "float32", op.where)
        n = a["C"] * a["inner"]
        return "\n".join([
            f"  const float *X = {self.ptr(op.inputs[0])};", f"  float *Y = {self.ptr(op.outputs[0])};",
            f"  for (int32_t o = 0; o < {a['outer']}; o++)",
            f"    for (int32_t c = 0; c < {a['C']}; c++)",
            f"      for (int32_t i = 0; i < {a['inner']}; i++) "
            f"Y[o * {n} + c * {a['inner']} + i] = X[o * {n} + c * {a['inner']} + i] * {s}[c] + {t}[c];"])


def plan(buffers: list[Buffer]) -> int:
    """Offsets for buffers whose lifetimes [first, last] overlap only where their bytes do not:
    largest first, each at the lowest aligned offset free during its lifetime."""
    placed: list[Buffer] = []
    for b in sorted(buffers, key=lambda b: (-b.nbytes, b.first, b.name)):
        busy = sorted((p.offset, p.offset + p.nbytes) for p in placed if not (p.last < b.first or b.last < p.first))
        off = 0
        for start, end in busy:
            if off + b.nbytes <= start:
                break
            off = max(off, -(-end // ALIGN) * ALIGN)
        b.offset = off
        placed.append(b)
    return max((b.offset + b.nbytes for b in placed), default=0)


def generate(graph: Graph, header_comment: str) -> Program:
    em = Emitter(graph)
    funcs = [em.emit(i, op) for i, op in enumerate(graph.ops)]
    nops = len(graph.ops)

    # Lifetimes of the storage tensors (aliases share their root's).
    first: dict[str, int] = {graph.storage(graph.input): -1}
    last: dict[str, int] = {graph.storage(graph.input): -1}
    for i, op in enumerate(graph.ops):
        for name in op.inputs:
            if graph.tensors[name].is_const:
                continue
            root = graph.storage(name)
            last[root] = max(last.get(root, i), i)
        for name in op.outputs:
            root = graph.storage(name)
            first.setdefault(root, i)
            last[root] = max(last.get(root, i), i)
    for out in graph.outputs:
        last[graph.storage(out)] = nops
    # One arena layout per build: the wasm3 build's scratch (padding) is not the others' (im2col).
    layouts = {}
    for build in ("scalar", "vector"):
        buffers = []
        for root in first:
            t = graph.tensors[root]
            buffers.append(Buffer(f"{em.buffer_id(root)}", t.nbytes, first[root], last[root]))
        for i, scratch in em.scratch.items():
            for name, nbytes, only in scratch:
                if only in (None, build):
                    buffers.append(Buffer(name, nbytes, i, i))
        arena = plan(buffers)
        layouts[build] = (max(ALIGN, -(-arena // ALIGN) * ALIGN), buffers)

    in_t = graph.tensors[graph.input]
    slices, off = [], 0
    collect = []
    for out in graph.outputs:
        t = graph.tensors[out]
        slices.append((out, off, t.size, t.shape))
        collect.append(f"  {{ const {C_TYPES[t.dtype]} *y = {em.ptr(out)}; "
                       f"for (int32_t i = 0; i < {t.size}; i++) out[{off} + i] = (float)y[i]; }}")
        off += t.size

    defs = []
    for build, cond in (("scalar", "#if AP_NN_SCALAR"), ("vector", "#else")):
        arena, buffers = layouts[build]
        defs += [cond, f"#define NN_ARENA_BYTES {arena}"]
        defs += [f"#define NN_OFF_{b.name} {b.offset}" for b in sorted(buffers, key=lambda b: b.offset)]
    defs.append("#endif")
    src = [
        header_comment,
        "#include \"ap_nn.h\"",
        "",
        f"#define NN_INPUT_FLOATS {in_t.size}",
        f"#define NN_OUTPUT_FLOATS {off}",
        *defs,
        "",
        "static uint8_t nn_arena[NN_ARENA_BYTES] __attribute__((aligned(16)));",
        "",
        *em.consts,
        "",
        *em.funcs,
        "",
        "/* The model input (float32, filled from the window) and the outputs as one float block. */",
        f"static float *nn_input(void) {{ return {em.ptr(graph.input)}; }}",
        "",
        "static void nn_forward(void) {",
        *[f"  {f}();" for f in funcs],
        "}",
        "",
        "static void nn_collect(float *out) {",
        *collect,
        "}",
        "",
        "#if defined(AP_NN_NATIVE)",
        "/* The native twin for ap.nn_run (docs/models.md, Host-accelerated inference). */",
        "#define AP_NN_API __attribute__((visibility(\"default\")))",
        "AP_NN_API int32_t ap_nn_native_abi(void) { return 1; }",
        "AP_NN_API int32_t ap_nn_native_sizes(int32_t *in_bytes, int32_t *out_bytes) {",
        "  *in_bytes = 4 * NN_INPUT_FLOATS;",
        "  *out_bytes = 4 * NN_OUTPUT_FLOATS;",
        "  return 0;",
        "}",
        "AP_NN_API int32_t ap_nn_native_run(const void *in, int32_t in_len, float *out, int32_t out_len) {",
        "  if (in_len != 4 * NN_INPUT_FLOATS || out_len != 4 * NN_OUTPUT_FLOATS) return 4;",
        "  ap_nn_copy(nn_input(), in, (size_t)in_len);",
        "  nn_forward();",
        "  nn_collect(out);",
        "  return 0;",
        "}",
        "#if defined(__x86_64__)",
        "/* Tests: cap the vector width (0 SSE2, 1 AVX2, 2 AVX-512F) to check every kernel's bits. */",
        "AP_NN_API int32_t ap_nn_native_x86_level(int32_t level) { return ap_nn_x86_limit(level); }",
        "#endif",
        "AP_NN_NATIVE_LIBC",
        "#endif",
        "",
    ]
    summary = [f"{i:3d} {op.where}: {op.attrs.get('label', op.kind)} -> "
               f"{', '.join(em.shape_text(o) for o in op.outputs)}" for i, op in enumerate(graph.ops)]
    return Program("\n".join(src), layouts["scalar"][0], em.const_bytes, in_t.size, off, slices, summary,
                   layouts["vector"][0])
