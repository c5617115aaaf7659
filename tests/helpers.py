"""Tiny random checkpoints and a locally trained tokenizer, built at test time."""

from __future__ import annotations

import contextlib
import os

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

CORPUS = [
    "Hello, my name is Ada and I like to write programs.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "JAX compiles numerical programs for accelerators with XLA.",
    "Once upon a time there was a small model that generated tokens one by one.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Attention is all you need; pages hold keys and values for each sequence.",
] * 20


def make_tokenizer(path: str, vocab_size: int = 256):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    from tokenizers.processors import TemplateProcessing

    bos = tok.token_to_id("<s>")
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(path)
    return fast


TEXTS = ["Hello, my name is Ada.", "The capital of France is Paris. 0123456789", " spaced  out "]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def tokenizer_behaviour(tok) -> dict:
    """What jaxmm uses a tokenizer for, on a few inputs (JSON-able, to compare across processes)."""
    chat = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)
    return {
        "ids": [tok(t).input_ids for t in TEXTS],
        "decoded": [tok.decode(tok(t).input_ids) for t in TEXTS],
        "skip": [tok.decode(tok(t).input_ids, skip_special_tokens=True) for t in TEXTS],
        "chat": tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
        "chat_ids": chat["input_ids"],
        "specials": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)],
    }


# everything jaxmm reads of a text model's HF config (models/llama.py, runner/, weights/loader.py,
# runner/checkpoint.py, models/registry.py), plus the fields those defaults come from
READ = [
    "model_type",
    "architectures",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "max_position_embeddings",
    "attention_bias",
    "mlp_bias",
    "tie_word_embeddings",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "layer_types",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
    "text_config",
]
_MISSING = object()


def assert_same(light, full) -> None:
    """`light` is a hf_config `TextConfig` and agrees with transformers' config `full` on
    every field jaxmm reads, and on what jaxmm derives from them."""
    from jaxmm.layers.rope import rope_parameters
    from jaxmm.models.llama import head_dim, layer_sliding_window
    from jaxmm.weights.hf_config import TextConfig
    from jaxmm.weights.loader import cast_dtype

    assert isinstance(light, TextConfig)
    for key in READ:
        assert getattr(light, key, _MISSING) == getattr(full, key, _MISSING), key
    # AutoConfig turns the dtype into a torch.dtype; jaxmm reads only its name
    assert str(light.dtype) == str(full.dtype).removeprefix("torch."), "dtype"
    assert cast_dtype("auto", light) == cast_dtype("auto", full)
    assert rope_parameters(light) == rope_parameters(full)
    assert head_dim(light) == head_dim(full)
    n = full.num_hidden_layers
    assert [layer_sliding_window(light, i) for i in range(n)] == [
        layer_sliding_window(full, i) for i in range(n)
    ]


