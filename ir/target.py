"""Targets as data: which backend and device a Program is lowered for.

Passes, analyses and backends read the Target from here (`ctx.target` is one);
`pared.targets` is the front door's name for the same objects.

A Target records its backend (ONNX Runtime or TVM), the execution provider or
TVM target (in TVM 0.27's dict form: it rejects "llvm -mcpu=..." strings), the
precisions the hardware runs fast, its peak compute and memory bandwidth (for
the cost model), and threads. Torch-free: the Executor reads the target from
the manifest.

Named targets: ``cpu`` (the default), ``tvm-cpu``, ``tvm-native``, ``tvm-aarch64``, ``openvino-cpu``,
``cuda``. ``tvm-cpu`` builds for the architecture's baseline (x86-64: SSE2) and runs on any CPU of
it; ``tvm-native`` (``tvm_target: {kind: llvm, mattr: host}``) builds with the build host's SIMD
and bit-manipulation extensions, listed by ``resolve()`` (``+avx2``, ``+avx512f``, ...), and
pared.load refuses it on a CPU that lacks one (its code would stop on an illegal instruction).
A YAML device profile defines a custom one::

    name: jetson-orin-cpu
    backend: tvm
    tvm_target: {kind: llvm, mtriple: aarch64-linux-gnu, mcpu: cortex-a78}
    cross_compiler: aarch64-linux-gnu-gcc
    precisions: [fp32, int8]
    peak_flops: 2.0e11
    mem_bandwidth: 1.0e11
    threads: 8

ONNX Runtime targets may leave out graph rewrites that are slower on their device
(``ort_disabled_optimizers: [SkipLayerNormFusion]``, what ``cpu`` does); the
artifact's sessions and the INT8 kernel check use the same list.

A CPU target knows its instruction set: ``arch`` and ``isa`` (features named as
/proc/cpuinfo spells them: avx2, avx512f, avx512bw, avx512_vnni, avx_vnni, amx_int8;
dotprod, i8mm on ARM). Targets that run on the build host (``cpu``, ``tvm-cpu``,
``openvino-cpu``) leave them out and ``resolve()`` reads the host at build time;
cross targets and device profiles state them. From them follows the INT8 weight
range (``int8_weights: auto``): ONNX Runtime's x86 u8 x s8 kernels sum pairs of
products in 16 bits without VNNI or AMX, and saturate on full-range int8 weights,
so there weights are quantized to 7 bits (|w| <= 63, ORT's reduce_range), which
those kernels compute exactly at the same speed; everywhere else (VNNI, AMX, ARM,
TVM's integer kernels, GPUs) the full range [-127, 127] (ir.isa; measured in
benchmarks/int8_schemes.py). ``int8_weights: full`` or ``7bit`` forces one. The
manifest records the CPU the artifact assumes, and pared.load refuses a host whose
kernels would saturate on it.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import platform
from dataclasses import dataclass
from typing import Any, Mapping

from pared.ir import isa as _isa
from pared.ir.errors import TargetError

BACKENDS = ("onnxruntime", "tvm")
ORT_OPT_LEVELS = ("disable", "basic", "extended", "all")
INT8_WEIGHTS = ("auto", "full", "7bit")
INT8_WEIGHT_QMAX = _isa.INT8_WEIGHT_QMAX
CPU_PROVIDERS = _isa.CPU_EXECUTION_PROVIDERS


def _check_fields(cls: type, d: Mapping[str, Any], where: str) -> None:
    """Refuse a key of `d` that is not a field of dataclass `cls`, naming the closest one."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in d if k not in fields]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), sorted(fields), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(sorted(fields))}"
        raise TargetError(f"{where}: unknown field '{unknown[0]}'{hint}")


