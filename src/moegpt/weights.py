"""moegpt checkpoint folders: ``config.json`` + ``model.safetensors`` (no pickles anywhere).

Folders are written next to their destination and renamed into place, so an interrupted or
failed save never leaves a half-written checkpoint where a good one was expected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moegpt.config import ModelConfig, VisionConfig, section_from_dict
from moegpt.errors import ConfigError, UserError
from moegpt.fileio import fsync_path, sha256_file, umask_mode
from moegpt.model import Transformer
from moegpt.model.vision import VisionLanguageModel, language_model

FORMAT = "moegpt"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


# A model folder's own files: what save_model and convert write, and what a Hugging Face
# folder's weights, config and tokenizer are made of. --force replaces these and nothing else.
MODEL_FILES = frozenset(
    {
        CONFIG_FILE,
        WEIGHTS_FILE,
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
    }
)
_WEIGHT_SHARD = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)")


def is_model_folder(folder: Path) -> bool:
    """A folder whose config.json is a moegpt or a Hugging Face model config."""
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and (meta.get("format") == FORMAT or "model_type" in meta)


def _model_own(path: Path) -> bool:
    name = path.name
    return path.is_file() and (name in MODEL_FILES or bool(_WEIGHT_SHARD.fullmatch(name)))


def write_folder_atomically(
    dst: str | Path, write: Callable[[Path], None], overwrite: bool = False
) -> Path:
    """Run ``write(tmp_dir)`` beside ``dst`` and move the result into place only if it succeeds.

    Files are fsynced before the rename, so a crash leaves either the old model files or the
    new ones, never a half-written checkpoint under the destination's name (a kill in the
    middle of a swap may leave it missing, with the old files set aside beside it: the next
    write puts them back first, see :func:`_recover`). ``overwrite``
    replaces an existing model folder's own files (:data:`MODEL_FILES`, weight shards); any
    other file in it stays. A non-empty folder that is not a model folder is refused.
    """
    dst = Path(dst)
    if dst.is_symlink():
        raise UserError(f"{dst}: is a symlink; give the folder it points to")
    _recover(dst)
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst}: exists and is not a folder")
    existing = sorted(dst.iterdir()) if dst.exists() else []
    if existing and not overwrite:
        raise UserError(f"{dst}: already exists and is not empty (pass --force to replace it)")
    if existing and not is_model_folder(dst):
        raise UserError(
            f"{dst}: not empty and not a model folder (no moegpt or Hugging Face config.json); "
            "--force only replaces a model folder's files: choose another destination"
        )
    kept = [path.name for path in existing if not _model_own(path)]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        write(tmp)
        for name in kept:
            if (tmp / name).exists():
                raise UserError(f"{dst / name}: not a file of the model's; move it out of the way")
        _make_durable(tmp)
        if dst.exists():
            _swap_in(tmp, dst, kept)
        else:
            tmp.rename(dst)
        fsync_path(dst.parent)
    finally:
        if not any((tmp / name).exists() for name in kept):  # never delete what is not ours
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _recover(dst: Path) -> None:
    """Undo what a killed write of ``dst`` left beside it (a kill skips the clean-up of
    :func:`_swap_in`): with ``dst`` gone, the previous model comes back from its set-aside
    copy; the user's files a swap had moved into the new model's folder go back to ``dst``;
    then the leftover folders are removed (they hold model files only)."""
    olds = sorted(dst.parent.glob(f".{dst.name}.old-*"), key=lambda p: p.stat().st_mtime)
    partials = list(dst.parent.glob(f".{dst.name}.partial-*"))
    if not dst.exists() and olds:
        os.rename(olds.pop(), dst)  # killed between the two renames of the swap
    for partial in partials:
        for path in partial.iterdir():
            if not _model_own(path) and dst.is_dir() and not (dst / path.name).exists():
                os.rename(path, dst / path.name)
    for leftover in [*olds, *partials]:
        shutil.rmtree(leftover, ignore_errors=True)
    if olds or partials:
        fsync_path(dst.parent)


def _swap_in(tmp: Path, dst: Path, kept: list[str]) -> None:
    """Replace the folder ``dst`` by ``tmp``, taking along ``dst``'s entries named ``kept``
    (moved, not copied); on any failure everything goes back where it was."""
    moved: list[str] = []
    old = None
    try:
        for name in kept:
            os.rename(dst / name, tmp / name)
            moved.append(name)
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.rename(dst, old)  # onto the empty folder: atomic on POSIX
        os.rename(tmp, dst)
    except BaseException:
        if old is not None and not dst.exists():
            os.rename(old, dst)
        elif old is not None:
            old.rmdir()
        for name in moved:
            os.rename(tmp / name, dst / name)
        raise
    shutil.rmtree(old)  # the previous model's own files, nothing else


def _make_durable(folder: Path) -> None:
    """fsync every file, and give the folder and its files the permissions a plain mkdir
    and open would have had (mkdtemp and safetensors create them private)."""
    folder.chmod(umask_mode(directory=True))
    for path in folder.iterdir():
        if path.is_file():  # safetensors writes its file private
            path.chmod(umask_mode(directory=False))
        fsync_path(path)
    fsync_path(folder)


def checkpoint_meta(
    config: ModelConfig,
    parent: dict[str, Any] | None = None,
    vision: VisionConfig | None = None,
) -> dict[str, Any]:
    """The contents of a moegpt folder's config.json (with the model it was trained from, for
    a continuation stage, and a vision model's ``vision`` section)."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": dataclasses.asdict(config)}
    if vision is not None:
        meta["vision"] = dataclasses.asdict(vision)
    if parent is not None:
        meta["parent"] = parent
    return meta