ARCH_CONFIGS = {
    "llama": dict(
        cls="LlamaConfig",
        model="LlamaForCausalLM",
        kw=dict(attention_bias=False, tie_word_embeddings=False),
    ),
    "llama_tied_llama3": dict(
        cls="LlamaConfig",
        model="LlamaForCausalLM",
        kw=dict(
            tie_word_embeddings=True,
            attention_bias=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "llama_linear": dict(
        cls="LlamaConfig",
        model="LlamaForCausalLM",
        kw=dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ),
    "qwen2": dict(cls="Qwen2Config", model="Qwen2ForCausalLM", kw=dict(tie_word_embeddings=True)),
    "qwen3": dict(cls="Qwen3Config", model="Qwen3ForCausalLM", kw=dict(head_dim=16)),
    "mistral": dict(cls="MistralConfig", model="MistralForCausalLM", kw=dict(sliding_window=24)),
}


def make_checkpoint(root: str, arch: str, seed: int = 0, vocab_size: int = 256) -> str:
    """Save a tiny random model + tokenizer under root/arch; returns the directory."""
    import torch
    import transformers

    path = os.path.join(root, arch)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    spec = ARCH_CONFIGS[arch]
    tokenizer = make_tokenizer(path, vocab_size)
    cfg = getattr(transformers, spec["cls"])(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **spec["kw"],
    )
    torch.manual_seed(seed)
    model = getattr(transformers, spec["model"])(cfg)
    # larger-than-default init so greedy paths are not dominated by ties
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 1:
                p.normal_(0, 0.08 if p.dim() > 1 else 0.5)
                if p.dim() == 1 and p.shape[0] == cfg.hidden_size:
                    p.abs_().add_(0.5)
    model.eval()
    model.save_pretrained(path)
    return path


def hf_greedy(path: str, prompts_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    outs = []
    for ids in prompts_ids:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        outs.append(y[0, len(ids) :].tolist())
    return outs


# ---------------------------------------------------------------------------------------
# HF processors saved in the layouts transformers writes (processor_config.json in 5.x,
# a file per sub-processor in 4.x)


def qwen2_vl_video_processor(**kwargs):
    """Qwen2-VL's video processor (Qwen2.5-VL uses the same class): transformers' own where
    torchvision is installed. Without torchvision its module cannot be imported, so a class
    of the same name on transformers' `BaseVideoProcessor` stands in, with the real one's
    defaults and its min/max_pixels handling: what is tested is the config it saves."""
    try:
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        return Qwen2VLVideoProcessor(**kwargs)
    except ImportError:
        pass
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from transformers.video_processing_utils import BaseVideoProcessor

    class Qwen2VLVideoProcessor(BaseVideoProcessor):
        resample = 3  # bicubic
        size = {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}
        image_mean = OPENAI_CLIP_MEAN
        image_std = OPENAI_CLIP_STD
        do_resize = do_rescale = do_normalize = do_convert_rgb = True
        patch_size = 14
        temporal_patch_size = 2
        merge_size = 2
        min_frames = 4
        max_frames = 768
        do_sample_frames = False
        model_input_names = ["pixel_values_videos", "video_grid_thw"]

        def __init__(self, **kw):
            size = dict(kw.pop("size", None) or self.size)
            if kw.get("min_pixels") is not None:
                size["shortest_edge"] = kw.pop("min_pixels")
            if kw.get("max_pixels") is not None:
                size["longest_edge"] = kw.pop("max_pixels")
            super().__init__(size=size, **kw)

    return Qwen2VLVideoProcessor(**kwargs)


def make_processor(cls, **parts):
    """`cls(**parts)` for an HF processor class. transformers checks a video processor
    against `VideoProcessorMixin`, which it exports only with torchvision installed (the
    class itself needs none): without torchvision the check is pointed at that class while
    the processor is built."""
    import transformers.processing_utils as pu
    from transformers.video_processing_utils import VideoProcessorMixin

    module = pu.transformers_module
    if "video_processor" not in parts or hasattr(module, "VideoProcessorMixin"):
        return cls(**parts)
    module.VideoProcessorMixin = VideoProcessorMixin
    try:
        return cls(**parts)
    finally:
        delattr(module, "VideoProcessorMixin")


def save_processor_separately(processor, path: str) -> None:
    """Save `processor` as transformers 4.x's `save_pretrained` did: each sub-processor by
    its own `save_pretrained` (the image processor or feature extractor to
    preprocessor_config.json, the video processor to video_preprocessor_config.json, the
    tokenizer's files), and the processor's own settings, if it has any, in a flat
    processor_config.json (5.x nests the sub-processors in that one file instead)."""
    import json

    attributes = processor.get_attributes()
    for name in attributes:
        getattr(processor, name).save_pretrained(path)
    own = {k: v for k, v in processor.to_dict().items() if k not in attributes}
    if set(own) - {"processor_class"}:
        with open(os.path.join(path, "processor_config.json"), "w") as f:
            json.dump(own, f, indent=2, sort_keys=True)


def link_model_files(src: str, dst: str) -> str:
    """dst gets src's model config and weights as symlinks (not its tokenizer/processor)."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name in ("config.json", "generation_config.json") or name.endswith(".safetensors"):
            os.symlink(os.path.join(src, name), os.path.join(dst, name))
    return dst


@contextlib.contextmanager
def persistent_compilation_cache(path: str):
    """JAX's persistent compilation cache in `path` while open, for tests that build several
    engines of one model (each compiles the same programs; the later ones read them back).
    JAX's setting is process-global: it is restored after."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {name: getattr(jax.config, name) for name in names}
    jax.config.update(names[0], path)
    jax.config.update(names[1], 0.0)
    try:
        yield path
    finally:  # JAX keeps its cache object once made: drop it
        for name, value in old.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def wav_bytes(clip, sr: int) -> bytes:
    """`clip` (float samples) as a float32 WAV file's bytes."""
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, clip, sr, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def wav_base64(clip, sr: int) -> str:
    """`clip` as the base64 WAV of an OpenAI `input_audio` part."""
    import base64

    return base64.b64encode(wav_bytes(clip, sr)).decode()


def png_data_url(image) -> str:
    """A PIL image as a `data:image/png;base64,...` URL (an `image_url` part's)."""
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def assert_audio_and_image_chat_parts(llm, audio, sr: int, image, placeholders, params) -> None:
    """An `input_audio` part (base64 WAV) and an `image_pil` part each become the model's
    placeholder (`placeholders`: audio's, image's) in a `<|user|>...<|end|><|assistant|>`
    chat template (tests' Omni tokenizers), expanded as in a prompt: the chat's ids are the
    direct prompt's without its BOS (the template's text is tokenized as it is)."""
    aud, img = placeholders
    wav = {"data": wav_base64(audio, sr), "format": "wav"}
    audio_part = {"type": "input_audio", "input_audio": wav}
    cases = [
        (audio_part, aud, {"audio": (audio, sr)}),
        ({"type": "image_pil", "image_pil": image}, img, {"image": image}),
    ]
    for part, placeholder, data in cases:
        messages = [{"role": "user", "content": [part, {"type": "text", "text": "What?"}]}]
        chat = llm.chat(messages, params, use_tqdm=False)[0]
        text = f"<|user|>{placeholder}\nWhat?<|end|><|assistant|>"
        assert chat.prompt == text
        direct = llm.generate([{"prompt": text, "multi_modal_data": data}], params)[0]
        assert chat.prompt_token_ids == direct.prompt_token_ids[1:]  # BOS
        assert len(chat.prompt_token_ids) > 10  # the placeholder was expanded
