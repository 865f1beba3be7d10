"""GGUF model files (city96's quantised FLUX.1 transformers): read their tensors and header, load the
transformer with its weights left quantised (diffusers' GGUF linear layers), and write such files for tests."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path

import numpy as np
import torch

from backend import checkpoints, flux_layout
from backend.errors import UnavailableError
from backend.model_detection import CheckpointFormatError

# city96's converter keeps tensors this small (and every 1-D one) in F32: quantising them saves nothing.
QUANTIZATION_THRESHOLD = 1024
# ComfyUI-GGUF stores some tensors flattened (its "shape fix", never used for FLUX) with the real shape here.
_ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."


def read_gguf(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .gguf file, memory-mapped: quantised ones as diffusers' `GGUFParameter` (raw blocks,
    rows along dim 0, `quant_type` kept), F32/F16/BF16 ones as plain tensors of that dtype."""
    path = Path(path)
    reader = _reader(path)
    reshaped = [key[len(_ORIG_SHAPE_PREFIX) :] for key in reader.fields if key.startswith(_ORIG_SHAPE_PREFIX)]
    if reshaped:
        raise CheckpointFormatError(
            f"{path.name}: {reshaped[0]} and {len(reshaped) - 1} more tensors are stored reshaped (ComfyUI-GGUF's "
            "layout for UNet models); Easel reads GGUF files of FLUX.1 transformers"
        )
    return {tensor.name: _tensor(tensor, path.name) for tensor in reader.tensors}


def gguf_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's logical (dequantised) shape in torch order, from the header: for model detection."""
    # The header lists dims fastest-varying first (ggml's order); torch's order is the reverse.
    tensors = _reader(Path(path)).tensors
    return {tensor.name: tuple(int(n) for n in reversed(tensor.shape.tolist())) for tensor in tensors}


def gguf_architecture(path: str | Path) -> str | None:
    """The file's `general.architecture` ("flux" in city96's FLUX.1 files), or None when it has none."""
    field = _reader(Path(path)).fields.get("general.architecture")
    return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")


def load_gguf_transformer(path: str | Path, dtype: torch.dtype):
    """A FluxTransformer2DModel from a BFL-layout GGUF file. Quantised Linear weights stay quantised in
    `GGUFLinear` layers that dequantise per call and compute in `dtype`; every other tensor is cast to `dtype`."""
    from diffusers import FluxTransformer2DModel
    from diffusers.quantizers.gguf.utils import _replace_with_gguf_linear

    path = Path(path)
    # 1. Read the tensors, memory-mapped; nothing is dequantised here.
    tensors = flux_layout.strip_prefix(read_gguf(path))
    # 2. The config from the logical shapes (a quantised tensor's own shape is that of its bytes).
    config = flux_layout.transformer_config({key: logical_shape(value) for key, value in tensors.items()})
    # 3. Diffusers' names. Fused qkv / linear1 rows are whole rows of blocks, so the split is a view.
    weights = flux_layout.to_diffusers(tensors, config)
    # 4. An empty model whose Linear layers with a quantised weight become diffusers' GGUFLinear.
    model = checkpoints.empty_module(lambda: FluxTransformer2DModel.from_config(config))
    _replace_with_gguf_linear(model, dtype, weights)
    # 5. The weights, assigned in place of the empty ones.
    _assign(model, weights, dtype, path.name)
    return model.eval().requires_grad_(False)


def logical_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The dequantised shape of a `GGUFParameter`; a plain tensor's own shape."""
    return tuple(getattr(tensor, "quant_shape", tensor.shape))


