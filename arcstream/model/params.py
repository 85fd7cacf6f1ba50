"""HF checkpoints <-> NNX parameters: the name table, sharded loading, and saving.

`PARAM_TABLE` is the whole mapping between HF safetensors keys and NNX paths,
in both directions (NNX -> HF is derived from its rows at import): a regex on
the HF key, the NNX path template, and whether the tensor is transposed (HF
`nn.Linear` stores `[out, in]`, our kernels `[in, out]`).

Loading never builds the model on one host: `nnx.eval_shape` gives the
abstract parameters, then each tensor is read from safetensors *slice by
slice*, one device shard at a time (`jax.make_array_from_callback`), cast, and
placed.  At most one tensor's shard is on the host at once, so a 7B model
loads on a host that could not hold two copies of it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from huggingface_hub import snapshot_download
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.flax import save_file

from arcstream.model.config import ModelConfig
from arcstream.model.model import Decoder, Rules
from arcstream.model.sharding import logical_sharding

log = logging.getLogger(__name__)

# (HF key regex, NNX path template, transpose).  The inverse direction (NNX path -> HF key) is derived from
# these rows at import (`_inverse`), so a new parameter needs one row here and nothing else.  A row's regex is
# literal text (escaped) plus capturing groups, and its template uses every group once.
PARAM_TABLE: tuple[tuple[str, str, bool], ...] = (
    (r"model\.embed_tokens\.weight", "embed_tokens.embedding", False),
    (r"model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.weight",
     r"layers.\1.\2.kernel", True),
    (r"model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.bias",
     r"layers.\1.\2.bias", False),
    (r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|"
     r"post_feedforward_layernorm)\.weight", r"layers.\1.\2.weight", False),
    (r"model\.layers\.(\d+)\.self_attn\.([qk]_norm)\.weight", r"layers.\1.self_attn.\2.weight", False),
    (r"model\.norm\.weight", "norm.weight", False),
    (r"lm_head\.weight", "lm_head.kernel", True),
)
# Keys some checkpoints carry that are not parameters of the model we build.
_IGNORED = (re.compile(r".*\.rotary_emb\.inv_freq"),)
_Rows = tuple[tuple[re.Pattern, str, bool], ...]
# Regex text that matches only itself: ordinary characters and escaped punctuation (`\.`), no `\d` or `.`.
_LITERAL = re.compile(r"(?:\\[^A-Za-z0-9]|[^.^$*+?{}\[\]|()\\])*")


def _split_regex(regex: str) -> tuple[list[str | int], list[str]]:
    """A table regex as pieces (literal text, or the 0-based index of a capturing group) and the group bodies.

    Only literal text and top-level capturing groups (which may nest `(?:...)`) can be read backwards;
    anything else raises, naming the row, at import.
    """
    pieces: list[str | int] = []
    bodies: list[str] = []
    literal, i = "", 0
    while i < len(regex):
        if regex[i] == "(":
            depth, j = 1, i + 1
            while depth:
                if j >= len(regex):
                    raise ValueError(f"PARAM_TABLE regex {regex!r}: unbalanced '('.")
                depth += {"(": 1, ")": -1}.get(regex[j], 0)
                j += 2 if regex[j] == "\\" else 1
            body = regex[i + 1:j - 1]
            if body.startswith("?") or re.compile(body).groups:
                raise ValueError(f"PARAM_TABLE regex {regex!r}: group ({body}) is not a plain capturing group "
                                 "with only (?:...) inside; the NNX -> HF direction cannot be derived.")
            pieces += [literal, len(bodies)]
            bodies.append(body)
            literal, i = "", j
        else:
            step = 2 if regex[i] == "\\" else 1
            literal += regex[i:i + step]
            i += step
    pieces.append(literal)
    for piece in pieces:
        if isinstance(piece, str) and not _LITERAL.fullmatch(piece):
            raise ValueError(f"PARAM_TABLE regex {regex!r}: {piece!r} outside the groups is not literal text; "
                             "the NNX -> HF direction cannot be derived.")
    return pieces, bodies


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _inverse(regex: str, template: str) -> tuple[str, str]:
    r"""(NNX path regex, HF key template) of one table row: the row read backwards.

    Group N of the HF regex becomes the named group `gN` of the NNX regex, with the same body, where
    the template has `\N`; the HF template is the regex's literal text with `\g<gN>` for group N.
    """
    pieces, bodies = _split_regex(regex)
    refs = re.split(r"\\(\d+)", template)  # literal, group number, literal, ...
    numbers = [int(n) for n in refs[1::2]]
    if sorted(numbers) != list(range(1, len(bodies) + 1)):
        raise ValueError(f"PARAM_TABLE row ({regex!r}, {template!r}): the template must use each of the "
                         f"{len(bodies)} groups exactly once; it uses {numbers}.")
    nnx_regex = "".join(re.escape(part) if k % 2 == 0 else f"(?P<g{part}>{bodies[int(part) - 1]})"
                        for k, part in enumerate(refs))
    hf_template = "".join(_unescape(p) if isinstance(p, str) else f"\\g<g{p + 1}>" for p in pieces)
    return nnx_regex, hf_template


_FORWARD: _Rows = tuple((re.compile(rx), tpl, tr) for rx, tpl, tr in PARAM_TABLE)
_BACKWARD: _Rows = tuple((re.compile(nnx_rx), hf_tpl, tr)
                         for rx, tpl, tr in PARAM_TABLE for nnx_rx, hf_tpl in [_inverse(rx, tpl)])


def _lookup(rows: _Rows, name: str) -> tuple[str, bool] | None:
    for rx, tpl, transpose in rows:
        match = rx.fullmatch(name)
        if match:
            return match.expand(tpl), transpose
    return None


def hf_to_nnx(key: str) -> tuple[str, bool] | None:
    """(NNX path, transpose) for an HF key, or None if the key is not in the table."""
    return _lookup(_FORWARD, key)


def nnx_to_hf(path: str) -> tuple[str, bool]:
    """(HF key, transpose) for an NNX path (the inverse of `hf_to_nnx`, derived from `PARAM_TABLE`)."""
    found = _lookup(_BACKWARD, path)
    if found is None:
        raise KeyError(f"NNX parameter {path!r} has no HF name.")
    return found


def _dotted(path_parts: tuple) -> str:
    return ".".join(str(p) for p in path_parts)


def _flat_params(state: nnx.State) -> Iterator[tuple[str, Any]]:
    for path, var in nnx.to_flat_state(state):
        yield _dotted(path), var


# ---------------------------------------------------------------------------- locating
def resolve_checkpoint(path_or_hub_name: str | os.PathLike) -> Path:
    """A local checkpoint directory for a path or an HF hub name (from the HF cache).

    With `HF_HUB_OFFLINE=1` a hub name that is not cached fails at once with
    a message saying how to get it; nothing is downloaded at run time in tests.
    """
    name = os.fspath(path_or_hub_name)
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise NotADirectoryError(f"model={name!r} is a file; expected a checkpoint directory "
                                 "holding config.json and *.safetensors, or a hub name.")
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") != 1
    if looks_local:
        raise FileNotFoundError(f"model={name!r}: no such directory, and not a hub name "
                                "('org/name'); expected a checkpoint directory or a hub name.")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # LocalEntryNotFoundError, RepositoryNotFoundError, HTTP errors
        hint = (f"HF_HUB_OFFLINE=1, and {name!r} is not in the HF cache; download it on a "
                f"machine with network (`hf download {name}`) or pass a local directory"
                if offline else "check the name and your network/credentials")
        raise FileNotFoundError(f"model={name!r} could not be resolved as a hub model: "
                                f"{type(e).__name__}: {e}. {hint}.") from e


def _tensor_files(ckpt: Path) -> dict[str, Path]:
    """HF key -> the safetensors file that holds it (sharded or single-file checkpoints)."""
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: expected a 'weight_map' object mapping tensor names to files.")
        return {k: ckpt / v for k, v in weight_map.items()}
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        extra = (" (found PyTorch .bin weights: arcstream reads only safetensors, never pickle)"
                 if list(ckpt.glob("*.bin")) else "")
        raise FileNotFoundError(f"{ckpt}: no *.safetensors files{extra}; expected model.safetensors "
                                "or model-0000x-of-0000y.safetensors with an index.")
    out: dict[str, Path] = {}
    for fp in files:
        with safe_open(fp, framework="flax") as f:
            out.update({k: fp for k in f.keys()})
    return out


# ---------------------------------------------------------------------------- loading
def load_model(path_or_hub_name: str | os.PathLike, *, dtype: str = "float32",
               mesh: jax.sharding.Mesh | None = None, rules: Rules = None,
               attention: str = "auto") -> tuple[Decoder, ModelConfig]:
    """Load an HF Qwen2/Qwen2.5, Qwen3, Llama, Mistral, Gemma 2 or Gemma 3 (text) checkpoint into a `Decoder`.

    dtype: "float32" or "bfloat16" (parameters and activations).
    mesh: place every tensor straight into its shards on this ('data','model')
      mesh (per `rules`, default `LOGICAL_AXIS_RULES`); None = default device.
    attention: the attention implementation (arcstream.model.attention).
    Raises with the file and key for missing/unexpected tensors, shape
    mismatches, and unsupported architectures or options.
    """
    if str(jnp.dtype(dtype)) not in ("float32", "bfloat16"):
        raise ValueError(f"load_model(dtype={dtype!r}): expected 'float32' or 'bfloat16'.")
    ckpt = resolve_checkpoint(path_or_hub_name)
    cfg_path = ckpt / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{ckpt}: no config.json; expected an HF checkpoint directory.")
    config = ModelConfig.from_json_file(cfg_path)
    check_head_sharding(config, mesh)
    files = _tensor_files(ckpt)
    graphdef, abs_state = _abstract_model(config, dtype, rules, attention)
    sources = _match_tensors(ckpt, files, config, wanted=dict(_flat_params(abs_state)))
    model = nnx.merge(graphdef, _read_params(abs_state, sources, files, mesh, rules))
    _log_params(model)
    return model, config


def _abstract_model(config: ModelConfig, dtype: str, rules: Rules, attention: str) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and abstract parameters (shapes, dtypes, logical axes; nothing allocated)."""
    abstract = nnx.eval_shape(lambda: Decoder(config, dtype=dtype, rngs=nnx.Rngs(0), rules=rules,
                                              attention=attention))
    return nnx.split(abstract)