def save_model(
    model: Transformer | VisionLanguageModel,
    path: str | Path,
    overwrite: bool = False,
    extra_files: dict[str, Path] | None = None,
    parent: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` as a moegpt checkpoint folder, with ``extra_files`` (name -> source
    file, e.g. the tokenizer) copied in by the same atomic write, and ``parent`` (the model a
    continuation started from) in its config.json. A vision model's tensors keep their names
    (its language model's under ``lm.``) and its config.json gains a ``vision`` section."""
    state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    vision = model.config if isinstance(model, VisionLanguageModel) else None
    meta = checkpoint_meta(language_model(model).config, parent, vision)

    def write(folder: Path) -> None:
        write_weights(folder, state, meta)
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, folder / name)

    return write_folder_atomically(path, write, overwrite)


def write_weights(
    folder: Path, state: dict[str, torch.Tensor], meta: dict[str, Any], file_format: str = FORMAT
) -> None:
    """``state`` as the folder's model.safetensors and ``meta`` as its config.json, which
    records the weights' size and sha256 for loading to check (``weights``)."""
    weights = folder / WEIGHTS_FILE
    save_file(state, weights, metadata={"format": file_format})
    record = {"file": WEIGHTS_FILE, "bytes": weights.stat().st_size, "sha256": sha256_file(weights)}
    (folder / CONFIG_FILE).write_text(json.dumps({**meta, "weights": record}, indent=2) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or a one-line error naming the file."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, or a byte that is not UTF-8
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _folder_meta(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """A moegpt checkpoint folder's config.json path and contents, format checked."""
    config_path = Path(path) / CONFIG_FILE
    meta = read_json(config_path)
    if meta.get("format") != FORMAT:
        hint = " (Hugging Face? run `moegpt convert` first)" if "model_type" in meta else ""
        raise UserError(f"{config_path}: not a moegpt checkpoint config{hint}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        version = meta["format_version"]
        raise UserError(f"{config_path}: format_version {version} is newer than this moegpt reads")
    return config_path, meta


def load_model_config(path: str | Path) -> ModelConfig:
    """The (language) model config of a moegpt checkpoint folder."""
    config_path, meta = _folder_meta(path)
    if not isinstance(meta.get("model", {}), dict):
        raise UserError(f"{config_path}: model: expected an object")
    try:
        return section_from_dict(ModelConfig, meta.get("model", {}))
    except ConfigError as e:
        raise UserError(f"{config_path}: {e}") from None


def load_vision_config(path: str | Path) -> VisionConfig:
    """The vision config of a moegpt checkpoint folder (disabled for a language model)."""
    config_path, meta = _folder_meta(path)
    if "vision" not in meta:
        return VisionConfig()
    if not isinstance(meta["vision"], dict):
        raise UserError(f"{config_path}: vision: expected an object")
    try:
        vision = section_from_dict(VisionConfig, meta["vision"])
    except ConfigError as e:
        raise UserError(f"{config_path}: vision: {e}") from None
    if not vision.enabled:
        raise UserError(f"{config_path}: vision.enabled is false in a vision section")
    vocab = load_model_config(path).vocab_size
    if not 0 <= vision.image_token_id < vocab:
        raise UserError(
            f"{config_path}: vision.image_token_id {vision.image_token_id} is outside the "
            f"model's vocabulary (model.vocab_size {vocab})"
        )
    return vision


# Weight dtypes a model folder may hold. float32 and bfloat16 (what moegpt saves) load as
# stored; float16 (other tools' checkpoints) loads as float32, exactly: moegpt never computes
# in float16, whose range overflows where bfloat16's does not. Anything else is refused.
WEIGHT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2}
_ITEMSIZE |= {"I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every tensor of a safetensors file, from its header alone
    (nothing is allocated); a one-line error for a file that is not a consistent one."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise UserError(f"{path}: not a safetensors file (no valid header)")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (its header is not an object)")
    data_bytes = size - 8 - length
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        info = info if isinstance(info, dict) else {}
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if (
            dtype not in _ITEMSIZE
            or not isinstance(shape, list)
            or not all(type(n) is int and n >= 0 for n in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(n) is int for n in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes
            or offsets[1] - offsets[0] != math.prod(shape) * _ITEMSIZE[dtype]
        ):
            raise UserError(f"{path}: tensor {name}: inconsistent safetensors header entry")
        tensors[name] = (dtype, tuple(shape))
    return tensors


@dataclass(frozen=True)
class ExpectedTensors:
    """The tensors a config implies, from a one- or two-layer model on the meta device: no
    module per layer is built, so a config's claims are checked in time independent of its
    size (a 1,000,000-layer config costs what a 2-layer one does)."""

    config: ModelConfig
    outer: dict[str, tuple[int, ...]]  # embedding, final norm, output head
    dense: dict[str, tuple[int, ...]]  # one dense layer's, names after "layers.{i}."
    moe: dict[str, tuple[int, ...]]  # one MoE layer's

    @classmethod
    def of(cls, config: ModelConfig) -> ExpectedTensors:
        with_experts = config.n_experts > 0
        small = dataclasses.replace(
            config, n_layers=2 if with_experts else 1, first_k_dense=1 if with_experts else 0
        )
        with torch.device("meta"):
            model = Transformer(small)
        outer: dict[str, tuple[int, ...]] = {}
        layers: list[dict[str, tuple[int, ...]]] = [{}, {}]
        for name, tensor in model.state_dict().items():
            if name.startswith("layers."):
                _, index, rest = name.split(".", 2)
                layers[int(index)][rest] = tuple(tensor.shape)
            else:
                outer[name] = tuple(tensor.shape)
        return cls(config, outer, layers[0], layers[1])

    def _layer(self, i: int) -> dict[str, tuple[int, ...]]:
        return self.moe if self.config.is_moe_layer(i) else self.dense

    @property
    def count(self) -> int:
        """Tensors the config implies."""
        c = self.config
        moe_layers = max(c.n_layers - c.first_k_dense, 0) if c.n_experts else 0
        dense_layers = c.n_layers - moe_layers
        return len(self.outer) + dense_layers * len(self.dense) + moe_layers * len(self.moe)

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The shape the config implies for ``name``; None for a name it does not imply."""
        if name in self.outer:
            return self.outer[name]
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdecimal():
            return None
        i = int(parts[1])
        if str(i) != parts[1] or i >= self.config.n_layers:
            return None
        return self._layer(i).get(parts[2])

    def names(self) -> Iterator[str]:
        """Every implied name, lazily, in the model's order."""
        for name in self.outer:
            if name.startswith("tok_embeddings."):
                yield name
        for i in range(self.config.n_layers):
            yield from (f"layers.{i}.{rest}" for rest in self._layer(i))
        for name in self.outer:
            if not name.startswith("tok_embeddings."):
                yield name


@dataclass(frozen=True)
class ExpectedVisionTensors:
    """The tensors a vision model's config implies: its language model's under ``lm.``, the
    image encoder's, the resampler's and the ``<|image|>`` embedding (``fixed``), and one
    cross-attention block (``block``) before each layer in ``blocks``, built as
    :class:`ExpectedTensors` is, from a one-layer model on the meta device."""

    lm: ExpectedTensors
    fixed: dict[str, tuple[int, ...]]
    block: dict[str, tuple[int, ...]]  # names after "xattn.{i}."
    blocks: range

    @classmethod
    def of(cls, config: ModelConfig, vision: VisionConfig) -> ExpectedVisionTensors:
        one_layer = dataclasses.replace(config, n_layers=1, first_k_dense=0)
        with torch.device("meta"):
            lm = Transformer(one_layer)
            every = dataclasses.replace(vision, xattn_every=1)
            model = VisionLanguageModel(lm, every, vision.image_token_id)
        fixed: dict[str, tuple[int, ...]] = {}
        block: dict[str, tuple[int, ...]] = {}
        for name, tensor in model.state_dict().items():
            if name.startswith("xattn."):
                block[name.split(".", 2)[2]] = tuple(tensor.shape)
            elif not name.startswith("lm."):
                fixed[name] = tuple(tensor.shape)
        blocks = range(0, config.n_layers, vision.xattn_every)
        return cls(ExpectedTensors.of(config), fixed, block, blocks)

    @property
    def count(self) -> int:
        return self.lm.count + len(self.fixed) + len(self.blocks) * len(self.block)

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name.startswith("lm."):
            return self.lm.shape(name[3:])
        if name in self.fixed:
            return self.fixed[name]
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "xattn" or not parts[1].isdecimal():
            return None
        if str(int(parts[1])) != parts[1] or int(parts[1]) not in self.blocks:
            return None
        return self.block.get(parts[2])

    def names(self) -> Iterator[str]:
        yield from (f"lm.{name}" for name in self.lm.names())
        yield from self.fixed
        for i in self.blocks:
            yield from (f"xattn.{i}.{rest}" for rest in self.block)


def _listed(names: list[str], total: int) -> str:
    return f"{names}{'...' if total > len(names) else ''}"


def check_weights(
    weights_path: Path,
    config: ModelConfig,
    header: dict[str, tuple[str, tuple[int, ...]]],
    vision: VisionConfig | None = None,
) -> None:
    """The file's tensor names, shapes and dtypes are the ones ``config`` (and an enabled
    ``vision``) implies, checked before anything is built or allocated."""
    expected: ExpectedTensors | ExpectedVisionTensors = ExpectedTensors.of(config)
    if vision is not None and vision.enabled:
        expected = ExpectedVisionTensors.of(config, vision)
    unexpected = [name for name in header if expected.shape(name) is None]
    missing_count = expected.count - (len(header) - len(unexpected))
    missing = []
    if missing_count:  # the first few, found within len(header) + 3 implied names
        for name in expected.names():
            if name not in header:
                missing.append(name)
                if len(missing) == 3:
                    break
    if missing or unexpected:
        raise UserError(
            f"{weights_path}: does not match config.json (missing {_listed(missing, missing_count)}"
            f", unexpected {_listed(unexpected[:3], len(unexpected))}; config.json implies "
            f"{expected.count:,} tensors, the file holds {len(header):,})"
        )
    for name, (_, shape) in header.items():
        if shape != expected.shape(name):
            raise UserError(
                f"{weights_path}: tensor {name} has shape {shape}, config.json implies "
                f"{expected.shape(name)}"
            )
    for name, (dtype, _) in header.items():
        if dtype not in WEIGHT_DTYPES:
            raise UserError(
                f"{weights_path}: tensor {name} is {dtype}; moegpt weights are F32, BF16 or F16"
            )


@dataclass(frozen=True)
class CheckedFolder:
    """A model folder whose weights' header matched its config.json (nothing read yet)."""

    config: ModelConfig
    weights_path: Path
    header: dict[str, tuple[str, tuple[int, ...]]]
    dtype: torch.dtype  # the dtype the model loads in
    vision: VisionConfig  # disabled for a language model


def check_folder(
    path: str | Path, dtype: torch.dtype | None = None, verify: bool = True
) -> CheckedFolder:
    """The config and weights header of the moegpt folder at ``path``, names, shapes and dtypes
    checked against config.json before anything is allocated. Without ``dtype`` the model
    keeps the file's dtype when that is float32 or bfloat16 throughout, else (float16, or a
    mix) loads as float32, which holds every such value exactly.

    The weights file's size is checked against the one config.json records, and with
    ``verify`` its sha256 too (reading the whole file once: skip it for huge files). Folders
    written before config.json recorded them are not checked."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: checkpoint folder not found")
    config = load_model_config(path)
    vision = load_vision_config(path)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise UserError(f"{weights_path}: file not found")
    header = read_safetensors_header(weights_path)
    check_weights(weights_path, config, header, vision)
    _check_recorded(weights_path, _folder_meta(path)[1].get("weights"), verify)
    stored = {stored_dtype for stored_dtype, _ in header.values()}
    if dtype is None:
        dtype = WEIGHT_DTYPES[stored.pop()] if stored in ({"F32"}, {"BF16"}) else torch.float32
    return CheckedFolder(config, weights_path, header, dtype, vision)


def _check_recorded(weights_path: Path, record: Any, verify: bool) -> None:
    """The weights file against config.json's ``weights`` record (size, then sha256)."""
    if record is None:
        return
    config_path = weights_path.with_name(CONFIG_FILE)
    if not isinstance(record, dict) or not isinstance(record.get("bytes"), int):
        raise UserError(f"{config_path}: weights: expected an object with bytes and sha256")
    size = weights_path.stat().st_size
    if size != record["bytes"]:
        raise UserError(
            f"{weights_path}: {size:,} bytes, {CONFIG_FILE} says {record['bytes']:,} "
            "(truncated or replaced)"
        )
    if verify and sha256_file(weights_path) != record.get("sha256"):
        raise UserError(
            f"{weights_path}: sha256 differs from {CONFIG_FILE}'s weights.sha256 (damaged or "
            "replaced; --no-verify-weights skips this check)"
        )


def open_weights(weights_path: Path, device: torch.device | str = "cpu") -> Any:
    """``safe_open`` of a weights file, with a one-line error for an unreadable one."""
    try:
        return safe_open(weights_path, framework="pt", device=str(device))
    except Exception as e:  # the library's own error types
        raise UserError(f"{weights_path}: not a readable safetensors file ({e})") from None


def weight_problem(tensor: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, str | None]:
    """``tensor`` cast to ``dtype``, and what is wrong with its values (None if nothing): NaN or
    infinite values, or values beyond ``dtype``'s range."""
    cast = tensor.to(dtype)
    if bool(torch.isfinite(cast).all()):
        return cast, None
    if bool(torch.isfinite(tensor).all()):
        return cast, f"values beyond {dtype}'s range"
    return cast, "NaN or infinite values"


def load(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    verify: bool = True,
) -> Transformer:
    """Load a moegpt checkpoint folder as a model in eval mode, its config at ``model.config``.

    Names, shapes and dtypes are checked against config.json from the file's header before
    anything is allocated, and every tensor must be finite. Without ``dtype`` the model keeps
    the file's dtype when that is float32 or bfloat16 throughout, else (float16, or a mix)
    loads as float32, which holds every such value exactly. ``verify``: check the weights'
    sha256 against config.json's record (see :func:`check_folder`).
    """
    folder = check_folder(path, dtype, verify)
    refuse_vision(folder)
    with torch.device("meta"):
        model = Transformer(folder.config)
    return _filled(folder, model, device)


def refuse_vision(folder: CheckedFolder, where: str = "moegpt.load") -> None:
    """One line for a vision model's folder where only a language model will do."""
    if folder.vision.enabled:
        raise UserError(
            f"{folder.weights_path.parent}: a vision model, which {where} does not take "
            "(`moegpt generate`/`serve` in one process, `moegpt eval --task "
            "transcribe|classify` and train.init_from do; load it with moegpt.weights.load_vision)"
        )


