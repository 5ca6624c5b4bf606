"""Read and write Hugging Face model directories: config.json, (sharded) safetensors, and the
tokenizer files that `transformers.AutoTokenizer` loads (tokenizer.json, tokenizer_config.json
with Qwen2's chat template) with generation_config.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from tqdm import tqdm

from megatron_qwen2.checkpoint.atomic import atomic_directory
from megatron_qwen2.data.sft import DEFAULT_SYSTEM_PROMPT, IM_END, IM_START, ensure_chat_tokens
from megatron_qwen2.data.tokenizer import _QWEN2_SPLIT, EOD_TOKEN, eod_token_id

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # "5GB", as transformers counts it
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                torch.float64: "float64"}


def read_hf_dir(hf_dir: Union[str, Path], progress: Optional[bool] = None) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors of an HF model directory and its config.json as a dict."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / CONFIG_FILE).is_file():
        raise ValueError(f"{hf_dir} is not a Hugging Face model directory (no {CONFIG_FILE})")
    config = _read_json(hf_dir / CONFIG_FILE)
    weight_map = None
    if (hf_dir / INDEX_FILE).is_file():
        weight_map = _read_json(hf_dir / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{hf_dir / INDEX_FILE} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif (hf_dir / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise ValueError(f"{hf_dir} holds no {SINGLE_FILE} and no {INDEX_FILE}")
    tensors: dict[str, torch.Tensor] = {}
    for fname in tqdm(files, desc="reading shards", unit="file", disable=_no_bar(progress, len(files))):
        path = hf_dir / fname
        if not path.is_file():
            raise ValueError(f"{hf_dir / INDEX_FILE} names {fname}, which does not exist")
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key in tensors:
                    raise ValueError(f"tensor {key} appears in more than one shard of {hf_dir}")
                if weight_map is not None and weight_map.get(key) != fname:
                    raise ValueError(f"{path} holds {key}, which {INDEX_FILE} places in {weight_map.get(key)}")
                tensors[key] = f.get_tensor(key)
    unheld = sorted(set(weight_map or ()) - set(tensors))
    if unheld:
        raise ValueError(f"{hf_dir / INDEX_FILE} lists tensor(s) that no shard holds: {unheld[:8]}")
    return tensors, config


def write_hf_dir(tensors: dict[str, torch.Tensor], config: dict, out_dir: Union[str, Path],
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                 progress: Optional[bool] = None, files: Optional[dict[str, str]] = None) -> Path:
    """Write config.json, safetensors (sharded, with an index, above max_shard_bytes) and `files`
    ({name: text}, e.g. hf_tokenizer_files), atomically."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max shard size must be > 0 bytes, got {max_shard_bytes}")
    out_dir = Path(out_dir)
    dtype = _DTYPE_NAMES.get(_main_dtype(tensors), "float32")
    # transformers 5 reads `dtype`; older releases read `torch_dtype`.
    config = {**config, "torch_dtype": dtype, "dtype": dtype}
    shards = plan_shards(tensors, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    with atomic_directory(out_dir, overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        weight_map = {}
        bar = tqdm(total=len(tensors), desc="writing tensors", unit="tensor", disable=_no_bar(progress, len(tensors)))
        for fname, keys in zip(names, shards):
            save_file({k: tensors[k].detach().contiguous() for k in keys}, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in keys})
            bar.update(len(keys))
        bar.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
                     "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return out_dir


def qwen2_chat_template(system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """Qwen2's chat template (Jinja): the rendering of megatron_qwen2/data/sft.py, the default system
    prompt first when the conversation does not start with a system message, and
    `<|im_start|>assistant\\n` after it with add_generation_prompt."""
    system = json.dumps(f"{IM_START}system\n{system_prompt}{IM_END}\n")
    return ("{%- for message in messages %}"
            "{%- if loop.first and messages[0]['role'] != 'system' %}{{- " + system + " }}{%- endif %}"
            "{{- '" + IM_START + "' + message['role'] + '\\n' + message['content'] + '" + IM_END + "' + '\\n' }}"
            "{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '" + IM_START + "assistant\\n' }}{%- endif %}")


def hf_tokenizer_files(tok: Tokenizer, vocab_size: int, max_length: int, chat: bool) -> tuple[dict[str, str], dict]:
    """The tokenizer and generation files of an HF model directory, and the token ids its config.json
    holds: ({file name: text}, {"bos_token_id": ..., "eos_token_id": ...}).

    `tok` gets <|im_start|> / <|im_end|> where it lacks them, as SFT data adds them. Token ids are
    Qwen2's: <|endoftext|> begins, pads and ends text; a model trained on chat (`chat`) ends its turn
    with <|im_end|> (config.json's eos), and generation stops at either. ValueError when the
    tokenizer has more tokens than the model's vocab_size.
    """
    where = getattr(tok, "source_path", "<in memory>")
    eod = eod_token_id(tok)
    ensure_chat_tokens(tok)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"tokenizer {where} has {tok.get_vocab_size()} tokens (with {IM_START} and {IM_END}) but "
                         f"the model's vocab_size is {vocab_size}: pass the run's tokenizer with --tokenizer")
    im_end = tok.token_to_id(IM_END)
    eos_token, eos_id = (IM_END, im_end) if chat else (EOD_TOKEN, eod)
    tokenizer_config = {
        # PreTrainedTokenizerFast loads tokenizer.json as it is; transformers' Qwen2Tokenizer would
        # rebuild the pipeline with its own normaliser (NFC), and encode some text differently.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None, "eos_token": eos_token, "pad_token": EOD_TOKEN, "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "chat_template": qwen2_chat_template(),
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
    }
    generation = {"bos_token_id": eod, "pad_token_id": eod, "eos_token_id": [im_end, eod] if chat else eod}
    files = {TOKENIZER_FILE: tok.to_str(pretty=True) + "\n",
             TOKENIZER_CONFIG_FILE: json.dumps(tokenizer_config, indent=2) + "\n",
             GENERATION_CONFIG_FILE: json.dumps(generation, indent=2) + "\n"}
    return files, {"bos_token_id": eod, "eos_token_id": eos_id}


def qwen2_pipeline_differences(tok: Tokenizer) -> list[str]:
    """The parts of tok's pipeline that make ids differ from Qwen2's: 'normalizer' (Qwen2's is NFC),
    'pre_tokenizer' (Qwen2's regex split, then byte-level). transformers >= 5 loads the tokenizer of a
    qwen2 model with Qwen2's own pipeline over the exported vocabulary and merges, whatever
    tokenizer.json says, so where these differ it encodes some text otherwise than training did."""
    qwen2 = Tokenizer(models.BPE())
    qwen2.normalizer = normalizers.NFC()
    qwen2.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    def parts(t: Tokenizer) -> dict:
        spec = json.loads(t.to_str())
        return json.loads(json.dumps({k: spec.get(k) for k in ("normalizer", "pre_tokenizer")}).replace(
            '"trim_offsets": false', '"trim_offsets": true'))  # offsets only, not ids

    ours, ref = parts(tok), parts(qwen2)
    return [k for k in ref if ours[k] != ref[k]]


def plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Group tensor names, in order, into shards of at most max_bytes (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = _nbytes(t)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _main_dtype(tensors: dict[str, torch.Tensor]) -> Optional[torch.dtype]:
    """The dtype holding the most bytes (norms may be kept in fp32 next to bf16 weights)."""
    totals: dict[torch.dtype, int] = {}
    for t in tensors.values():
        totals[t.dtype] = totals.get(t.dtype, 0) + _nbytes(t)
    return max(totals, key=totals.get) if totals else None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _no_bar(progress: Optional[bool], n: int) -> Optional[bool]:
    # None lets tqdm hide the bar when stderr is not a terminal.
    return True if progress is False or n <= 1 else None