def _match_tensors(ckpt: Path, files: dict[str, Path], config: ModelConfig,
                   wanted: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """NNX path -> (HF key, transpose) for every wanted parameter; raises on unexpected or missing tensors."""
    sources: dict[str, tuple[str, bool]] = {}
    for key in files:
        if any(rx.fullmatch(key) for rx in _IGNORED):
            continue
        mapped = hf_to_nnx(key)
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: the LM head is the embedding (HF ignores a stored copy too)
        if mapped is None or mapped[0] not in wanted:
            raise ValueError(
                f"{files[key]}: tensor {key!r} is not a parameter of a {config.family} model with "
                f"this config.json (mapped to {mapped[0] if mapped else None!r}); the checkpoint "
                "has an option arcstream does not implement, or config.json does not match it."
            )
        sources[mapped[0]] = (key, mapped[1])
    missing = sorted(set(wanted) - set(sources))
    if missing:
        names = [nnx_to_hf(m)[0] for m in missing]
        raise ValueError(f"{ckpt}: missing tensors {names[:8]}{' ...' if len(names) > 8 else ''} "
                         f"for a {config.family} model with this config.json.")
    return sources


def _read_params(abs_state: nnx.State, sources: dict[str, tuple[str, bool]], files: dict[str, Path],
                 mesh: jax.sharding.Mesh | None, rules: Rules) -> nnx.State:
    """Every parameter read from its safetensors file (shape-checked) and placed; each file is opened once."""
    cpu = jax.local_devices(backend="cpu")[0]
    handles: dict[Path, Any] = {}
    new_flat = []
    try:
        for path_parts, var in nnx.to_flat_state(abs_state):
            path = _dotted(path_parts)
            key, transpose = sources[path]
            fp = files[key]
            if fp not in handles:
                handles[fp] = safe_open(fp, framework="flax")
                handles[fp].__enter__()
            sl = handles[fp].get_slice(key)
            hf_shape = tuple(sl.get_shape())
            want = tuple(var.shape)
            expect_hf = want[::-1] if transpose else want
            if hf_shape != expect_hf:
                raise ValueError(f"{fp}: tensor {key!r} has shape {hf_shape}; the config.json implies "
                                 f"{expect_hf} (NNX {path} {want}).")
            read = _memo(_slice_reader(sl, transpose, np.dtype(var.dtype), cpu))
            new_flat.append((path_parts, var.replace(_place(var, read, mesh, rules))))
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return nnx.from_flat_state(new_flat)


def _place(var: Any, read: Callable[[tuple], np.ndarray], mesh: jax.sharding.Mesh | None, rules: Rules) -> jax.Array:
    """One parameter's value: `read` whole onto the default device, or shard by shard onto `mesh`."""
    shape = tuple(var.shape)
    if mesh is None:
        return jnp.asarray(read(tuple(slice(None) for _ in shape)))
    sharding = logical_sharding(var.get_metadata()["logical_axes"], shape, mesh, rules)
    return jax.make_array_from_callback(shape, sharding, read)


def _slice_reader(sl: Any, transpose: bool, dtype: np.dtype, cpu: jax.Device) -> Callable[[tuple], np.ndarray]:
    """Reads one shard of a safetensors tensor as a host NumPy array of `dtype`.

    The safetensors flax reader is used (it handles bf16; its NumPy reader
    does not), pinned to the CPU so a GPU/TPU never holds a staging copy.
    """

    def read(index: tuple[slice, ...]) -> np.ndarray:
        idx = tuple(s if isinstance(s, slice) else slice(None) for s in index)
        with jax.default_device(cpu):
            part = sl[idx[::-1]] if transpose else sl[idx]
            arr = np.asarray(part)
        arr = arr.T if transpose else arr
        return np.ascontiguousarray(arr.astype(dtype, copy=False))

    return read


def _memo(read: Callable[[tuple], np.ndarray]) -> Callable[[tuple], np.ndarray]:
    """Replicated shards ask for the same slice once per device: read it once."""
    cache: dict[tuple, np.ndarray] = {}

    def cb(index: tuple) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in index)
        if key not in cache:
            cache[key] = read(index)
        return cache[key]

    return cb


