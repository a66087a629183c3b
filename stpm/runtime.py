"""Runtimes: what turns normalised images into anomaly maps, with torch, ONNX Runtime or OpenVINO.

Every runtime is a callable with one contract: float32 (B, 3, H, W) normalised images, as
numpy, -> (float32 (B, 1, H, W) anomaly maps, float32 (B,) image terms), as numpy: an image's
score is its map's maximum plus its term (0 without an image-level model, stpm.gaussian); plus
`description` (the model's
ModelDescription), `name` and `threads`. The estimator holds one and knows nothing else about
it, so a new runtime is a new class here and a name in `open_runtime`.

- "torch": the `.pt` model file (teacher rebuilt from its ImageNet weights, student loaded).
- "onnxruntime": an `stpm-export` `.onnx` file, FP32 or INT8, on ONNX Runtime's CPU provider.
- "openvino": the same `.onnx` file through OpenVINO (`pip install "stpm[openvino]"`). On CPUs
  with BF16 arithmetic OpenVINO would compute in BF16 unless told otherwise; we ask for f32 by
  default (the maps then match the other runtimes) and record what it actually compiled to.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from . import networks, weights
from .errors import StpmError
from .gaussian import PooledGaussian
from .model import AnomalyMapModel, StudentTeacher
from .modelfile import ModelDescription, description_from_onnx_metadata, read_model_file

RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")
OUTPUTS = ("anomaly_map", "image_term")  # the graph outputs a runtime reads, in this order
PRECISIONS = ("f32", "bf16")
# A 256 px map network is a few dozen layers of a few million multiply-adds each: split over
# more than about 8 threads, a single image spends more time synchronising than computing.
MAX_DEFAULT_THREADS = 8


class Runtime(Protocol):
    """Normalised images (B, 3, H, W) -> (anomaly maps (B, 1, H, W), image terms (B,)), float32."""

    name: str
    description: ModelDescription
    threads: int

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


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


def resolve_device(device: str) -> torch.device:
    """'auto' (a GPU if there is one), 'cpu', 'cuda' or 'cuda:N' -> a torch device."""
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
    """The torch network and map; the only runtime that can train further, save and export."""

    name = "torch"

    def __init__(
        self,
        model: AnomalyMapModel,
        description: ModelDescription,
        device: torch.device,
        threads: int | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        self.description = description
        self.device = device
        if threads:  # torch's pool is per process: set only when asked, the last setting wins
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, _, terms = self.model(torch.from_numpy(images).to(self.device))
        return maps.float().cpu().numpy(), terms.float().cpu().numpy()


class OnnxRuntime:
    """An stpm-export ONNX file on ONNX Runtime (CPU unless providers say otherwise)."""

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
        # exports before the image term have no such output: their term is 0
        self.outputs = [o.name for o in self.session.get_outputs() if o.name in OUTPUTS]

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        found = self.session.run(self.outputs, {"images": images})
        maps = found[0]
        terms = found[1] if len(found) > 1 else np.zeros(len(maps), np.float32)
        return maps, terms


class OpenVinoRuntime:
    """The same ONNX file on OpenVINO's CPU plugin; precision "f32" (default) or "bf16".

    The graph is compiled for each batch size it meets (batch 1 at once), with the shape fixed:
    on a dynamic batch dimension OpenVINO ran the default model 11% slower (29 against 26 ms
    per image on one core). A new batch size costs one compilation, about as long as loading.
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
        self.description = _onnx_description(self.path)
        warn_if_int8_saturates(self.path, self.description)
        self.core, self.device = ov.Core(), device
        self.config = {
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": self.threads,
            "PERFORMANCE_HINT": "LATENCY",
        }
        try:
            self.graph = self.core.read_model(str(path))
        except RuntimeError as error:
            raise StpmError(f"{path}: OpenVINO cannot read it ({str(error)[:200]})") from None
        self.requests: dict[int, object] = {}
        self.precision = self._request(1)[1]

    def _request(self, batch: int) -> tuple:
        """(infer request, compiled precision) for this batch size, compiled on first use."""
        if batch not in self.requests:
            graph = self.graph.clone()
            graph.reshape([batch, 3, *self.description.image_size])
            try:
                compiled = self.core.compile_model(graph, self.device, self.config)
            except RuntimeError as error:
                raise StpmError(
                    f"{self.path}: OpenVINO cannot compile it ({str(error)[:200]})"
                ) from None
            precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
            names = [output.get_any_name() for output in compiled.outputs]
            outputs = [names.index(name) for name in OUTPUTS if name in names]
            self.requests[batch] = (compiled.create_infer_request(), str(precision), outputs)
        return self.requests[batch]

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        request, _, outputs = self._request(len(images))
        request.infer({0: images}, share_inputs=True)  # reads the contiguous batch in place
        # copies: the buffers are reused next call
        maps = request.get_output_tensor(outputs[0]).data.copy()
        if len(outputs) > 1:
            return maps, request.get_output_tensor(outputs[1]).data.copy()
        return maps, np.zeros(len(maps), np.float32)


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


def _onnx_description(path: Path) -> ModelDescription:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf's DecodeError and friends
        raise StpmError(f"{path}: not a usable ONNX model ({str(error)[:200]})") from None
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    return description_from_onnx_metadata(metadata, path)


def load_torch(
    path: str | Path,
    device: str = "auto",
    threads: int | None = None,
    teacher_weights: str | Path | None = None,
    force: bool = False,
) -> TorchRuntime:
    """A `.pt` model file on torch; refuses a file whose teacher differs from this machine's."""
    description, student_state, image_state = read_model_file(path)
    source = description.teacher["source"]
    if teacher_weights is None and source.startswith("file:") and Path(source[5:]).is_file():
        teacher_weights = source[5:]
    weights_file = weights.resolve_weights_file(description.backbone, teacher_weights)
    teacher, fingerprint = networks.build_teacher(
        description.backbone, tuple(description.out_indices), weights_file
    )
    try:
        student = networks.build_student(description.student_kind, teacher, description.distance)
    except StpmError as error:
        raise StpmError(
            f"{path}: student weights do not fit {description.backbone} ({error})"
        ) from None
    known = student.state_dict().keys()  # files of stpm < 0.1 also hold the unused blocks
    student_state = {k: v for k, v in student_state.items() if k in known}
    try:
        if description.pruning:  # the pruned shapes are the tensors' (stpm.compress)
            networks.resize_like(student, student_state)
        student.load_state_dict(student_state)
    except RuntimeError:
        raise StpmError(f"{path}: student weights do not fit {description.backbone}") from None
    # shared layers: the teacher's own modules, not the file's copy of them
    shared = networks.share_stem(student, teacher) if description.shared_layers else []
    if shared != description.shared_layers:
        raise StpmError(f"{path}: its shared layers do not fit {description.backbone}")
    if fingerprint != description.teacher["sha256"] and not force:
        here = weights.describe_source(description.backbone, weights_file, teacher_weights)
        raise StpmError(
            f"{path} was trained with other teacher weights ({source}, sha256 "
            f"{description.teacher['sha256'][:12]}) than this machine has ({here}, "
            f"{fingerprint[:12]}); its scores would be meaningless. Pass the right "
            "--teacher-weights, or --force"
        )
    image_model = None
    if image_state is not None:
        image_model = PooledGaussian(len(image_state["mean"]))
        image_model.load_state_dict(image_state)
    network = StudentTeacher(teacher, student)
    model = AnomalyMapModel(network, description.map_settings(), image_model)
    return TorchRuntime(model, description, resolve_device(device), threads)


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