def load_vision(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    verify: bool = True,
) -> VisionLanguageModel:
    """Load a vision model's folder (exported from a vision run) as :func:`load` loads a
    language model's."""
    folder = check_folder(path, dtype, verify)
    if not folder.vision.enabled:
        raise UserError(f"{path}: a language model; this needs a vision model's folder")
    if folder.vision.objective == "clip":
        raise UserError(
            f'{path}: a CLIP-stage model (vision.objective = "clip") trains only its image '
            "encoder and reads no images into text; train the Flamingo stage from it "
            "(train.init_from) and use that"
        )
    with torch.device("meta"):
        model = VisionLanguageModel(
            Transformer(folder.config), folder.vision, folder.vision.image_token_id
        )
    return _filled(folder, model, device)


def _filled(folder: CheckedFolder, model: ModelT, device: torch.device | str) -> ModelT:
    """``model``, built on the meta device, with the folder's tensors, in eval mode."""
    state = {}
    with open_weights(folder.weights_path, device) as f:
        for name in model.state_dict():
            cast, problem = weight_problem(f.get_tensor(name), folder.dtype)
            if problem is not None:
                raise UserError(f"{folder.weights_path}: tensor {name} has {problem}")
            state[name] = cast
    model.load_state_dict(state, assign=True)
    return model.eval()


ModelT = TypeVar("ModelT", Transformer, VisionLanguageModel)