def _log_params(model: Decoder) -> None:
    """Log each parameter's shape, dtype and sharding (house style 11)."""
    if not log.isEnabledFor(logging.INFO):
        return
    for path, var in _flat_params(nnx.state(model, nnx.Param)):
        v = var[...]
        log.info("param %-45s %-18s %-9s %s", path, tuple(v.shape), v.dtype, getattr(v, "sharding", None))


def check_head_sharding(config: ModelConfig, mesh: jax.sharding.Mesh | None) -> None:
    """Refuse a 'model' mesh axis that would split attention heads.

    Heads are the unit of tensor parallelism: the [D, N*H] projections are cut
    over 'model' at head boundaries only when the axis size m divides the N
    query heads.  KV heads are cut the same way when m divides K; when K < m
    and m is a multiple of K (Qwen2.5-0.5B: 2 KV heads on 4 devices) each
    device keeps every KV head (replicated, as GQA tensor parallelism usually
    does).  Anything else used to be replicated silently by the sharding rules
    (correct, but no parallelism and extra memory); it is now an error.
    """
    if mesh is None or "model" not in mesh.axis_names:
        return
    m = int(mesh.shape["model"])
    if m == 1:
        return
    n, k = config.num_heads, config.num_kv_heads
    ok = [d for d in range(1, n + 1) if n % d == 0 and (k % d == 0 or d % k == 0)]
    if n % m or (k % m and m % k):
        raise ValueError(f"mesh 'model' axis of size {m} does not split the model's {n} query heads and {k} KV "
                         f"heads into whole heads; use --config.mesh.model in {ok}")
    if k % m:
        log.info("mesh model=%d > %d KV heads: each device keeps every KV head (replicated)", m, k)


