"""Runtimes: what turns normalised images into anomaly maps, with torch, ONNX Runtime or OpenVINO.

Every runtime is a callable with one contract: float32 (B, 3, H, W) normalised images, as
numpy, -> Outputs: float32 (B, 1, H, W) anomaly maps and float32 (B,) image terms (0 without an
image-level model, stpm.gaussian), plus, when asked for with pooled=True, the teacher's pooled
features (B, D) that the image model reads (what the INT8 refit fits on). How maps and terms
become a score is stpm.scoring's business. A runtime also has `description` (the model's
ModelDescription), `name`, `threads` and `path` (its model file; None for a model only in
memory). The estimator holds one and knows nothing else about it, so a new runtime is a new
class here and a name in `open_runtime`.

- "torch": the `.pt` model file (teacher rebuilt from its ImageNet weights, student loaded).
- "onnxruntime": an `stpm-export` `.onnx` file, FP32 or INT8, on ONNX Runtime's CPU provider.
- "openvino": the same `.onnx` file through OpenVINO (`pip install "stpm[openvino]"`). On CPUs
  with BF16 arithmetic OpenVINO would compute in BF16 unless told otherwise; we ask for f32 by
  default (the maps then match the other runtimes) and record what it actually compiled to.

Only the torch runtime imports torch (and timm): scoring an exported file needs neither.
Every runtime may be called from several threads at once (OpenVINO's serialises them per batch
size, see OpenVinoRuntime).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import StpmError
from .modelfile import ONNX_METADATA_KEY, ModelDescription, description_from_onnx_metadata

RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")
# the graph outputs a runtime reads: maps, terms, and on request the image model's input
MAP, TERM, POOLED = "anomaly_map", "image_term", "pooled_features"
PRECISIONS = ("f32", "bf16")
# A 256 px map network is a few dozen layers of a few million multiply-adds each: split over
# more than about 8 threads, a single image spends more time synchronising than computing.
MAX_DEFAULT_THREADS = 8


@dataclass
class Outputs:
    """What a runtime returns for a batch of B images."""

    maps: np.ndarray  # float32 (B, 1, H, W) anomaly maps at the input size
    terms: np.ndarray  # float32 (B,) image-level terms
    pooled: np.ndarray | None = None  # float32 (B, D) the teacher's pooled features, on request


class Runtime(Protocol):
    """Normalised images (B, 3, H, W) float32 -> Outputs."""

    name: str
    description: ModelDescription
    threads: int
    path: Path | None

    def __call__(self, images: np.ndarray, pooled: bool = False) -> Outputs: ...

    def warm(self, batch_sizes: Iterable[int]) -> None:
        """Get ready for these batch sizes now, so that no image pays for it later."""


def _warm(runtime: Runtime, batch_sizes: Iterable[int]) -> None:
    """One run of each batch size on blank images: what a first call pays (memory arenas,
    kernel choices, OpenVINO's compilation) is paid here."""
    size = runtime.description.image_size
    for batch in sorted(set(batch_sizes)):
        runtime(np.zeros((batch, 3, *size), np.float32))


def default_threads() -> int:
    """Physical cores this process may run on (its CPU affinity, hyperthreads counted once),
    at most MAX_DEFAULT_THREADS."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return max(1, min(os.cpu_count() or 1, MAX_DEFAULT_THREADS))
    return max(1, min(len(_physical_cores(cpus)), MAX_DEFAULT_THREADS))


def _physical_cores(cpus: list[int]) -> set:
    """The distinct (package, core) pairs behind these logical CPUs, from sysfs."""
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return set(cpus)  # no topology (some containers): count logical CPUs
        cores.add((package, core))
    return cores


def resolve_device(device: str):
    """'auto' (a GPU if there is one), 'cpu', 'cuda' or 'cuda:N' -> a torch device."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise StpmError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise StpmError("--device cuda asked for, but no GPU is available; use --device cpu")
    return resolved


class TorchRuntime:
    """The torch network and map (stpm.model.AnomalyMapModel); the only runtime that can train
    further, save and export.

    threads: torch's intra-op threads. torch has one pool per process: setting it here sets it
    for the whole process (the last setting wins), so it is set only when asked for.
    """

    name = "torch"

    def __init__(
        self,
        model,
        description: ModelDescription,
        device,
        threads: int | None = None,
        path: Path | None = None,
    ):
        import torch

        self.model = model.to(device).eval()
        self.description = description
        self.device = device
        self.path = path
        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()

    @property
    def student(self):
        """The student network (torch.nn.Module): what training changes and the file stores."""
        return self.model.network.student

    def with_map(self, combine: str, smoothing_sigma: float) -> TorchRuntime:
        """The same networks with their level maps combined and smoothed another way."""
        from .model import AnomalyMapModel

        description = replace(self.description, combine=combine, smoothing_sigma=smoothing_sigma)
        settings = description.map_settings()  # checks the values before anything changes
        model = AnomalyMapModel(self.model.network, settings, self.model.image_model)
        return TorchRuntime(model, description, self.device)  # no file has these maps

    def warm(self, batch_sizes: Iterable[int]) -> None:
        _warm(self, batch_sizes)

    def weights(self) -> tuple[dict, dict | None]:
        """The model file's tensors: the student's state dict and the image model's (or None)."""
        image_model = self.model.image_model
        return self.student.state_dict(), None if image_model is None else image_model.state_dict()

    def __call__(self, images: np.ndarray, pooled: bool = False) -> Outputs:
        import torch

        with torch.inference_mode():
            maps, terms, features = self.model.run(
                torch.from_numpy(images).to(self.device), pooled=pooled
            )
            return Outputs(
                maps.float().cpu().numpy(),
                terms.float().cpu().numpy(),
                None if features is None else features.float().cpu().numpy(),
            )


class OnnxRuntime:
    """An stpm-export ONNX file on ONNX Runtime (CPU unless providers say otherwise). Its
    InferenceSession runs concurrent calls."""

    name = "onnxruntime"

    def __init__(
        self, path: str | Path, threads: int | None = None, providers: list[str] | None = None
    ) -> None:
        import onnxruntime as ort

        self.threads = threads or default_threads()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as error:  # ORT raises its own types for every kind of bad file
            raise StpmError(f"{path}: not a usable ONNX model ({str(error)[:200]})") from None
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.description = description_from_onnx_metadata(metadata, path)
        self.path = Path(path)
        warn_if_int8_saturates(self.path, self.description)
        # exports before the image term have no such output (their term is 0), exports before
        # the refit's features none of those
        self.outputs = {o.name for o in self.session.get_outputs()}

    def warm(self, batch_sizes: Iterable[int]) -> None:
        _warm(self, batch_sizes)

    def __call__(self, images: np.ndarray, pooled: bool = False) -> Outputs:
        names = [name for name in (MAP, TERM) if name in self.outputs]
        names += [_pooled_output(self.outputs, self.path)] if pooled else []
        found = dict(zip(names, self.session.run(names, {"images": images}), strict=True))
        return _outputs(found, pooled)


class OpenVinoRuntime:
    """The same ONNX file on OpenVINO's CPU plugin; precision "f32" (default) or "bf16".

    The graph is compiled for each batch size it meets (batch 1 at once), with the shape fixed:
    on a dynamic batch dimension OpenVINO ran the default model 11% slower (29 against 26 ms
    per image on one core). A new batch size costs one compilation, about as long as loading;
    `warm(sizes)` pays it before the first image. A batch smaller than a size compiled already
    is padded to it instead (a folder's last, partial batch: a few images' work, not a second
    of compiling). Each compiled batch size has one infer request, which runs one call at a
    time: concurrent calls of the same size wait for each other (the request's threads already
    use the cores), calls of other sizes do not.
    """

    name = "openvino"

    def __init__(
        self,
        path: str | Path,
        threads: int | None = None,
        precision: str = "f32",
        device: str = "CPU",
    ) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise StpmError(
                'the OpenVINO runtime needs the openvino package: pip install "stpm[openvino]"'
            ) from None
        if precision not in PRECISIONS:
            raise StpmError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.threads = threads or default_threads()
        self.path = Path(path)
        if not self.path.is_file():
            raise StpmError(f"model file not found: {path}")
        self.core, self.device = ov.Core(), device
        try:
            self.graph = self.core.read_model(str(path))
        except RuntimeError as error:
            raise StpmError(f"{path}: OpenVINO cannot read it ({str(error)[:200]})") from None
        self.description = description_from_onnx_metadata(_openvino_metadata(self.graph), path)
        warn_if_int8_saturates(self.path, self.description)
        self.config = {
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": self.threads,
            "PERFORMANCE_HINT": "LATENCY",
        }
        self.outputs = {name for output in self.graph.outputs for name in output.get_names()}
        self.requests: dict[int, tuple] = {}
        self.compiling = threading.Lock()
        self.precision = self._request(1)[1]

    def warm(self, batch_sizes: Iterable[int]) -> None:
        """Compile the graph for these batch sizes now, and run each once."""
        with self.compiling:
            for batch in set(batch_sizes) - set(self.requests):
                self.requests[batch] = self._compile(batch)
        _warm(self, batch_sizes)

    def _request(self, batch: int) -> tuple:
        """(infer request, compiled precision, output indices by name, its lock) for this batch
        size, or for the smallest larger one compiled already; compiled on first use."""
        with self.compiling:
            larger = [size for size in self.requests if size >= batch]
            if not larger:
                self.requests[batch] = self._compile(batch)
                larger = [batch]
            return self.requests[min(larger)]

    def _compile(self, batch: int) -> tuple:
        graph = self.graph.clone()
        graph.reshape([batch, 3, *self.description.image_size])
        try:
            compiled = self.core.compile_model(graph, self.device, self.config)
        except RuntimeError as error:
            raise StpmError(
                f"{self.path}: OpenVINO cannot compile it ({str(error)[:200]})"
            ) from None
        precision = str(compiled.get_property("INFERENCE_PRECISION_HINT").to_string())
        names = {
            name: index for index, output in enumerate(compiled.outputs) for name in output.names
        }
        return compiled.create_infer_request(), precision, names, threading.Lock()

    def __call__(self, images: np.ndarray, pooled: bool = False) -> Outputs:
        count = len(images)
        request, _, names, busy = self._request(count)
        size = request.get_input_tensor(0).shape[0]
        if size > count:  # padded to a compiled batch size
            images = np.concatenate(
                [images, np.zeros((size - count, *images.shape[1:]), images.dtype)]
            )
        wanted = [name for name in (MAP, TERM) if name in names]
        wanted += [_pooled_output(names, self.path)] if pooled else []
        with busy:
            request.infer({0: images}, share_inputs=True)  # reads the contiguous batch in place
            # copies: the buffers are reused by the next call
            found = {
                name: request.get_output_tensor(names[name]).data[:count].copy() for name in wanted
            }
        return _outputs(found, pooled)


def _pooled_output(outputs, path: Path) -> str:
    if POOLED not in outputs:
        raise StpmError(
            f"{path} has no {POOLED} output (exported without an image model, or by stpm < 0.4)"
        )
    return POOLED


def _outputs(found: dict[str, np.ndarray], pooled: bool) -> Outputs:
    maps = found[MAP]
    terms = found.get(TERM, np.zeros(len(maps), np.float32))
    return Outputs(maps, terms, found[POOLED] if pooled else None)


def _openvino_metadata(graph) -> dict[str, str]:
    """The ONNX file's metadata as OpenVINO's reader keeps it: rt_info["framework"][key]."""
    if not graph.has_rt_info(["framework", ONNX_METADATA_KEY]):
        return {}
    return {ONNX_METADATA_KEY: graph.get_rt_info(["framework", ONNX_METADATA_KEY]).astype(str)}


def has_vnni() -> bool:
    """Whether this CPU multiplies 8-bit integers without saturating: AVX-512 VNNI or AVX-VNNI
    (x86), or any non-x86 CPU (ARM's dot-product instructions do not saturate)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: cannot tell; assume a recent CPU
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags.split()))


_warned_saturation: set[Path] = set()


def warn_if_int8_saturates(path: Path, description: ModelDescription) -> None:
    """Warn once per file: an INT8 file quantised with full 8-bit weights (for a CPU with VNNI)
    runs here on a CPU without VNNI, whose 8-bit multiply-adds saturate (the maps drift)."""
    settings = description.int8
    if not settings or settings.get("reduce_range", True) or path.resolve() in _warned_saturation:
        return
    if has_vnni():
        return
    _warned_saturation.add(path.resolve())
    warnings.warn(
        f"{path} was quantised to INT8 for CPUs with VNNI (without reduce_range); this CPU has "
        "no VNNI, so its 8-bit arithmetic can saturate and the maps drift. Export again on "
        "this machine (stpm-export --int8 chooses for the CPU it runs on) or pass "
        "--reduce-range on",
        stacklevel=3,
    )


def load_torch(
    path: str | Path,
    device: str = "auto",
    threads: int | None = None,
    teacher_weights: str | Path | None = None,
    force: bool = False,
) -> TorchRuntime:
    """A `.pt` model file on torch; refuses a file whose teacher differs from this machine's."""
    from . import networks
    from .modelfile import read_model_file

    description, student_state, image_state = read_model_file(path)
    model = networks.rebuild(description, student_state, image_state, path, teacher_weights, force)
    return TorchRuntime(model, description, resolve_device(device), threads, Path(path))


def open_runtime(
    path: str | Path,
    runtime: str = "auto",
    threads: int | None = None,
    device: str = "auto",
    precision: str = "f32",
    teacher_weights: str | Path | None = None,
    force: bool = False,
) -> Runtime:
    """The runtime for a model file. "auto": torch for `.pt`, ONNX Runtime for `.onnx`.

    Installing OpenVINO changes nothing unless asked for: it never takes over "auto".
    """
    if runtime not in RUNTIMES:
        raise StpmError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    is_onnx = Path(path).suffix.lower() == ".onnx"
    if runtime == "auto":
        runtime = "onnxruntime" if is_onnx else "torch"
    if runtime == "torch":
        if is_onnx:
            raise StpmError(f"{path} is an ONNX file; run it with onnxruntime or openvino")
        return load_torch(path, device, threads, teacher_weights, force)
    if not is_onnx:
        raise StpmError(f"the {runtime} runtime runs .onnx files; make one with stpm-export")
    if not Path(path).is_file():
        raise StpmError(f"model file not found: {path}")
    if runtime == "openvino":
        return OpenVinoRuntime(path, threads, precision)
    return OnnxRuntime(path, threads)