def write_gguf(path: str | Path, state_dict: Mapping[str, torch.Tensor], quant: str = "Q8_0",
               arch: str = "flux") -> Path:
    """Write `state_dict` as city96's tools do: 2-D weights in `quant` ("Q8_0", "Q4_0", ..., "F16", "BF16") when
    their rows hold whole blocks, else F16; 1-D and small tensors F32. A `GGUFParameter` is written as it is."""
    gguf = _gguf()

    qtype = gguf.GGMLQuantizationType[quant]
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    file_type = getattr(gguf.LlamaFileType, f"MOSTLY_{quant}", None)
    if file_type is not None:
        writer.add_file_type(int(file_type))
    for key, tensor in state_dict.items():
        if hasattr(tensor, "quant_type"):
            writer.add_tensor(key, tensor.as_tensor().numpy(), raw_dtype=tensor.quant_type)
            continue
        data = tensor.detach().float().numpy()
        chosen = _storage_type(data.shape, qtype)
        writer.add_tensor(key, gguf.quants.quantize(data, chosen), raw_dtype=chosen)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def _storage_type(shape: tuple[int, ...], wanted):
    import gguf

    types = gguf.GGMLQuantizationType
    if len(shape) == 1 or int(np.prod(shape)) <= QUANTIZATION_THRESHOLD:
        return types.F32
    if shape[-1] % gguf.GGML_QUANT_SIZES[wanted][0]:
        return types.F16  # rows that do not hold whole blocks stay unquantised, as llama-quantize leaves them
    return wanted


def _gguf():
    try:
        import gguf
    except ImportError as exc:
        raise UnavailableError("reading .gguf files needs the gguf package: pip install 'gguf>=0.17.1,<1'") from exc
    return gguf


def _reader(path: Path):
    gguf = _gguf()
    try:
        return gguf.GGUFReader(str(path), mode="c")  # copy-on-write mapping: writable for torch, file untouched
    except (ValueError, IndexError, KeyError) as exc:
        raise CheckpointFormatError(
            f"{path.name}: not a readable GGUF file; it is damaged, truncated or of another format ({exc})"
        ) from exc


@cache
def supported_types() -> tuple[str, ...]:
    """Names of the tensor types Easel reads from GGUF files: F32, F16, BF16 and diffusers' quantisations."""
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    plain = ("F32", "F16", "BF16")
    return plain + tuple(qtype.name for qtype in SUPPORTED_GGUF_QUANT_TYPES if qtype.name not in plain)


def _tensor(tensor, name: str) -> torch.Tensor:
    from diffusers.quantizers.gguf.utils import GGUFParameter

    qtype = tensor.tensor_type.name
    if qtype not in supported_types():
        raise CheckpointFormatError(
            f"{name}: tensor {tensor.name} is stored as {qtype}, which diffusers cannot dequantise; "
            f"use a file in one of {', '.join(supported_types())}"
        )
    data = torch.from_numpy(tensor.data)
    if qtype in ("F32", "F16"):
        return data
    if qtype == "BF16":
        return data.view(torch.bfloat16)  # the reader hands BF16 over as raw bytes, two per value
    return GGUFParameter(data, quant_type=tensor.tensor_type)


def _assign(model, weights: Mapping[str, torch.Tensor], dtype: torch.dtype, name: str) -> None:
    """Put each tensor in place of the empty model's; quantised ones only into GGUFLinear layers."""
    from diffusers.quantizers.gguf.utils import GGUFLinear, dequantize_gguf_tensor

    expected = dict(model.named_parameters())
    missing = [key for key in expected if key not in weights]
    if missing:
        raise CheckpointFormatError(
            f"{name}: the transformer weights are incomplete ({len(missing)} missing, e.g. {missing[0]})"
        )
    for key, value in weights.items():
        module_name, _, attribute = key.rpartition(".")
        module = model.get_submodule(module_name)
        if hasattr(value, "quant_type") and not isinstance(module, GGUFLinear):
            value = dequantize_gguf_tensor(value)  # a quantised tensor outside a Linear layer (none in FLUX.1)
        if logical_shape(value) != tuple(expected[key].shape):
            raise CheckpointFormatError(
                f"{name}: {key} has shape {list(logical_shape(value))}, the model needs {list(expected[key].shape)}"
            )
        if not hasattr(value, "quant_type"):
            value = torch.nn.Parameter(value.to(dtype), requires_grad=False)
        module._parameters[attribute] = value