# ---------------------------------------------------------------------------- random init
def init_random(config: ModelConfig, seed: int = 0, *, dtype: str = "float32",
                mesh: jax.sharding.Mesh | None = None, rules: Rules = None, attention: str = "auto") -> Decoder:
    """A random model: normal(0, 0.02) matrices, unit norm scales (Gemma: zero weights), zero biases.

    Values come from NumPy (one generator per parameter, seeded by
    `(seed, index)`), so they do not depend on the mesh, and nothing is
    compiled (XLA's threefry init of a model compiles for many seconds).  With
    a mesh, each parameter is generated and placed one at a time, like
    `load_model`, so the host holds at most one full tensor.
    """
    check_head_sharding(config, mesh)
    graphdef, abs_state = _abstract_model(config, dtype, rules, attention)
    new_flat = []
    for i, (path_parts, var) in enumerate(nnx.to_flat_state(abs_state)):
        shape, np_dtype = tuple(var.shape), np.dtype(var.dtype)
        leaf, owner = str(path_parts[-1]), _dotted(path_parts[:-1])

        def full(i=i, shape=shape, np_dtype=np_dtype, leaf=leaf, owner=owner) -> np.ndarray:
            if leaf == "bias":
                return np.zeros(shape, np_dtype)
            if leaf == "weight" and "norm" in owner:  # scale 1: Gemma's (1 + w) norms store 0
                return (np.zeros if config.norm_plus_one else np.ones)(shape, np_dtype)
            rng = np.random.default_rng([seed, i])
            return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np_dtype)

        whole: list[np.ndarray] = []

        def read(index: tuple, full=full, whole=whole) -> np.ndarray:
            if not whole:  # generated once, on the first shard asked for
                whole.append(full())
            return whole[0][index]

        new_flat.append((path_parts, var.replace(_place(var, read, mesh, rules))))
    return nnx.merge(graphdef, nnx.from_flat_state(new_flat))