@dataclass(frozen=True)
class Target:
    name: str
    backend: str                                  # "onnxruntime" | "tvm"
    provider: str | None = None                   # ORT execution provider
    tvm_target: Mapping[str, Any] | None = None   # TVM target, dict form
    cross_compiler: str | None = None             # linker for a TVM cross build (None: host cc)
    precisions: tuple[str, ...] = ("fp32",)       # precisions with fast kernels
    peak_flops: float = 1e11                      # FLOP/s, for the cost model
    mem_bandwidth: float = 2e10                   # bytes/s, for the cost model
    threads: int = 0                              # intra-op threads; 0: the runtime's default
    ort_opt_level: str = "extended"               # ORT graph optimization level
    ort_disabled_optimizers: tuple[str, ...] = () # ORT graph rewrites left out (names as ORT registers them)
    arch: str | None = None                       # CPU architecture (x86_64, aarch64); None: the build host's
    isa: tuple[str, ...] | None = None            # CPU features assumed (ir.isa names); None: the build host's
    int8_weights: str = "auto"                    # int8 weight range: auto (by ISA), full [-127, 127], 7bit [-63, 63]
    description: str = ""

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise TargetError(f"target '{self.name}': backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "onnxruntime" and not self.provider:
            raise TargetError(f"target '{self.name}': an onnxruntime target needs 'provider'")
        if self.backend == "tvm" and not self.tvm_target:
            raise TargetError(f"target '{self.name}': a tvm target needs 'tvm_target' (dict form)")
        if self.tvm_target is not None and not isinstance(self.tvm_target, Mapping):
            raise TargetError(f"target '{self.name}': tvm_target must be a mapping like "
                              "{kind: llvm, mtriple: ...}; TVM 0.27 rejects target strings")
        if self.ort_opt_level not in ORT_OPT_LEVELS:
            raise TargetError(f"target '{self.name}': ort_opt_level must be one of {ORT_OPT_LEVELS}")
        for f in ("threads", "peak_flops", "mem_bandwidth"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TargetError(f"target '{self.name}': {f} must be a number, got {v!r}"
                                  + (" (YAML reads 1.0e11 as text: write 1.0e+11)" if isinstance(v, str) else ""))
        if self.threads < 0 or self.peak_flops <= 0 or self.mem_bandwidth <= 0:
            raise TargetError(f"target '{self.name}': threads must be >= 0 and peak_flops, mem_bandwidth > 0")
        object.__setattr__(self, "precisions", tuple(self.precisions))
        disabled = self.ort_disabled_optimizers
        if isinstance(disabled, str) or not all(isinstance(n, str) and n for n in disabled):
            raise TargetError(f"target '{self.name}': ort_disabled_optimizers must be a list of ONNX Runtime "
                              f"optimizer names like [SkipLayerNormFusion], got {disabled!r}")
        object.__setattr__(self, "ort_disabled_optimizers", tuple(disabled))
        if self.tvm_target is not None:
            object.__setattr__(self, "tvm_target", dict(self.tvm_target))
        if self.int8_weights not in INT8_WEIGHTS:
            raise TargetError(f"target '{self.name}': int8_weights must be one of {INT8_WEIGHTS}, "
                              f"got {self.int8_weights!r}")
        if self.isa is not None:
            if isinstance(self.isa, str) or not all(isinstance(f, str) for f in self.isa):
                raise TargetError(f"target '{self.name}': isa must be a list of CPU feature names like "
                                  f"[avx2, avx512_vnni], got {self.isa!r}")
            unknown = [f for f in self.isa if f not in _isa.FEATURES]
            if unknown:
                close = difflib.get_close_matches(unknown[0], _isa.FEATURES, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise TargetError(f"target '{self.name}': unknown CPU feature '{unknown[0]}' in isa; {hint}"
                                  f"known: {', '.join(_isa.FEATURES)}")
            object.__setattr__(self, "isa", tuple(sorted(set(self.isa))))

    @property
    def is_cross(self) -> bool:
        """A TVM build for another CPU architecture than this host's."""
        if self.backend != "tvm":
            return False
        triple = str(self.tvm_target.get("mtriple", ""))
        return bool(triple) and not triple.startswith(platform.machine())

    @property
    def on_host(self) -> bool:
        """The target's CPU is the build host's (its ISA is read there, not stated)."""
        if self.backend == "tvm":
            return not self.is_cross
        return self.provider in CPU_PROVIDERS

    def resolve(self) -> "Target":
        """This target with `arch` and `isa` filled in: read from the build host for a
        host target that leaves them out, the triple's architecture for a cross build.
        A GPU target has none (its integer kernels do not run on a CPU)."""
        arch, isa = self.arch, self.isa
        if arch is None:
            if self.backend == "tvm" and self.is_cross:
                arch = str(self.tvm_target.get("mtriple")).split("-")[0]
            elif self.on_host:
                arch = _isa.host_cpu().arch
        if isa is None:
            if self.on_host and (arch is None or arch == _isa.host_cpu().arch):
                isa = _isa.host_cpu().features
            elif self.backend == "tvm" and self.is_cross:
                isa = ()
        tvm_target = self.tvm_target
        if self.backend == "tvm" and tvm_target.get("mattr") == HOST_MATTR:
            if self.is_cross:
                raise TargetError(f"target '{self.name}': tvm_target mattr '{HOST_MATTR}' takes this host's CPU "
                                  f"features, which a cross build for {tvm_target.get('mtriple')} cannot use; "
                                  "list its features (mattr: [+neon, ...])")
            tvm_target = {**tvm_target, "mattr": list(_isa.native_mattr(_isa.host_cpu()))}
        if (arch, isa, tvm_target) == (self.arch, self.isa, self.tvm_target):
            return self
        return dataclasses.replace(self, arch=arch, isa=isa, tvm_target=tvm_target)

    @property
    def int8_weight_range(self) -> str:
        """`full` or `7bit`: the int8 weight range this target's integer kernels compute exactly
        (`int8_weights`, or by ISA when `auto`; see the module docstring)."""
        return _isa.int8_weight_range(self.to_json())

    @property
    def int8_weight_qmax(self) -> int:
        """Largest |q| of an int8 weight code on this target (127, or 63 for 7-bit weights)."""
        return INT8_WEIGHT_QMAX[self.int8_weight_range]

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["precisions"] = list(self.precisions)
        d["ort_disabled_optimizers"] = list(self.ort_disabled_optimizers)
        if self.isa is not None:
            d["isa"] = list(self.isa)
        return d

    @staticmethod
    def from_json(d: Mapping[str, Any], *, where: str = "target") -> "Target":
        _check_fields(Target, d, where)
        if "name" not in d or "backend" not in d:
            raise TargetError(f"{where}: a target needs at least 'name' and 'backend'")
        try:
            return Target(**dict(d))
        except TypeError as e:
            raise TargetError(f"{where}: {e}") from None


@dataclass(frozen=True)
class Link:
    """A network link between two devices, as data: what a partition's cost model reads and
    what backends/link.ShapingProxy emulates on loopback.

    bandwidth: bytes per second each way (None: unlimited); rtt: round-trip time (s), half
    each way; jitter: one-way delay spread (s, uniform in [0, jitter]); loss: probability a
    chunk is lost and retransmitted after `rto` seconds (TCP recovers it: late, not missing).
    """

    name: str
    bandwidth: float | None = None
    rtt: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    rto: float = 0.2
    description: str = ""

    def __post_init__(self):
        for f in ("rtt", "jitter", "rto"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise TargetError(f"link '{self.name}': {f} must be a number of seconds >= 0, got {v!r}")
        bw = self.bandwidth
        if bw is not None and (isinstance(bw, bool) or not isinstance(bw, (int, float)) or bw <= 0):
            raise TargetError(f"link '{self.name}': bandwidth must be bytes/s > 0 (or null: unlimited), "
                              f"got {self.bandwidth!r}")
        if isinstance(self.loss, bool) or not isinstance(self.loss, (int, float)) or not 0 <= self.loss <= 1:
            raise TargetError(f"link '{self.name}': loss must be a probability in [0, 1], got {self.loss!r}")

    @staticmethod
    def mbit(name: str, mbit_s: float, rtt_ms: float = 0.0, **kw: Any) -> "Link":
        """A link spelled as people do: Mbit/s and milliseconds."""
        return Link(name, bandwidth=mbit_s * 1e6 / 8, rtt=rtt_ms / 1e3, **kw)

    def transfer_s(self, nbytes: int) -> float:
        """Ideal time to deliver `nbytes` one way: half the RTT plus serialization (no jitter, no loss)."""
        return self.rtt / 2 + (nbytes / self.bandwidth if self.bandwidth else 0.0)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: Mapping[str, Any], *, where: str = "link") -> "Link":
        _check_fields(Link, d, where)
        if "name" not in d:
            raise TargetError(f"{where}: a link needs a 'name'")
        return Link(**dict(d))


#: ONNX Runtime rewrites that make the CPU provider slower. SkipLayerNormFusion: ORT 1.32's CPU
#: SkipLayerNormalization kernel took 2.16 ms where the Add + LayerNormalization it replaces took
#: 0.60 ms ([8, 128, 384], 1 thread); all-MiniLM-L6-v2 (batch 8, seq 128) ran 1.25x faster in fp32
#: and 1.30x in INT8 without it (benchmarks/quant_minilm.py). GeluFusion, MatMulScaleFusion,
#: MatMulTransposeFusion and TransposeOptimizer measured helpful there and stay on.
CPU_SLOW_FUSIONS = ("SkipLayerNormFusion",)

#: tvm_target `mattr` that stands for the build host's extensions (Target.resolve lists them: ir.isa.native_mattr)
HOST_MATTR = "host"

NAMED: dict[str, Target] = {
    "cpu": Target("cpu", "onnxruntime", provider="CPUExecutionProvider",
                  precisions=("fp32", "int8"), peak_flops=2e11, mem_bandwidth=2e10,
                  ort_disabled_optimizers=CPU_SLOW_FUSIONS,
                  description="ONNX Runtime, CPU execution provider (default)"),
    "tvm-cpu": Target("tvm-cpu", "tvm", tvm_target={"kind": "llvm"},
                      precisions=("fp32", "int8"), peak_flops=2e11, mem_bandwidth=2e10,
                      description="TVM, llvm for this host"),
    "tvm-native": Target("tvm-native", "tvm", tvm_target={"kind": "llvm", "mattr": HOST_MATTR},
                         precisions=("fp32", "int8"), peak_flops=2e11, mem_bandwidth=2e10,
                         description="TVM, llvm with the build host's SIMD extensions (AVX2, AVX-512, ...): "
                                     "faster than tvm-cpu; pared.load refuses it on a CPU that lacks one"),
    "tvm-aarch64": Target("tvm-aarch64", "tvm",
                          tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
                          cross_compiler="aarch64-linux-gnu-gcc", arch="aarch64", isa=(),
                          precisions=("fp32", "fp16", "int8"), peak_flops=1e11, mem_bandwidth=5e10,
                          description="TVM cross-compiled for a 64-bit ARM CPU (runs on an ARM host)"),
    "openvino-cpu": Target("openvino-cpu", "onnxruntime", provider="OpenVINOExecutionProvider",
                           precisions=("fp32", "int8"), peak_flops=2e11, mem_bandwidth=2e10,
                           description="ONNX Runtime, OpenVINO execution provider on the CPU (needs the "
                                       "onnxruntime-openvino package, which replaces onnxruntime)"),
    "cuda": Target("cuda", "onnxruntime", provider="CUDAExecutionProvider",
                   precisions=("fp32", "fp16", "bf16", "int8"), peak_flops=6e13, mem_bandwidth=2e12,
                   description="ONNX Runtime, CUDA execution provider"),
}


def _read_yaml(path: str, what: str) -> Any:
    """The YAML document at `path`; TargetError naming `what` and the file when missing or malformed."""
    if not os.path.exists(path):
        raise TargetError(f"{what} {path} does not exist")
    import yaml
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise TargetError(f"{what} {path}: not valid YAML: {e}") from None


def get_target(spec: "str | os.PathLike | Target | Mapping[str, Any]") -> Target:
    """A Target from a name, a YAML device profile path, a mapping or a Target.

    Raises:
        TargetError: unknown name (listing the known ones) or malformed profile.
    """
    if isinstance(spec, Target):
        return spec
    if isinstance(spec, Mapping):
        return Target.from_json(spec)
    s = os.fspath(spec)
    if s in NAMED:
        return NAMED[s]
    if s.endswith((".yaml", ".yml")):
        data = _read_yaml(s, "device profile")
        if not isinstance(data, Mapping):
            raise TargetError(f"device profile {s}: expected a mapping of target fields")
        return Target.from_json(data, where=f"device profile {s}")
    close = difflib.get_close_matches(s, list(NAMED), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise TargetError(f"unknown target '{s}'; {hint}known targets: {', '.join(NAMED)}, "
                      "or a device profile .yaml")


@dataclass(frozen=True)
class Emulation:
    """How a device this host cannot run is stood in for when measuring: the host runs the
    device's graphs with target `host` and the time each call took is stretched `slowdown`
    times (the runtime sleeps the difference). For benchmarks of a placement whose edge is
    slower than this host; a real deployment leaves it out."""

    host: str = "cpu"
    slowdown: float = 1.0

    def __post_init__(self):
        s = self.slowdown
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 1:
            raise TargetError(f"emulation: slowdown must be a number >= 1, got {s!r}")
        if self.host not in NAMED:
            raise TargetError(f"emulation: 'host' must name a target ({', '.join(NAMED)}), got {self.host!r}")


@dataclass(frozen=True)
class Route:
    """A link between two named devices (both directions)."""

    a: str
    b: str
    link: Link


@dataclass(frozen=True)
class Deployment:
    """Devices and the links between them, as data: what a partition is built for.

    devices: name (`edge`, `cloud`, ...) -> Target; routes: the links between them;
    emulated: name -> Emulation for devices this host stands in for (benchmarks).
    A YAML file spells it::

        name: pi5-and-server
        devices:
          edge: {profile: pi5.yaml}         # a device profile file (relative to this file), or
          cloud: cpu                        # a named target, or a mapping of Target fields
        links:
          - {between: [edge, cloud], name: wifi, mbit: 20, rtt_ms: 30}
        emulate:
          edge: {host: cpu, slowdown: 4}
    """

    name: str
    devices: Mapping[str, Target]
    routes: tuple[Route, ...] = ()
    emulated: Mapping[str, Emulation] = dataclasses.field(default_factory=dict)
    description: str = ""

    def __post_init__(self):
        if not self.devices:
            raise TargetError(f"deployment '{self.name}': needs at least one device")
        object.__setattr__(self, "devices", dict(self.devices))
        object.__setattr__(self, "emulated", dict(self.emulated))
        object.__setattr__(self, "routes", tuple(self.routes))
        for r in self.routes:
            for d in (r.a, r.b):
                if d not in self.devices:
                    raise TargetError(f"deployment '{self.name}': link '{r.link.name}' names device '{d}', "
                                      f"which is not one of its devices ({', '.join(self.devices)})")
        for d in self.emulated:
            if d not in self.devices:
                raise TargetError(f"deployment '{self.name}': emulate names device '{d}', which is not one of "
                                  f"its devices ({', '.join(self.devices)})")

    def device(self, name: str) -> Target:
        if name not in self.devices:
            raise TargetError(f"deployment '{self.name}' has no device '{name}'; it has {', '.join(self.devices)}")
        return self.devices[name]

    def link(self, a: str, b: str) -> Link:
        for r in self.routes:
            if {r.a, r.b} == {a, b}:
                return r.link
        raise TargetError(f"deployment '{self.name}' has no link between '{a}' and '{b}'")

    def runs_here(self, name: str) -> bool:
        """Whether this host can run (or emulate) device `name`'s graphs to measure them: an
        emulated device, or a host target (one that does not state another CPU's arch or isa)."""
        t = self.device(name)
        return name in self.emulated or (t.on_host and t.arch is None and t.isa is None)

    def host_target(self, name: str) -> Target:
        """The target this host measures device `name` with (its own, or its emulation's)."""
        if name in self.emulated:
            return NAMED[self.emulated[name].host]
        return self.device(name)

    def slowdown(self, name: str) -> float:
        return self.emulated[name].slowdown if name in self.emulated else 1.0

    def with_link(self, a: str, b: str, link: Link) -> "Deployment":
        routes = tuple(r for r in self.routes if {r.a, r.b} != {a, b}) + (Route(a, b, link),)
        return dataclasses.replace(self, routes=routes)

    def to_json(self) -> dict:
        return {"name": self.name, "description": self.description,
                "devices": {k: v.to_json() for k, v in self.devices.items()},
                "links": [dict(r.link.to_json(), between=[r.a, r.b]) for r in self.routes],
                "emulate": {k: dataclasses.asdict(v) for k, v in self.emulated.items()}}

    @staticmethod
    def from_json(d: Mapping[str, Any], *, where: str = "deployment", base: str = ".") -> "Deployment":
        if not isinstance(d, Mapping):
            raise TargetError(f"{where}: expected a mapping with 'devices' and 'links'")
        unknown = [k for k in d if k not in ("name", "description", "devices", "links", "emulate")]
        if unknown:
            raise TargetError(f"{where}: unknown field '{unknown[0]}'; known: name, description, devices, "
                              "links, emulate")
        devs = d.get("devices")
        if not isinstance(devs, Mapping) or not devs:
            raise TargetError(f"{where}: 'devices' must map device names to targets")
        devices = {}
        for k, v in devs.items():
            if isinstance(v, Mapping) and set(v) == {"profile"}:
                v = os.path.join(base, str(v["profile"]))
            try:
                devices[str(k)] = get_target(v)
            except TargetError as e:
                raise TargetError(f"{where}: device '{k}': {e}") from None
        routes = []
        for i, item in enumerate(d.get("links") or ()):
            if not isinstance(item, Mapping):
                raise TargetError(f"{where}: links[{i}] must be a mapping")
            item = dict(item)
            between = item.pop("between", None)
            if not isinstance(between, (list, tuple)) or len(between) != 2:
                raise TargetError(f"{where}: links[{i}] needs 'between: [device, device]'")
            mbit, rtt_ms = item.pop("mbit", None), item.pop("rtt_ms", None)
            if mbit is not None:
                if isinstance(mbit, bool) or not isinstance(mbit, (int, float)) or mbit <= 0:
                    raise TargetError(f"{where}: links[{i}]: mbit must be a number > 0, got {mbit!r}")
                item["bandwidth"] = mbit * 1e6 / 8
            if rtt_ms is not None:
                if isinstance(rtt_ms, bool) or not isinstance(rtt_ms, (int, float)):
                    raise TargetError(f"{where}: links[{i}]: rtt_ms must be a number, got {rtt_ms!r}")
                item["rtt"] = rtt_ms / 1e3
            item.setdefault("name", f"{between[0]}-{between[1]}")
            routes.append(Route(str(between[0]), str(between[1]), Link.from_json(item, where=f"{where}: links[{i}]")))
        emulated = {}
        for k, v in (d.get("emulate") or {}).items():
            if not isinstance(v, Mapping):
                raise TargetError(f"{where}: emulate.{k} must be a mapping like {{host: cpu, slowdown: 4}}")
            _check_fields(Emulation, v, f"{where}: emulate.{k}")
            emulated[str(k)] = Emulation(**dict(v))
        return Deployment(str(d.get("name", "deployment")), devices, tuple(routes), emulated,
                          str(d.get("description", "")))


def get_deployment(spec: "str | os.PathLike | Deployment | Mapping[str, Any]") -> Deployment:
    """A Deployment from a YAML file path, a mapping or a Deployment.

    Raises:
        TargetError: a missing or malformed file, naming it and the field.
    """
    if isinstance(spec, Deployment):
        return spec
    if isinstance(spec, Mapping):
        return Deployment.from_json(spec)
    s = os.fspath(spec)
    data = _read_yaml(s, "deployment file")
    return Deployment.from_json(data, where=f"deployment file {s}", base=os.path.dirname(os.path.abspath(s)))