# ---------------------------------------------------------------------------- saving
def save_hf_checkpoint(model: Decoder, config: ModelConfig, path: str | os.PathLike, *,
                       max_shard_bytes: int | None = None, every_process: bool = False) -> Path:
    """Write `config.json` + safetensors in the HF layout (transformers can load it).

    No torch needed.  Kernels are transposed back to HF `[out, in]`; a tied LM
    head is not stored (as HF does).  With `max_shard_bytes`, tensors are
    split across `model-0000i-of-0000n.safetensors` with an index file.
    Multi-process: every process must call this (arrays are gathered); only
    process 0 writes, or each process to its own `path` with `every_process`.
    """
    out = Path(path)
    cpu = jax.local_devices(backend="cpu")[0]
    tensors: dict[str, jax.Array] = {}
    for p, var in _flat_params(nnx.state(model, nnx.Param)):
        key, transpose = nnx_to_hf(p)
        arr = var[...]
        if not arr.is_fully_addressable:
            arr = multihost_utils.process_allgather(arr, tiled=True)
        host = np.asarray(jax.device_get(arr))
        tensors[key] = jax.device_put(host.T if transpose else host, cpu)
    if jax.process_index() != 0 and not every_process:
        return out
    out.mkdir(parents=True, exist_ok=True)
    hf = config.to_hf_config()
    hf["dtype"] = str(np.dtype(model.dtype)) if model.dtype != jnp.bfloat16 else "bfloat16"
    with open(out / "config.json", "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    meta = {"format": "pt"}  # transformers refuses files without this metadata
    if max_shard_bytes is None:
        save_file(tensors, str(out / "model.safetensors"), metadata=meta)
        return out
    groups: list[dict[str, jax.Array]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.size * v.dtype.itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][k] = v
        size += nbytes
    weight_map = {}
    for i, g in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(g, str(out / name), metadata=meta)
        weight_map.update({k: name for k in g})
    total = sum(v.size * v.dtype.itemsize for v in tensors.values())
    with open(out / "model.safetensors.index.json", "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return out

